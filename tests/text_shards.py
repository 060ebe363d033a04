"""Small real pairs shards for the text-stage tests: procedural images through real ingest."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa

from pedsynth.procedural import generate
from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.tasks import sources
from pedsynth.tasks.shards import read_shard


def ingest_procedural(root: Path, identities: int, images_per_identity: int) -> pa.Table:
    """Generate a procedural benchmark under ``root`` and return its ingested pairs shard."""
    generate(root / "bench", identities=identities, images_per_identity=images_per_identity, seed=3)
    source = SourceConfig(format="cuhk-pedes", path=str(root / "bench"))
    chunks, _ = sources.plan_chunks(source, root / "out", 100_000)
    assert len(chunks) == 1
    return read_shard(sources.ingest_chunk(chunks[0], IngestConfig(), root / "out"))


def uncaptioned(table: pa.Table) -> pa.Table:
    """One placeholder row per image with the caption removed, as ingest writes for images
    without annotations."""
    rows, seen = [], set()
    for row in table.to_pylist():
        if row["image_id"] not in seen:
            seen.add(row["image_id"])
            rows.append(
                row | {"caption": None, "caption_source": None, "pair_id": "u" + row["pair_id"]}
            )
    return pa.Table.from_pylist(rows, schema=table.schema)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run tiny models with ``n`` intra-op threads, restoring the setting after.

    Tiny models gain nothing from a second thread, and on a busy 2-core machine two OpenMP
    threads per process make each generate call 3-30x slower.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

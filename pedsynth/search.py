"""Text → image search over a finished build's memory (``pedsynth search OUT "a man in red"``).

Reads what the ``memory`` stage left in ``OUT/memory/``: the image index, its id table and the
CLIP settings it was built with, so the query is embedded by the same model. Captions of the
hits come from the final shards (``OUT/data``), or from the memory stage's own outputs when the
build stopped before write.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.cache import cache_key, cached
from pedsynth.schemas.manifest import resolve_build
from pedsynth.schemas.vision import ClipModelConfig
from pedsynth.tasks.memory_index import (
    IDS_FILE,
    IMAGES_INDEX,
    MEMORY_FILE,
    memory_folder,
    normalize,
    read_memory,
    search_index,
)
from pedsynth.tasks.shards import WORK_DIR

MEMORY_STAGE = "memory"


def _load_images_index(out_dir: Path) -> tuple[Any, pa.Table]:
    """(faiss image index, its id rows by position); cached per file version."""
    path = memory_folder(out_dir) / IMAGES_INDEX
    key = cache_key("faiss-images", str(path.resolve()), path.stat().st_mtime_ns)

    def load() -> tuple[Any, pa.Table]:
        import faiss
        import pyarrow.parquet as pq

        ids = pq.read_table(memory_folder(out_dir) / IDS_FILE)
        ids = ids.filter(pc.equal(ids.column("index"), "images")).sort_by("position")
        return faiss.read_index(str(path)), ids

    return cached(key, load)


def _caption_files(out_dir: Path) -> list[str]:
    final = sorted((out_dir / "data").glob("*.parquet"))
    if final:
        return [str(p) for p in final]
    return [str(p) for p in sorted((out_dir / WORK_DIR / MEMORY_STAGE).glob("*.parquet"))
            if not p.name.endswith(".rejects.parquet")]  # fmt: skip


def _captions_of(out_dir: Path, image_ids: list[str]) -> dict[str, list[str]]:
    import pyarrow.dataset as ds

    captions: dict[str, list[str]] = defaultdict(list)
    files = _caption_files(out_dir)
    if not image_ids or not files:
        return captions
    table = ds.dataset(files, format="parquet").to_table(
        columns=["image_id", "caption"], filter=pc.field("image_id").isin(pa.array(image_ids))
    )
    for image_id, caption in zip(
        table.column("image_id").to_pylist(), table.column("caption").to_pylist(), strict=True
    ):
        if caption is not None:
            captions[image_id].append(caption)
    return captions


def search(
    out_dir: str | Path, text: str, k: int = 10, *, split: str | None = None
) -> list[dict[str, Any]]:
    """The k images most similar to ``text``: rank, image_id, person_id, split, score, captions.

    Raises ``FileNotFoundError`` when the build has no memory and ``ValueError`` for an empty
    text, ``k < 1`` or a split the memory does not hold.
    """
    from pedsynth.engines.clip import load_clip

    out_dir = resolve_build(out_dir)  # OUT: the version `latest` names
    meta = read_memory(out_dir)
    if meta is None:
        raise FileNotFoundError(
            f"{memory_folder(out_dir) / MEMORY_FILE} not found (was the build run with a "
            "`memory:` section?)"
        )
    if not text.strip():
        raise ValueError("search text is empty")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    id_range = None
    if split is not None:
        ranges = meta["split_ranges"]
        if split not in ranges:
            raise ValueError(f"split {split!r} is not in the memory; it has {sorted(ranges)}")
        id_range = tuple(ranges[split])
    engine = load_clip(ClipModelConfig.model_validate(meta["clip"]))
    query = normalize(engine.encode_texts([text]).pooled)
    index, ids = _load_images_index(out_dir)
    sims, found = search_index(
        index, query, k, id_range=id_range, ef=max(meta["index"]["ef_search"], k)
    )
    positions = [int(i) for i in found[0] if i >= 0]
    rows = ids.take(pa.array(positions, pa.int64())).to_pylist() if positions else []
    captions = _captions_of(out_dir, [r["image_id"] for r in rows])
    return [
        {
            "rank": rank + 1,
            "image_id": row["image_id"],
            "person_id": row["person_id"],
            "split": row["split"],
            "score": float(score),
            "captions": captions.get(row["image_id"], []),
        }
        for rank, (row, score) in enumerate(zip(rows, sims[0].tolist(), strict=False))
    ]

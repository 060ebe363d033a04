"""Planning a ``shards`` source: an earlier build's output read back as the input of a new one."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pedsynth.schemas.config import BuildConfig, IngestConfig, SourceConfig
from pedsynth.schemas.tables import pairs_table
from pedsynth.tasks import sources


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished build (ingest, then write) of a small procedural set, 4 rows per shard."""
    from pedsynth.procedural import generate
    from pedsynth.schemas.manifest import StageCounts
    from pedsynth.tasks import write

    root = tmp_path_factory.mktemp("finished")
    generate(root / "bench", identities=5, images_per_identity=2, seed=2, workers=1)
    out = root / "out"
    cfg = BuildConfig.model_validate(
        {
            "out": str(out),
            "shard_rows": 4,
            "sources": [{"format": "cuhk-pedes", "path": str(root / "bench")}],
        }
    )
    chunks, catalog = sources.plan_chunks(cfg.sources[0], out, cfg.shard_rows)
    shards = [sources.ingest_chunk(c, cfg.ingest, out) for c in chunks]
    write.write_dataset(
        out,
        shards,
        [catalog.rejects_path, *(r.rejects_path for r in shards)],
        shard_rows=cfg.shard_rows,
        config=cfg.model_dump(mode="json"),
        stages={"ingest": StageCounts.of(shards, rows_in=0, seconds=0.0, upstream=[catalog])},
    )
    return out


def _shards_source(path: Path, name: str = "earlier") -> SourceConfig:
    return SourceConfig(format="shards", path=str(path), name=name)


def test_one_chunk_per_shard_file_in_name_order(finished: Path, tmp_path: Path) -> None:
    files = sorted((finished / "data").glob("*.parquet"))
    # 5 identities x 2 images x 2 captions = 20 pairs; at 4 per file every split has several.
    assert sum(pq.read_metadata(f).num_rows for f in files) == 20
    assert len(files) >= 5

    chunks, catalog = sources.plan_chunks(_shards_source(finished), tmp_path / "new", 4)
    assert catalog is None  # nothing to catalogue: the rows are already pairs
    assert [c.input_path for c in chunks] == [str(f) for f in files]
    assert [c.key for c in chunks] == [f"earlier-{i:05d}" for i in range(len(files))]
    assert {c.kind for c in chunks} == {"shard"} and {c.source for c in chunks} == {"earlier"}
    assert [c.rows for c in chunks] == [pq.read_metadata(f).num_rows for f in files]
    assert [c.input_fp for c in chunks] == [_sha256(f) for f in files]
    assert not (tmp_path / "new").exists()  # planning writes nothing

    # The data folder itself, or one file, plan the same way.
    by_folder, _ = sources.plan_chunks(_shards_source(finished / "data"), tmp_path / "new", 4)
    assert [c.input_path for c in by_folder] == [str(f) for f in files]
    [single], _ = sources.plan_chunks(_shards_source(files[2]), tmp_path / "new", 4)
    assert (single.input_path, single.input_fp) == (str(files[2]), _sha256(files[2]))


def test_fingerprints_follow_the_content_not_the_place_or_the_time(
    finished: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(finished / "data", copy / "data")
    files = sorted((copy / "data").glob("*.parquet"))
    os.utime(files[0], ns=(1, 1))  # same bytes, another mtime
    original, _ = sources.plan_chunks(_shards_source(finished), tmp_path / "new", 4)
    moved, _ = sources.plan_chunks(_shards_source(copy), tmp_path / "new", 4)
    assert [c.input_fp for c in moved] == [c.input_fp for c in original]

    rows = pq.read_table(files[1]).to_pylist()
    rows[0]["caption"] = "A different caption."
    pq.write_table(pairs_table(rows), files[1])
    edited, _ = sources.plan_chunks(_shards_source(copy), tmp_path / "new", 4)
    changed = [
        i for i, (a, b) in enumerate(zip(original, edited, strict=True)) if a.input_fp != b.input_fp
    ]
    assert changed == [1]


def test_ingesting_a_shards_source_keeps_every_row(finished: Path, tmp_path: Path) -> None:
    chunks, _ = sources.plan_chunks(_shards_source(finished), tmp_path / "new", 4)
    results = [sources.ingest_chunk(c, IngestConfig(), tmp_path / "new") for c in chunks]
    assert [r.rejected for r in results] == [0] * len(chunks)
    got = [pid for r in results for pid in pq.read_table(r.path).column("pair_id").to_pylist()]
    want = pq.read_table(finished / "data").column("pair_id").to_pylist()
    assert sorted(got) == sorted(want) and len(got) == 20


def test_missing_or_empty_shards_source_is_a_clear_error(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=f"shards source not found: {nowhere}"):
        sources.plan_chunks(_shards_source(nowhere), tmp_path / "new", 4)
    empty = tmp_path / "empty"
    (empty / "data").mkdir(parents=True)
    (empty / "data" / "notes.txt").write_text("no shards here")
    with pytest.raises(FileNotFoundError, match=r"no \.parquet files in .*empty/data"):
        sources.plan_chunks(_shards_source(empty), tmp_path / "new", 4)

"""The write stage: a pair that arrives twice is written once; a write over a finished build
that dies part-way, or a damaged final shard, never passes for a finished build."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from pedsynth.schemas.tables import pairs_table, rejects_table
from pedsynth.tasks import write as write_mod
from pedsynth.tasks.shards import run_shard
from pedsynth.tasks.write import write_dataset


def _rows(n: int = 3) -> list[dict]:
    return [
        {
            "pair_id": f"p{i}",
            "image_id": f"i{i}",
            "person_id": f"x{i % 2}",
            "split": "train",
            "image": {"bytes": b"\xff\xd8", "path": f"{i}.jpg"},
            "width": 1,
            "height": 1,
            "caption": f"caption {i}",
            "caption_source": "original",
            "source": f"s#{i}",
            "generator": "dataset:test",
        }
        for i in range(n)
    ]


def test_duplicate_pairs_are_written_once_and_rejected(tmp_path):
    rows = _rows()
    shard = run_shard(tmp_path, "ingest", "a", "fp", lambda: (pairs_table(rows), rejects_table([])))
    manifest = write_dataset(
        tmp_path / "out",
        [shard, shard],
        [shard.rejects_path],
        shard_rows=10,
        config={"name": "t", "write": {"card_examples": 0}},
        stages={},
    )
    assert manifest.stages["write"].rows_in == 6 and manifest.stages["write"].rows_out == 3
    data = pq.read_table(tmp_path / "out" / "data").column("pair_id").to_pylist()
    assert sorted(data) == ["p0", "p1", "p2"]
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    assert [(r["reason"], r["pair_id"]) for r in rejects] == [
        ("duplicate_pair", "p0"),
        ("duplicate_pair", "p1"),
        ("duplicate_pair", "p2"),
    ]
    assert manifest.stages["write"].rejects_by_reason == {"duplicate_pair": 3}


def _write(tmp_path, shard, shard_rows: int):
    return write_dataset(
        tmp_path / "out",
        [shard],
        [shard.rejects_path],
        shard_rows=shard_rows,
        config={"name": "t", "write": {"card_examples": 0}},
        stages={},
    )


def _data_bytes(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / "data").iterdir())}


@pytest.fixture
def shard(tmp_path):
    rows = _rows(12)
    return run_shard(tmp_path, "ingest", "a", "fp", lambda: (pairs_table(rows), rejects_table([])))


def test_a_damaged_final_shard_is_written_again(tmp_path, shard):
    first = _write(tmp_path, shard, shard_rows=5)
    out = tmp_path / "out"
    before = _data_bytes(out)
    damaged = out / first.shards[0].path
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    again = _write(tmp_path, shard, shard_rows=5)
    assert again.created >= first.created and _data_bytes(out) == before


def test_a_write_killed_over_a_finished_build_never_passes_for_finished(
    tmp_path, shard, monkeypatch
):
    _write(tmp_path, shard, shard_rows=5)
    out = tmp_path / "out"
    before = _data_bytes(out)
    real, calls = write_mod.write_parquet_atomic, []

    def dies_after_one(table, path):
        if calls:
            raise KeyboardInterrupt  # the process is killed between two final shards
        calls.append(path)
        real(table, path)

    monkeypatch.setattr(write_mod, "write_parquet_atomic", dies_after_one)
    with pytest.raises(KeyboardInterrupt):
        _write(tmp_path, shard, shard_rows=4)  # other settings: other shards, same names
    assert not (out / "manifest.json").exists()  # no old manifest over a mix of shards
    assert _data_bytes(out) != before
    (out / "data" / ".train-00000-of-00003.parquet.tmp-1-deadbeef").write_bytes(b"half")
    monkeypatch.setattr(write_mod, "write_parquet_atomic", real)

    again = _write(tmp_path, shard, shard_rows=5)  # the first settings again
    assert (out / "manifest.json").exists() and again.stages["write"].rows_out == 12
    assert _data_bytes(out) == before  # the same files, and the leftover is gone

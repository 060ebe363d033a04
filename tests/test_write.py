"""The write stage's own reject path: a pair that arrives twice is written once."""

from __future__ import annotations

import pyarrow.parquet as pq

from pedsynth.schemas.tables import pairs_table, rejects_table
from pedsynth.tasks.shards import run_shard
from pedsynth.tasks.write import write_dataset


def test_duplicate_pairs_are_written_once_and_rejected(tmp_path):
    rows = [
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
        for i in range(3)
    ]
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

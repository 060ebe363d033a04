"""The shard-stage protocol: lazy registry, one instance per config, fingerprinted reuse."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from pedsynth.schemas.tables import pairs_table, rejects_table
from pedsynth.tasks import stages
from pedsynth.tasks.shards import run_shard

BUILT: list[str] = []


class ShoutConfig(BaseModel):
    suffix: str = "!"


class ShoutStage:
    """Upper-cases captions; rejects captions that contain a digit."""

    name = "shout"

    def __init__(self, section: ShoutConfig, seed: int):
        BUILT.append(section.suffix)
        self.section, self.seed = section, seed

    def fingerprint_parts(self) -> dict:
        return {"suffix": self.section.suffix, "seed": self.seed}

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        bad = pc.match_substring_regex(table.column("caption"), r"\d")
        rejects = rejects_table(
            [
                {"stage": "shout", "reason": "digit", "source": s, "pair_id": p}
                for s, p in zip(
                    table.filter(bad).column("source").to_pylist(),
                    table.filter(bad).column("pair_id").to_pylist(),
                    strict=True,
                )
            ]
        )
        kept = table.filter(pc.invert(bad))
        shouted = pc.binary_join_element_wise(
            pc.utf8_upper(kept.column("caption")), self.section.suffix, ""
        )
        return kept.set_column(kept.schema.get_field_index("caption"), "caption", shouted), rejects


def _input(tmp_path):
    rows = [
        {
            "pair_id": f"p{i}",
            "image_id": f"i{i}",
            "person_id": "x",
            "split": "train",
            "image": {"bytes": b"", "path": "a.jpg"},
            "width": 1,
            "height": 1,
            "caption": c,
            "caption_source": "original",
            "source": f"s{i}",
            "generator": "g",
        }
        for i, c in enumerate(["a red coat", "route 66 jacket", "blue jeans"])
    ]
    return run_shard(
        tmp_path, "ingest", "k0", "fp0", lambda: (pairs_table(rows), rejects_table([]))
    )


def test_stage_runs_once_per_fingerprint_and_reuses_its_instance(tmp_path, monkeypatch):
    monkeypatch.setitem(stages.SHARD_STAGES, "shout", "tests.test_stages:ShoutStage")
    monkeypatch.setattr(stages, "_instances", {})
    BUILT.clear()
    shard = _input(tmp_path)
    out = stages.run_shard_stage("shout", ShoutConfig(), 0, shard, tmp_path)
    assert pq.read_table(out.path).column("caption").to_pylist() == ["A RED COAT!", "BLUE JEANS!"]
    assert (out.rows, out.rejected, out.rejects_by_reason) == (2, 1, {"digit": 1})
    again = stages.run_shard_stage("shout", ShoutConfig(), 0, shard, tmp_path)
    assert again.reused and again.path == out.path and BUILT == ["!"]
    other = stages.run_shard_stage("shout", ShoutConfig(suffix="?"), 0, shard, tmp_path)
    assert not other.reused and other.path != out.path and BUILT == ["!", "?"]
    reseeded = stages.run_shard_stage("shout", ShoutConfig(), 1, shard, tmp_path)
    assert reseeded.fingerprint not in (out.fingerprint, other.fingerprint)


def test_unknown_stage_is_named(monkeypatch):
    monkeypatch.setattr(stages, "_instances", {})
    with pytest.raises(KeyError, match="nope"):
        stages.get_shard_stage("nope", ShoutConfig(), 0)

"""The shard-stage protocol: lazy registry, one instance per config, fingerprinted reuse."""

from __future__ import annotations

import importlib

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from pydantic import BaseModel

from pedsynth.codehash import reached_modules
from pedsynth.engines import cache
from pedsynth.schemas.config import BuildConfig
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


@pytest.fixture
def shout_registered(monkeypatch):
    """The registry with one extra shard stage, and no stage instances cached yet."""
    shout = stages.StageEntry("shout", "tests.test_stages:ShoutStage", "shard")
    monkeypatch.setattr(stages, "STAGES", (*stages.STAGES[:-1], shout, stages.STAGES[-1]))
    cache.clear_kind("stage")
    BUILT.clear()
    yield
    cache.clear_kind("stage")


def test_stage_runs_once_per_fingerprint_and_reuses_its_instance(tmp_path, shout_registered):
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


def test_a_code_change_changes_the_fingerprint(tmp_path, shout_registered, monkeypatch):
    shard = _input(tmp_path)
    out = stages.run_shard_stage("shout", ShoutConfig(), 0, shard, tmp_path)
    monkeypatch.setattr(stages, "stage_code_hash", lambda name: "changed")
    redone = stages.run_shard_stage("shout", ShoutConfig(), 0, shard, tmp_path)
    assert not redone.reused and redone.fingerprint != out.fingerprint


def test_registry_order_and_which_stages_run():
    names = [s.name for s in stages.STAGES]
    assert names[0] == "ingest" and names[-1] == "write"
    assert [s.name for s in stages.STAGES if not s.optional] == ["ingest", "write"]
    cfg = BuildConfig.model_validate({"memory": {}, "caption": {"engine": {"model": "m"}}})
    assert [s.name for s in stages.active_stages(cfg)] == ["ingest", "caption", "memory", "write"]
    for entry in stages.STAGES:  # every entry names an importable factory and a config section
        module, _, attr = entry.target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), entry.target
        assert entry.name in BuildConfig.model_fields, entry.name


def test_stage_code_hashes_differ_per_stage_and_skip_the_registry():
    hashes = {s.name: stages.stage_code_hash(s.name) for s in stages.STAGES}
    assert len(set(hashes.values())) == len(hashes)
    assert "pedsynth.tasks.caption" not in reached_modules("pedsynth.tasks.ingest_stage")
    assert "pedsynth.tasks.stages" not in reached_modules("pedsynth.tasks.sources")


def test_unknown_stage_is_named():
    with pytest.raises(KeyError, match="nope"):
        stages.get_stage("nope", ShoutConfig(), 0)

"""The stage protocol between ingest and write, and the registry the flow reads.

A *shard stage* (caption, rewrite, faithfulness, edit, score) maps one pairs shard to one pairs
shard plus rejects: ``stage(table) -> (table, rejects)``. It also names everything its output
depends on (``fingerprint_parts``: config, model ids and revisions, prompt hashes, seed), which
the resume rule hashes together with the input shard's fingerprint. A *dataset stage* (memory)
needs every shard at once. Stages load their models lazily on first call, so building one is
cheap; ``get_shard_stage`` keeps one instance per (stage, config) in each worker process, so a
model is loaded once and reused across shards.
"""

from __future__ import annotations

import importlib
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
from pydantic import BaseModel

from pedsynth.tasks.shards import ShardResult, code_version, fingerprint, read_shard, run_shard


class ShardStage(Protocol):
    name: str

    def fingerprint_parts(self) -> dict[str, Any]: ...

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]: ...


class DatasetStage(Protocol):
    name: str

    def run(self, shards: list[ShardResult], out_dir: str) -> list[ShardResult]: ...


StageFactory = Callable[[BaseModel, int], Any]  # (section config, build seed) -> stage

# name -> "module:factory". Imported on first use, so a build without a model stage never
# imports torch. Later stages add one line here and one config section in schemas/config.py.
SHARD_STAGES: dict[str, str] = {
    "caption": "pedsynth.tasks.caption:build_stage",
    "rewrite": "pedsynth.tasks.rewrite:build_stage",
    "faithfulness": "pedsynth.tasks.faithfulness:build_stage",
    "score": "pedsynth.tasks.score:build_stage",
}
DATASET_STAGES: dict[str, str] = {
    "memory": "pedsynth.tasks.memory:build_stage",
}

_instances: dict[str, ShardStage] = {}
_lock = threading.Lock()


def _factory(registry: dict[str, str], name: str) -> StageFactory:
    if name not in registry:
        raise KeyError(f"no stage named {name!r}; known: {sorted(registry)}")
    module, _, attr = registry[name].partition(":")
    return getattr(importlib.import_module(module), attr)


def build_dataset_stage(name: str, section: BaseModel, seed: int) -> DatasetStage:
    return _factory(DATASET_STAGES, name)(section, seed)


def _key(name: str, section: BaseModel, seed: int) -> str:
    return json.dumps([name, section.model_dump(mode="json"), seed], sort_keys=True)


def get_shard_stage(name: str, section: BaseModel, seed: int) -> ShardStage:
    """The process-wide instance of a stage for this config (built on first use)."""
    key = _key(name, section, seed)
    with _lock:
        if key not in _instances:
            _instances[key] = _factory(SHARD_STAGES, name)(section, seed)
        return _instances[key]


def run_shard_stage(
    name: str, section: BaseModel, seed: int, shard: ShardResult, out_dir: str | Path
) -> ShardResult:
    """One shard through one stage, skipped when its fingerprinted output already exists."""
    stage = get_shard_stage(name, section, seed)
    fp = fingerprint(
        input=shard.fingerprint, stage=name, parts=stage.fingerprint_parts(), code=code_version()
    )
    return run_shard(out_dir, name, shard.key, fp, lambda: stage(read_shard(shard)))

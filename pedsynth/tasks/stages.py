"""The stage contract and the one registry the flow reads.

Every step of a build is a stage, ingest and write included, in two kinds of one contract:

* a **shard stage** maps one shard to one shard plus rejects, ``stage(table) -> (table,
  rejects)``; the flow runs it once per shard, in parallel (ingest, caption, rewrite,
  faithfulness, score);
* a **dataset stage** needs every shard at once, ``stage.run(shards, context) -> shards``
  (memory, write).

Both are built by a factory ``build_stage(section, seed)`` from their config section, load
their models lazily on first call, and name what shapes their output in
``fingerprint_parts()`` (config, model ids and revisions, prompt hashes, seed — not transport
settings). The registry adds the input's fingerprint and a content hash of the stage's code
(:mod:`pedsynth.codehash`), so a rerun reuses exactly the outputs that the same code would
compute again.

Adding a stage is one module with ``build_stage``, one line in :data:`STAGES` (its place in
the pipeline) and one optional config section of the same name in ``schemas/config.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import pyarrow as pa
from pydantic import BaseModel

from pedsynth.codehash import code_hash
from pedsynth.engines.cache import cache_key, cached
from pedsynth.storage import push_committed
from pedsynth.tasks.shards import ShardResult, fingerprint, run_shard

Kind = Literal["shard", "dataset"]


class ShardInput(Protocol):
    """What a shard stage reads: a committed shard, or a slice of a source (ingest)."""

    key: str
    rows: int

    def content_fingerprint(self) -> str: ...

    def read(self) -> pa.Table: ...


class ShardStage(Protocol):
    """A shard stage; one that asks a model may also have ``retry(table, earlier, failed)``,
    which sends again only the slots whose ``source`` is in ``failed`` and returns the whole
    new output (``earlier``'s rows plus the new ones) and the reject rows of those slots."""

    name: str

    def fingerprint_parts(self) -> dict[str, Any]: ...

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]: ...


@dataclass(frozen=True)
class StageContext:
    """What a dataset stage is told about the build besides its input shards."""

    out_dir: str
    fingerprint: str  # of this stage's output: its inputs, its config, its code
    shard_rows: int
    config: dict[str, Any] = field(default_factory=dict)  # the resolved build config
    stages: dict[str, Any] = field(default_factory=dict)  # StageCounts of the stages before
    reject_paths: tuple[str, ...] = ()  # every rejects file written so far
    code_hashes: dict[str, str] = field(default_factory=dict)


class DatasetStage(Protocol):
    name: str

    def fingerprint_parts(self) -> dict[str, Any]: ...

    def run(self, shards: list[ShardResult], context: StageContext) -> list[ShardResult]: ...


@dataclass(frozen=True)
class StageEntry:
    name: str
    target: str  # "module:factory", imported on first use (a build without models never
    # imports torch)
    kind: Kind
    optional: bool = True  # runs only when its config section is present

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]


STAGES: tuple[StageEntry, ...] = (
    StageEntry("ingest", "pedsynth.tasks.ingest_stage:build_stage", "shard", optional=False),
    StageEntry("caption", "pedsynth.tasks.caption:build_stage", "shard"),
    StageEntry("rewrite", "pedsynth.tasks.rewrite:build_stage", "shard"),
    StageEntry("edit", "pedsynth.tasks.edit:build_stage", "shard"),
    StageEntry("faithfulness", "pedsynth.tasks.faithfulness:build_stage", "shard"),
    StageEntry("score", "pedsynth.tasks.score:build_stage", "shard"),
    StageEntry("memory", "pedsynth.tasks.memory:build_stage", "dataset"),
    StageEntry("write", "pedsynth.tasks.write:build_stage", "dataset", optional=False),
)


def entry(name: str) -> StageEntry:
    for item in STAGES:
        if item.name == name:
            return item
    raise KeyError(f"no stage named {name!r}; known: {', '.join(s.name for s in STAGES)}")


def active_stages(config: BaseModel) -> list[StageEntry]:
    """The registry's stages that this build config runs, in pipeline order."""
    return [s for s in STAGES if not s.optional or getattr(config, s.name, None) is not None]


def _factory(name: str) -> Callable[[BaseModel, int], Any]:
    module, _, attr = entry(name).target.partition(":")
    return getattr(importlib.import_module(module), attr)


def get_stage(name: str, section: BaseModel, seed: int) -> Any:
    """The process-wide instance of a stage for this config, built on first use and reused
    across shards (so its models load once per worker)."""
    key = cache_key("stage", name, section.model_dump(mode="json"), seed)
    return cached(key, lambda: _factory(name)(section, seed))


def stage_code_hash(name: str) -> str:
    return code_hash(entry(name).module)


def stage_fingerprint(name: str, stage: Any, input_fingerprint: Any) -> str:
    return fingerprint(
        input=input_fingerprint,
        stage=name,
        parts=stage.fingerprint_parts(),
        code=stage_code_hash(name),
    )


def run_shard_stage(
    name: str, section: BaseModel, seed: int, shard: ShardInput, out_dir: str | Path
) -> ShardResult:
    """One shard through one stage, skipped when its fingerprinted output already exists."""
    stage = get_stage(name, section, seed)
    fp = stage_fingerprint(name, stage, shard.content_fingerprint())
    retry = getattr(stage, "retry", None)
    result = run_shard(
        out_dir,
        name,
        shard.key,
        fp,
        lambda: stage(shard.read()),
        retry=(lambda earlier, failed: retry(shard.read(), earlier, failed)) if retry else None,
    )
    if not result.reused:  # to the store, when the output is one: rejects, then the output
        push_committed(out_dir, result.rejects_path, result.path)
    return result


def run_dataset_stage(
    name: str,
    section: BaseModel,
    seed: int,
    shards: list[ShardResult],
    context: StageContext,
) -> list[ShardResult]:
    """Every shard through one dataset stage; ``context.fingerprint`` is filled in here."""
    stage = get_stage(name, section, seed)
    fp = stage_fingerprint(name, stage, [(s.stage, s.key, s.content_fingerprint()) for s in shards])
    context = dataclasses.replace(context, fingerprint=fp)
    return stage.run(shards, context)

"""The ``build-dataset`` flow: wiring only.

ingest → caption → rewrite → faithfulness → edit → score → memory → write. Each task takes one
shard through one stage and passes back a small ``ShardResult`` (paths and counts), never data.
Stages whose config section is absent are skipped and reported as such.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel

from pedsynth.schemas.config import BuildConfig, IngestConfig, SourceConfig, load_config
from pedsynth.tasks import sources as source_tasks
from pedsynth.tasks import stages as stage_registry
from pedsynth.tasks import write
from pedsynth.tasks.shards import ShardResult

STAGES = ("ingest", "caption", "rewrite", "faithfulness", "edit", "score", "memory", "write")

# Resume is by output fingerprint (tasks/shards.py), which survives a lost Prefect database;
# Prefect's own result cache is therefore off for these tasks.


@task(name="catalog-source", cache_policy=NO_CACHE)
def catalog_source(source: SourceConfig, out: str, shard_rows: int):
    return source_tasks.plan_chunks(source, out, shard_rows)


@task(name="ingest-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def ingest_shard(chunk: source_tasks.Chunk, cfg: IngestConfig, out: str) -> ShardResult:
    return source_tasks.ingest_chunk(chunk, cfg, out)


@task(name="stage-shard", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def shard_stage(
    name: str, section: BaseModel, seed: int, shard: ShardResult, out: str
) -> ShardResult:
    return stage_registry.run_shard_stage(name, section, seed, shard, out)


@task(name="dataset-stage", cache_policy=NO_CACHE)
def dataset_stage(
    name: str, section: BaseModel, seed: int, shards: list[ShardResult], out: str
) -> list[ShardResult]:
    return stage_registry.build_dataset_stage(name, section, seed).run(shards, out)


@task(name="write-dataset", cache_policy=NO_CACHE)
def write_dataset(
    out: str,
    inputs: list[ShardResult],
    reject_paths: list[str],
    shard_rows: int,
    config: dict,
    stages: dict,
) -> dict:
    return write.write_dataset(
        out, inputs, reject_paths, shard_rows=shard_rows, config=config, stages=stages
    )


class _Progress:
    """One progress report for the Prefect UI (an artifact) and, from the CLI, the terminal."""

    def __init__(self, total: int, show_bar: bool):
        self.total, self.done = max(total, 1), 0
        self.artifact_id = create_progress_artifact(
            progress=0.0, key="build-dataset-progress", description="shards through all stages"
        )
        self.bar = None
        if show_bar:
            from rich.progress import Progress

            self.bar = Progress(transient=False)
            self.bar.start()
            self.bar_task = self.bar.add_task("building", total=self.total)

    def step(self, label: str) -> None:
        self.done += 1
        update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
        if self.bar is not None:
            self.bar.update(self.bar_task, advance=1, description=label)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _collect(futures: Iterable[PrefectFuture], progress: _Progress, label: str) -> list:
    """Wait for all futures, report each as it finishes, and return results in input order."""
    futures = list(futures)
    for fut in as_completed(futures):
        fut.result()  # raise early on the first failure
        progress.step(label)
    return [f.result() for f in futures]


def _stage_counts(results: list[ShardResult], upstream: list[ShardResult] = ()) -> dict:
    """Counts of one stage; ``upstream`` adds rejects found before its shards existed."""
    reasons: dict[str, int] = defaultdict(int)
    for r in [*results, *upstream]:
        for reason, n in r.rejects_by_reason.items():
            reasons[reason] += n
    return {
        "shards": len(results),
        "reused": sum(r.reused for r in results),
        "rows_out": sum(r.rows for r in results),
        "rejected": sum(r.rejected for r in [*results, *upstream]),
        "rejects_by_reason": dict(sorted(reasons.items())),
    }


@flow(name="build-dataset", log_prints=True)
def build_dataset(
    config: str | None = "configs/offline-tiny.yaml",
    sources: list[str] | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
    show_progress: bool = False,
) -> dict:
    """Build a pedsynth dataset; returns the manifest (also written to ``OUT/manifest.json``).

    ``sources`` takes ``FORMAT:PATH`` strings and replaces the config's sources; ``overrides``
    takes ``key.sub=value`` strings applied on top of the config file.
    """
    logger = get_run_logger()
    cfg: BuildConfig = load_config(config, sources=sources, out=out, overrides=overrides)
    if not cfg.sources:
        raise ValueError("no sources: give --source FORMAT:PATH or a `sources:` list in the config")
    active = [s for s in STAGES[1:-1] if getattr(cfg, s, None) is not None]
    logger.info(
        "build %r → %s; stages: ingest, %s write (skipped: %s)",
        cfg.name,
        cfg.out,
        "".join(f"{s}, " for s in active),
        ", ".join(s for s in STAGES[1:-1] if s not in active) or "none",
    )

    with ThreadPoolTaskRunner(max_workers=cfg.workers) as runner:
        plans = [
            runner.submit(
                catalog_source, {"source": s, "out": cfg.out, "shard_rows": cfg.shard_rows}
            )
            for s in cfg.sources
        ]
        plans = [p.result() for p in plans]
        chunks = [c for chunk_list, _ in plans for c in chunk_list]
        catalogs = [cat for _, cat in plans if cat is not None]
        progress = _Progress(total=len(chunks) * (1 + len(active)) + 1, show_bar=show_progress)
        try:
            shards = _collect(
                (
                    runner.submit(ingest_shard, {"chunk": c, "cfg": cfg.ingest, "out": cfg.out})
                    for c in chunks
                ),
                progress,
                "ingest",
            )
            stages = {"ingest": _stage_counts(shards, upstream=catalogs)}
            reject_paths = [r.rejects_path for r in [*catalogs, *shards]]
            for name in active:
                section = getattr(cfg, name)
                if name in stage_registry.DATASET_STAGES:
                    shards = runner.submit(
                        dataset_stage,
                        {
                            "name": name,
                            "section": section,
                            "seed": cfg.seed,
                            "shards": shards,
                            "out": cfg.out,
                        },
                    ).result()
                    for _ in range(len(chunks)):
                        progress.step(name)
                else:
                    shards = _collect(
                        (
                            runner.submit(
                                shard_stage,
                                {
                                    "name": name,
                                    "section": section,
                                    "seed": cfg.seed,
                                    "shard": shard,
                                    "out": cfg.out,
                                },
                            )
                            for shard in shards
                        ),
                        progress,
                        name,
                    )
                stages[name] = _stage_counts(shards)
                reject_paths += [r.rejects_path for r in shards]
            manifest = runner.submit(
                write_dataset,
                {
                    "out": cfg.out,
                    "inputs": shards,
                    "reject_paths": reject_paths,
                    "shard_rows": cfg.shard_rows,
                    "config": cfg.model_dump(mode="json"),
                    "stages": stages,
                },
            ).result()
            progress.step("write")
        finally:
            progress.close()

    _publish(manifest)
    return manifest


def _publish(manifest: dict) -> None:
    """Per-stage counts and totals as Prefect artifacts, and a one-line log summary."""
    rows = [
        {
            "stage": name,
            **{k: v for k, v in counts.items() if k != "rejects_by_reason"},
            "rejects_by_reason": ", ".join(
                f"{k}={v}" for k, v in counts.get("rejects_by_reason", {}).items()
            ),
        }
        for name, counts in manifest["stages"].items()
    ]
    create_table_artifact(
        table=rows,
        key="build-dataset-stage-counts",
        description=f"per-stage counts of {manifest['name']}",
    )
    totals = manifest["totals"]
    split_rows = "\n".join(
        f"| {s} | {v['pairs']} | {v['images']} | {v['identities']} |"
        for s, v in totals["by_split"].items()
    )
    create_markdown_artifact(
        key="build-dataset-summary",
        markdown=(
            f"# {manifest['name']}\n\n{totals['pairs']} pairs, {totals['images']} images, "
            f"{totals['identities']} identities, {totals['rejects']} rejects"
            f"{' (reused: nothing to do)' if manifest.get('reused') else ''}\n\n"
            "| split | pairs | images | identities |\n|---|---|---|---|\n" + split_rows
        ),
    )
    get_run_logger().info(
        "wrote %d pairs in %d shards, %d rejects%s",
        totals["pairs"],
        len(manifest["shards"]),
        totals["rejects"],
        " (already built: nothing to do)" if manifest.get("reused") else "",
    )

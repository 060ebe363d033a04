"""The ``build-dataset`` flow: plan the sources, then a loop over the configured stages.

Each task takes one shard through one shard stage (or every shard through one dataset stage)
and passes back small ``ShardResult``s (paths and counts), never data. Which stages run, and in
what order, is the registry's (``pedsynth/tasks/stages.py``); which task runner runs them is the
config's (``runner``). Task runs are named ``<stage>-<shard>`` so the run graph reads by itself.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable

import pyarrow.parquet as pq
from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture, as_completed
from pydantic import BaseModel

from pedsynth import storage
from pedsynth.errors import FailureBudgetExceeded
from pedsynth.lock import locks_output
from pedsynth.redact import install_log_redaction
from pedsynth.runners import LoadReport, engine_loads, reporting_loads, stage_options, task_runner
from pedsynth.schemas.config import BuildConfig, SourceConfig, StorageConfig, load_config
from pedsynth.schemas.manifest import Manifest, StageCounts
from pedsynth.tasks import sources as source_tasks
from pedsynth.tasks import stages as registry
from pedsynth.tasks.shards import FAILURE_REASONS, MAX_ATTEMPTS, WORK_DIR, ShardResult

# Resume is by output fingerprint (tasks/shards.py), which survives a lost Prefect database;
# Prefect's own result cache is therefore off for these tasks.


@task(name="catalog", cache_policy=NO_CACHE)
def catalog_source(source: SourceConfig, out: str, shard_rows: int, store: StorageConfig):
    if storage.is_url(source.path):  # read from a local mirror of the store's files
        local = storage.sync_source(source.path, store.cache_dir, store.credentials_block)
        source = source.model_copy(update={"path": str(local)})
    return source_tasks.plan_chunks(source, out, shard_rows)


# Stage tasks also report the model loads they caused on their worker (runners.py).
@task(name="shard-stage", cache_policy=NO_CACHE, retries=1, retry_delay_seconds=5)
def shard_stage(
    name: str, section: BaseModel, seed: int, shard: registry.ShardInput, out: str
) -> tuple[ShardResult, LoadReport]:
    return reporting_loads(registry.run_shard_stage, name, section, seed, shard, out)


@task(name="dataset-stage", cache_policy=NO_CACHE)
def dataset_stage(
    name: str,
    section: BaseModel,
    seed: int,
    shards: list[ShardResult],
    context: registry.StageContext,
) -> tuple[list[ShardResult], LoadReport]:
    return reporting_loads(registry.run_dataset_stage, name, section, seed, shards, context)


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

    def step(self, label: str, n: int = 1) -> None:
        self.done += n
        update_progress_artifact(self.artifact_id, progress=100.0 * self.done / self.total)
        if self.bar is not None:
            self.bar.update(self.bar_task, advance=n, description=label)

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


def _out_of(config, sources, out, overrides, **_) -> str | tuple[str, str, str | None]:
    """What the lock covers: the output folder; for a URL, its local working folder and the
    store's lock object."""
    cfg = load_config(config, sources=sources, out=out, overrides=overrides)
    work = str(storage.working_folder(cfg.out, cfg.storage.cache_dir))
    if not storage.is_url(cfg.out):
        return work
    return work, cfg.out, cfg.storage.credentials_block


@flow(name="build-dataset", log_prints=True)
@locks_output(_out_of)  # one build per output folder (pedsynth/lock.py)
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
    install_log_redaction()  # a worker process may never pass through the CLI
    logger = get_run_logger()
    cfg: BuildConfig = load_config(config, sources=sources, out=out, overrides=overrides)
    if not cfg.sources:
        raise ValueError("no sources: give --source FORMAT:PATH or a `sources:` list in the config")
    stages = registry.active_stages(cfg)
    skipped = [s.name for s in registry.STAGES if s not in stages]
    logger.info(
        "build %r → %s; stages: %s (skipped: %s)",
        cfg.name,
        cfg.out,
        ", ".join(s.name for s in stages),
        ", ".join(skipped) or "none",
    )
    mirror = storage.open_output(cfg.out, cfg.storage.cache_dir, cfg.storage.credentials_block)
    work = str(storage.working_folder(cfg.out, cfg.storage.cache_dir))  # what stages write
    counts: dict[str, StageCounts] = {}
    code_hashes = {s.name: registry.stage_code_hash(s.name) for s in stages}

    with task_runner(cfg) as runner:
        with stage_options(cfg, "catalog"):
            plans = [
                runner.submit(
                    catalog_source.with_options(task_run_name=f"catalog-{s.label}"),
                    {
                        "source": s,
                        "out": work,
                        "shard_rows": cfg.shard_rows,
                        "store": cfg.storage,
                    },
                )
                for s in cfg.sources
            ]
        plans = [p.result() for p in plans]
        if mirror is not None:
            mirror.sync_up(WORK_DIR)
        shards: list = [c for chunk_list, _ in plans for c in chunk_list]
        catalogs = [cat for _, cat in plans if cat is not None]
        reject_paths = [c.rejects_path for c in catalogs]
        progress = _Progress(total=len(shards) * len(stages), show_bar=show_progress)
        try:
            for stage in stages:
                section = getattr(cfg, stage.name)
                rows_in, started, n_inputs = (
                    sum(s.rows for s in shards),
                    time.monotonic(),
                    len(shards),
                )
                if stage.kind == "shard":
                    with stage_options(cfg, stage.name):  # its resources reach the runner
                        futures = [
                            runner.submit(
                                shard_stage.with_options(task_run_name=f"{stage.name}-{s.key}"),
                                {
                                    "name": stage.name,
                                    "section": section,
                                    "seed": cfg.seed,
                                    "shard": s,
                                    "out": work,
                                },
                            )
                            for s in shards
                        ]
                    done = _collect(futures, progress, stage.name)
                    shards, reports = [r for r, _ in done], [report for _, report in done]
                else:
                    context = registry.StageContext(
                        out_dir=work,
                        fingerprint="",
                        shard_rows=cfg.shard_rows,
                        config=cfg.model_dump(mode="json"),
                        stages=dict(counts),
                        reject_paths=tuple(reject_paths),
                        code_hashes=code_hashes,
                    )
                    with stage_options(cfg, stage.name):
                        future = runner.submit(
                            dataset_stage.with_options(task_run_name=stage.name),
                            {
                                "name": stage.name,
                                "section": section,
                                "seed": cfg.seed,
                                "shards": shards,
                                "context": context,
                            },
                        )
                    shards, report = future.result()
                    reports = [report]
                    progress.step(stage.name, n_inputs)
                counts[stage.name] = StageCounts.of(
                    shards,
                    rows_in=rows_in,
                    seconds=time.monotonic() - started,
                    upstream=catalogs if stage.name == "ingest" else (),
                ).model_copy(update={"engine_loads": engine_loads(reports)})
                reject_paths += [s.rejects_path for s in shards if s.rejects_path]
                if mirror is not None:  # what a killed upload left out goes up now
                    mirror.sync_up(WORK_DIR)
                check_failure_budget(stage.name, counts[stage.name], shards, cfg.max_failure_rate)
        finally:
            progress.close()

    manifest = Manifest.load(work)
    if manifest is None:
        raise RuntimeError(f"the write stage left no manifest in {work}")
    if mirror is not None:  # the store's copy, verified there, then its `latest`
        mirror.publish(manifest.version)
    reused = all(s.reused for s in shards) and bool(shards)
    if reused:  # report what this run did (nothing), not the counts of the run that built it
        manifest = manifest.model_copy(update={"stages": counts})
    _publish(manifest, reused)
    return {**manifest.model_dump(mode="json"), "reused": reused}


def failure_summary(shards: list[ShardResult], top: int = 3) -> str:
    """The most common causes of a stage's failures, from the reason each detail starts with."""
    causes: Counter[str] = Counter()
    for s in shards:
        if s.failed:
            rows = pq.read_table(s.rejects_path, columns=["reason", "detail"]).to_pylist()
            for row in rows:
                if row["reason"] in FAILURE_REASONS:
                    causes[(row["detail"] or row["reason"]).split(":", 1)[0].strip()] += 1
    return ", ".join(f"{cause} ×{n}" for cause, n in causes.most_common(top))


def check_failure_budget(
    name: str, counts: StageCounts, shards: list[ShardResult], budget: float
) -> None:
    """Fail the build when a stage failed more of its requests than ``budget``; warn below."""
    if not counts.failed:
        return
    share = counts.failure_rate or 0.0
    message = (
        f"{name}: {counts.failed} of {counts.requests} requests failed ({share:.1%}; "
        f"max_failure_rate {budget:.1%}): {failure_summary(shards)}"
    )
    if share > budget:
        raise FailureBudgetExceeded(
            f"{message}. Fix the engine and run the same command again: shards with failures "
            f"are sent again (up to {MAX_ATTEMPTS} runs), finished ones are kept."
        )
    get_run_logger().warning("%s; the next run sends the failed requests again", message)


def _publish(manifest: Manifest, reused: bool) -> None:
    """Per-stage counts and totals as Prefect artifacts, and a one-line log summary."""
    rows = [
        {
            "stage": name,
            **counts.model_dump(mode="json", exclude={"rejects_by_reason"}),
            "rejects_by_reason": ", ".join(f"{k}={v}" for k, v in counts.rejects_by_reason.items()),
        }
        for name, counts in manifest.stages.items()
    ]
    create_table_artifact(
        table=rows,
        key="build-dataset-stage-counts",
        description=f"per-stage counts of {manifest.name}",
    )
    totals = manifest.totals
    failures = "".join(
        f"\n\n**warning**: {name}: {c.failed} of {c.requests} requests failed "
        f"({c.failure_rate:.1%}); the next run sends them again"
        for name, c in manifest.stages.items()
        if c.failed
    )
    split_rows = "\n".join(
        f"| {s} | {v.pairs} | {v.images} | {v.identities} |" for s, v in totals.by_split.items()
    )
    create_markdown_artifact(
        key="build-dataset-summary",
        markdown=(
            f"# {manifest.name}\n\n{totals.pairs} pairs, {totals.images} images, "
            f"{totals.identities} identities, {totals.rejects} rejects"
            f"{' (reused: nothing to do)' if reused else ''}{failures}\n\n"
            "| split | pairs | images | identities |\n|---|---|---|---|\n" + split_rows
        ),
    )
    get_run_logger().info(
        "wrote %d pairs in %d shards, %d rejects%s",
        totals.pairs,
        len(manifest.shards),
        totals.rejects,
        " (already built: nothing to do)" if reused else "",
    )

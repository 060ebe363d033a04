"""Task runners by config name: how a build's tasks are executed, kept apart from the stages.

The flow asks :func:`task_runner` for the runner its config names (``runner:``) and submits
every task through it; stages never know which one runs them. Adding a runner is one entry in
:data:`RUNNERS`.

``runner: ray`` runs the same tasks through prefect-ray's ``RayTaskRunner``. The flow submits
each stage's tasks inside :func:`stage_options`, which hands that stage's resources to Ray
(``num_cpus``, ``num_gpus``, ``memory``): Ray starts a task only where they are free, so no
more shards of a stage are in flight than its workers can hold, and CPU stages never hold a
GPU. Models stay loaded across shards because Ray reuses its worker processes and the model
cache (:mod:`pedsynth.engines.cache`) lives in the process; GPU tasks set ``max_calls=0``,
since Ray's default for them (one task per worker process) would reload every model for every
shard. Each task reports the loads it caused (:func:`reporting_loads`), and the flow records
them per stage and worker (:func:`engine_loads`) in the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from pedsynth.engines import cache
from pedsynth.redact import install_log_redaction


def _thread_pool(cfg: Any) -> TaskRunner:
    # Bounded: ThreadPoolTaskRunner() without max_workers is unbounded.
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


def _ray(cfg: Any) -> TaskRunner:
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise RuntimeError("runner: ray needs prefect-ray: pip install 'pedsynth[ray]'") from exc
    for name in _stage_names(cfg):
        stage_resources(cfg, name)  # refuse a placement that cannot fit before Ray starts
    ray_cfg = cfg.ray
    init_kwargs: dict[str, Any] = {"namespace": "pedsynth"}
    if ray_cfg.address is None:  # a local instance for this build
        init_kwargs |= {
            "num_cpus": ray_cfg.num_cpus or cfg.workers,
            "include_dashboard": False,
        }
        if ray_cfg.num_gpus is not None:
            init_kwargs["num_gpus"] = ray_cfg.num_gpus
    return RayTaskRunner(address=ray_cfg.address, init_kwargs=init_kwargs)


RUNNERS: dict[str, Callable[[Any], TaskRunner]] = {"thread": _thread_pool, "ray": _ray}


def task_runner(cfg: Any) -> TaskRunner:
    """A new, unstarted task runner for a build config (use it as a context manager)."""
    try:
        make = RUNNERS[cfg.runner]
    except KeyError:
        raise ValueError(f"runner {cfg.runner!r}: one of {', '.join(sorted(RUNNERS))}") from None
    return make(cfg)


# ------------------------------------------------------------------ per-stage resources


def _stage_names(cfg: Any) -> list[str]:
    from pedsynth.tasks.stages import active_stages

    return ["catalog", *(s.name for s in active_stages(cfg))]


def _engines(section: Any) -> list[Any]:
    """The engine configs of a stage section (any field holding an ``EngineConfig``)."""
    from pedsynth.schemas.text import EngineConfig

    if section is None:
        return []
    return [
        getattr(section, key)
        for key in type(section).model_fields
        if isinstance(getattr(section, key), EngineConfig)
    ]


def engine_gpus(section: Any) -> int:
    """GPUs one task of a stage needs on one node: the largest of its engines' needs."""
    need = 0
    for engine in _engines(section):
        if engine.backend == "vllm":
            need = max(need, engine.vllm.tensor_parallel_size)
        elif engine.backend == "transformers" and str(engine.device).startswith("cuda"):
            need = max(need, 1)
    return need


def stage_resources(cfg: Any, name: str) -> dict[str, Any]:
    """The Ray ``remote`` options of one task of stage ``name`` (``catalog`` included)."""
    asked = cfg.ray.stages.get(name)
    needed = engine_gpus(getattr(cfg, name, None))
    num_gpus = needed if asked is None or asked.num_gpus is None else asked.num_gpus
    if num_gpus < needed:  # a tensor-parallel engine must get all its GPUs on one node
        raise ValueError(
            f"ray.stages.{name}.num_gpus = {num_gpus}: the stage's engine needs {needed} GPUs "
            "on one node (tensor_parallel_size); ask for at least that many"
        )
    options: dict[str, Any] = {
        "num_cpus": 1 if asked is None else asked.num_cpus,
        "num_gpus": num_gpus,
        "max_retries": cfg.ray.max_retries,
    }
    if asked is not None and asked.memory is not None:
        options["memory"] = asked.memory
    if num_gpus:
        options["max_calls"] = 0  # keep the worker (and its loaded models) across shards
    return options


@contextlib.contextmanager
def stage_options(cfg: Any, name: str) -> Iterator[None]:
    """Around the submits of one stage: its resources reach Ray (other runners: nothing)."""
    if cfg.runner != "ray":
        yield
        return
    from prefect_ray.context import remote_options

    with remote_options(**stage_resources(cfg, name)):
        yield


# ------------------------------------------------------------------ engine loads per worker


@dataclass(frozen=True)
class LoadReport:
    """The model cache's load counts of one worker process before and after one task."""

    where: str  # host:pid
    before: dict[str, int]
    after: dict[str, int]


def reporting_loads(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, LoadReport]:
    """``fn(*args, **kwargs)`` and the report of the loads this worker's cache made meanwhile.

    Log redaction is installed first: a Ray worker process never passes through the CLI."""
    install_log_redaction()
    before = cache.load_counts()
    value = fn(*args, **kwargs)
    return value, LoadReport(cache.where(), before, cache.load_counts())


def engine_label(key: str) -> str:
    """A short, readable name for a model cache key: its leading names, the model, a hash."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    try:
        parts = json.loads(key)
    except ValueError:
        return f"{key[:40]}#{digest}"
    parts = parts if isinstance(parts, list) else [parts]
    names = [str(p) for p in parts if isinstance(p, str | int) and not isinstance(p, bool)]
    models = [p["model"] for p in parts if isinstance(p, dict) and isinstance(p.get("model"), str)]
    return f"{':'.join(names + models[:1])}#{digest}"


def engine_loads(reports: Iterable[LoadReport]) -> dict[str, dict[str, int]]:
    """Loads per worker and engine during a stage's tasks: on each worker, the last count
    seen minus the first (tasks of one stage may overlap on one worker; counts only grow)."""
    first: dict[tuple[str, str], int] = {}
    last: dict[tuple[str, str], int] = {}
    for report in reports:
        for key in report.before.keys() | report.after.keys():
            slot = (report.where, key)
            first[slot] = min(first.get(slot, 1 << 62), report.before.get(key, 0))
            last[slot] = max(last.get(slot, 0), report.after.get(key, 0))
    loads: dict[str, dict[str, int]] = {}
    for (where, key), end in sorted(last.items()):
        if end > first[(where, key)]:
            loads.setdefault(where, {})[engine_label(key)] = end - first[(where, key)]
    return loads

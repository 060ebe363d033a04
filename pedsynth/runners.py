"""Task runners by config name: how a build's tasks are executed, kept apart from the stages.

The flow asks :func:`task_runner` for the runner its config names (``runner:``) and submits
every task through it; stages never know which one runs them. Adding a runner is one entry in
:data:`RUNNERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner


def _thread_pool(cfg: Any) -> TaskRunner:
    # Bounded: ThreadPoolTaskRunner() without max_workers is unbounded.
    return ThreadPoolTaskRunner(max_workers=cfg.workers)


RUNNERS: dict[str, Callable[[Any], TaskRunner]] = {"thread": _thread_pool}


def task_runner(cfg: Any) -> TaskRunner:
    """A new, unstarted task runner for a build config (use it as a context manager)."""
    try:
        make = RUNNERS[cfg.runner]
    except KeyError:
        raise ValueError(f"runner {cfg.runner!r}: one of {', '.join(sorted(RUNNERS))}") from None
    return make(cfg)

"""The one process-wide model cache: each model is loaded once per worker process and reused.

Prefect tasks are short-lived and models are not, so every engine (generators, the sentence
embedder, CLIP, stage instances holding them) is fetched through :func:`cached`. Two threads
asking for the same key at once build it once; different keys build in parallel. The cache
counts loads per key, so a build can report how often each engine was loaded and where.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

_values: dict[str, Any] = {}
_loads: dict[str, int] = {}
_lock = threading.Lock()
_build_locks: dict[str, threading.Lock] = {}


def cache_key(kind: str, *parts: Any) -> str:
    """A stable key from JSON-able parts (pydantic models: pass ``model_dump(mode="json")``)."""
    return json.dumps([kind, *parts], sort_keys=True, default=str, separators=(",", ":"))


def cached(key: str, build: Callable[[], T]) -> T:
    """The value stored under ``key``, built by ``build()`` on first use."""
    with _lock:
        if key in _values:
            return _values[key]
        build_lock = _build_locks.setdefault(key, threading.Lock())
    with build_lock:
        with _lock:
            if key in _values:
                return _values[key]
        value = build()
        with _lock:
            _values[key] = value
            _loads[key] = _loads.get(key, 0) + 1
        return value


def load_counts() -> dict[str, int]:
    """How many times each key was built in this process (1 each, unless cleared in between)."""
    with _lock:
        return dict(_loads)


def where() -> str:
    """``host:pid`` of this process, for reports of where engines were loaded."""
    return f"{socket.gethostname()}:{os.getpid()}"


def clear(prefix: str = "") -> None:
    """Forget cached values whose key starts with ``prefix`` (all by default): tests, or to
    free accelerator memory between builds. Load counts are kept."""
    with _lock:
        for key in [k for k in _values if k.startswith(prefix)]:
            del _values[key]
            _build_locks.pop(key, None)


def clear_kind(kind: str) -> None:
    """Forget every cached value of one kind (``cache_key(kind, ...)``)."""
    clear(cache_key(kind)[:-1] + ",")

"""One build at a time per output folder: an exclusive lock file ``OUT/.pedsynth.lock``.

The lock file is created with ``O_CREAT | O_EXCL`` and holds JSON ``{host, pid, started,
flow_run_id}``; its holder also keeps an ``fcntl.flock`` on it, which the kernel drops when the
holder dies however it dies. A second build on the same output refuses at once with a line
naming the holder, or waits (``pedsynth build --wait``). A lock whose holder is gone (the flock
is free, or the pid is not alive on this host) is recovered with a warning. The lock is
re-entrant within a process, so the command line and the flow can both ask for it.
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pedsynth.errors import PreflightError

log = logging.getLogger(__name__)

LOCK_FILE = ".pedsynth.lock"
_CREATING_GRACE_S = 5.0  # an empty lock file younger than this is being written by its creator

F = TypeVar("F", bound=Callable[..., Any])

_held: dict[str, tuple[int, int]] = {}  # resolved lock path -> (fd, depth), this process
_guard = threading.Lock()


def lock_path(out: str | Path) -> Path:
    return Path(out) / LOCK_FILE


def read_holder(out: str | Path) -> dict | None:
    """What the lock file says about its holder, or None when there is no readable one."""
    try:
        return json.loads(lock_path(out).read_text() or "null")
    except (OSError, ValueError):
        return None


def describe_holder(out: str | Path, holder: dict | None) -> str:
    if not holder:
        return f"{out} is being built by another process (its lock file {lock_path(out)} is empty)"
    run = f" (flow run {holder['flow_run_id']})" if holder.get("flow_run_id") else ""
    return (
        f"{out} is being built by pid {holder.get('pid')} on host {holder.get('host')} "
        f"since {holder.get('started')}{run}"
    )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_info(fd: int, **extra: object) -> None:
    info = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "flow_run_id": None,
        **extra,
    }
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.stat(path).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _try_acquire(path: Path) -> tuple[int | None, dict | None]:
    """One attempt: ``(fd, None)`` when this process now holds the lock, else ``(None, holder)``."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o644)
    except FileExistsError:
        pass
    else:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a racer may hold it for an instant, then retries
        _write_info(fd)
        return fd, None
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None, None  # released meanwhile: try again
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = read_holder(path.parent)
        os.close(fd)
        if holder and holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid") or 0)
            if pid > 0 and pid != os.getpid() and not _pid_alive(pid):
                # The flock is held by a process the dead holder left behind (a forked
                # worker): the build itself is gone, so its lock is taken over.
                log.warning("%s; that process is gone: taking its lock over", _stale(path, holder))
                _reap(holder)
                path.unlink(missing_ok=True)
                return None, None
        return None, holder or {}
    if not _same_file(fd, path):  # the holder released (removed) it between open and flock
        os.close(fd)
        return None, None
    holder = read_holder(path.parent)
    if holder is None and time.time() - os.fstat(fd).st_mtime < _CREATING_GRACE_S:
        os.close(fd)  # its creator is still writing it
        return None, {}
    log.warning("%s; that process is gone: recovering its lock", _stale(path, holder))
    _reap(holder)
    _write_info(fd)
    return fd, None


def _reap(holder: dict | None) -> None:
    from pedsynth.server_process import reap

    reap(holder)


def _stale(path: Path, holder: dict | None) -> str:
    return f"{path}: a lock left by {describe_holder(path.parent, holder).split(' by ', 1)[1]}"


def acquire(out: str | Path, *, wait: bool = False, poll_s: float = 0.5) -> Path:
    """Take the lock on ``out`` (re-entrant in this process); refuse or wait when it is held."""
    Path(out).mkdir(parents=True, exist_ok=True)
    path = lock_path(out).resolve()
    with _guard:
        if str(path) in _held:
            fd, depth = _held[str(path)]
            _held[str(path)] = (fd, depth + 1)
            return path
    announced = False
    while True:
        fd, holder = _try_acquire(path)
        if fd is not None:
            with _guard:
                _held[str(path)] = (fd, 1)
            return path
        if holder is None:
            continue  # the file changed under us: look again at once
        if not wait:
            raise PreflightError(f"{describe_holder(out, holder)}; pass --wait to wait")
        if not announced:
            log.warning("%s; waiting for it to finish", describe_holder(out, holder))
            announced = True
        time.sleep(poll_s)


def release(out: str | Path) -> None:
    """Give back one level of the lock; the last one removes the lock file."""
    path = lock_path(out).resolve()
    with _guard:
        if str(path) not in _held:
            return
        fd, depth = _held[str(path)]
        if depth > 1:
            _held[str(path)] = (fd, depth - 1)
            return
        del _held[str(path)]
    try:
        if _same_file(fd, path):
            path.unlink(missing_ok=True)  # before the flock goes, so no one recovers it
    finally:
        os.close(fd)


def note(out: str | Path, **fields: object) -> None:
    """Add ``fields`` (``flow_run_id``, a server's pid) to the lock this process holds."""
    path = lock_path(out).resolve()
    with _guard:
        entry = _held.get(str(path))
        if entry is None:
            return
        info = read_holder(out) or {}
        info.update(fields)
        _write_info(entry[0], **{k: v for k, v in info.items() if k not in ("host", "pid")})


def held(out: str | Path) -> bool:
    with _guard:
        return str(lock_path(out).resolve()) in _held


@contextmanager
def build_lock(out: str | Path, *, wait: bool = False) -> Iterator[Path]:
    """Hold the lock on ``out`` for the ``with`` block, releasing it on every way out."""
    path = acquire(out, wait=wait)
    try:
        yield path
    finally:
        release(out)


STORE_STALE_S = 600.0  # a store lock whose heartbeat is older than this was left by a dead build
STORE_HEARTBEAT_S = 60.0


class _StoreLock:
    """One build at a time on an output in an object store, across machines: a lock object
    ``OUT/.pedsynth.lock`` created only if absent (S3 ``If-None-Match``: the store decides who
    wins a race), holding the holder's host, pid, flow run and a heartbeat its holder rewrites
    every minute. A lock whose holder is a dead pid on this host, or whose heartbeat stopped
    ``STORE_STALE_S`` ago, is recovered with a warning."""

    def __init__(self, url: str, credentials_block: str | None):
        from pedsynth.storage import url_fs

        self.url = url.rstrip("/")
        self.fs, root = url_fs(url, credentials_block)
        self.path = f"{root.rstrip('/')}/{LOCK_FILE}"
        self.info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "flow_run_id": _flow_run_id(),
        }
        self._stop = threading.Event()

    def _record(self) -> bytes:
        return json.dumps({**self.info, "heartbeat": time.time()}).encode()

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            pid = int(holder.get("pid") or 0)
            if pid > 0 and not _pid_alive(pid):
                return True
        return time.time() - float(holder.get("heartbeat") or 0) > STORE_STALE_S

    def acquire(self, wait: bool, poll_s: float = 5.0) -> None:
        announced = False
        while True:
            try:
                self.fs.pipe_file(self.path, self._record(), mode="create")
                break
            except (FileExistsError, OSError):
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                what = describe_holder(self.url, holder)
                if self._stale(holder):
                    log.warning("%s: a lock left by a build that is gone; recovering it", what)
                    self.fs.rm_file(self.path)
                    continue
                if not wait:
                    raise PreflightError(f"{what}; pass --wait to wait") from None
                if not announced:
                    log.warning("%s; waiting for it to finish", what)
                    announced = True
                time.sleep(poll_s)
        threading.Thread(target=self._beat, daemon=True, name="store-lock").start()

    def _beat(self) -> None:
        while not self._stop.wait(STORE_HEARTBEAT_S):
            self.fs.pipe_file(self.path, self._record())

    def release(self) -> None:
        self._stop.set()
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == self.info["host"]:
            self.fs.rm_file(self.path)


@contextmanager
def store_lock(url: str, credentials_block: str | None = None, *, wait: bool = False):
    """Hold the lock object of an output in a store for the ``with`` block."""
    lock = _StoreLock(url, credentials_block)
    lock.acquire(wait)
    try:
        yield lock
    finally:
        lock.release()


def locks_output(out_of: Callable[..., Any]) -> Callable[[F], F]:
    """Decorate a flow function so that it runs holding the lock on the output that
    ``out_of(**its parameters)`` names (a deployment run refuses like the command line does),
    and so that the lock file names its flow run. ``out_of`` returns the local folder, or
    ``(working folder, store URL, credentials block)`` for an output in a store, whose lock
    object is then held too."""

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            target = out_of(**bound.arguments)
            out, url, block = target if isinstance(target, tuple) else (target, None, None)
            with build_lock(out):
                note(out, flow_run_id=_flow_run_id())
                if url is None:
                    return fn(*args, **kwargs)
                with store_lock(url, block):
                    return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def _flow_run_id() -> str | None:
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # outside a flow run
        return None

"""The temporary Prefect server of a command, started so that it dies with the command.

Without ``PREFECT_API_URL`` Prefect starts a temporary server itself (``SubprocessASGIServer``
in ``prefect/server/api/server.py``: ``python -m uvicorn ... prefect.server.api.server:
create_app``) and stops it at exit, but only at a normal exit: a ``kill -9`` of the command
leaves the server running (a uvicorn process of ~200 MB with its port open), and nightly runs
pile them up. :func:`own_ephemeral_server` starts the same server the same way, except that the
child first asks Linux for a parent-death signal (``prctl(PR_SET_PDEATHSIG)``) and then
``exec``s uvicorn, and points this process's Prefect at it. Its pid is also written into the
output's lock file, so the next build on that output stops a server a dead one left behind
(on systems without ``prctl``): see :func:`reap`.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
APP = "prefect.server.api.server:create_app"


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _uvicorn_args(port: int) -> list[str]:
    import prefect

    return [
        "-m", "uvicorn",
        "--app-dir", str(prefect.__module_path__.parent),
        "--factory", APP,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--log-level", "error",
        "--lifespan", "on",
    ]  # fmt: skip


def _server_env() -> dict[str, str]:
    from prefect.settings import get_current_settings

    return {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }


def start_server(port: int | None = None) -> tuple[subprocess.Popen, str]:
    """Start a temporary Prefect server that gets SIGTERM when this thread's process dies;
    return the process and its API URL once ``/api/health`` answers."""
    import httpx
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    deadline = time.monotonic() + PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()
    while True:
        port = port or _free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", __name__, str(os.getpid()), *_uvicorn_args(port)],
            env=_server_env(),
        )
        url = f"http://127.0.0.1:{port}/api"
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    break
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(f"{url}/health", timeout=2).status_code == 200:
                        return proc, url
                time.sleep(0.1)
        if proc.poll() == 3:  # uvicorn: the port was taken meanwhile
            port = None
            continue
        stop_server(proc)
        raise RuntimeError(
            f"the temporary Prefect server did not start (exit code {proc.returncode}); "
            "set PREFECT_API_URL to a running server instead"
        )


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def own_ephemeral_server(out: str | Path | None = None) -> Iterator[str | None]:
    """Run the block against a temporary Prefect server that cannot outlive this process.

    Does nothing when ``PREFECT_API_URL`` is set (a real server, or a test harness). Yields the
    API URL it started, or None.
    """
    from prefect.context import refresh_global_settings_context
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or not sys.platform.startswith("linux"):
        yield None
        return
    proc, url = start_server()
    if out is not None:
        from pedsynth import lock

        lock.note(out, server_pid=proc.pid)
    saved = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()  # every thread of Prefect's sees it, not only this one
    try:
        yield url
    finally:
        _drain_prefect_workers()  # their last logs and events, while the server still answers
        if saved is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = saved
        refresh_global_settings_context()
        stop_server(proc)


def _drain_prefect_workers() -> None:
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=5)


def reap(holder: dict | None) -> None:
    """Stop the temporary server a dead build (``holder``, from its lock file) left running,
    after checking that the pid still runs that server (pids are reused)."""
    pid = int((holder or {}).get("server_pid") or 0)
    if pid <= 0 or (holder or {}).get("host") != socket.gethostname():
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if APP.encode() not in cmdline:
        return
    log.warning("stopping the temporary Prefect server (pid %d) a killed build left", pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)


def _exec_with_parent_death_signal(parent: int, args: list[str]) -> None:
    """In the child: ask for SIGTERM when the parent dies, then become uvicorn."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        sys.exit(1)
    os.execv(sys.executable, [sys.executable, *args])


if __name__ == "__main__":
    _exec_with_parent_death_signal(int(sys.argv[1]), sys.argv[2:])

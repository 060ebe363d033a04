"""A `kill -9` of `pedsynth build` takes its temporary Prefect server with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pedsynth import lock
from pedsynth.server_process import APP

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl is Linux's")


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_sigkill_of_a_build_leaves_no_server(procedural_small, tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")  # its own temporary server and database
    build = subprocess.Popen(
        [sys.executable, "-m", "pedsynth.cli", "build", "--source",
         f"cuhk-pedes:{procedural_small}", "--out", str(out), "--set", "shard_rows=4",
         "--set", "workers=1"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server_pid = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and build.poll() is None:
            info = lock.read_holder(out) or {}
            server_pid = int(info.get("server_pid") or 0)
            if server_pid and any((out / "_work").glob("*/*.parquet")):
                break  # the server is up and the flow is running
            time.sleep(0.05)
        assert build.poll() is None, "the build must still be running when it is killed"
        assert server_pid and APP.encode() in _cmdline(server_pid)
        assert int(Path(f"/proc/{server_pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == (
            build.pid
        )
        build.send_signal(signal.SIGKILL)  # the build only, not its process group
        build.wait(timeout=30)
        gone_by = time.monotonic() + 15
        while time.monotonic() < gone_by and _alive(server_pid):
            time.sleep(0.1)
        assert not _alive(server_pid), "the temporary Prefect server outlived its build"
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
        if server_pid and _alive(server_pid) and APP.encode() in _cmdline(server_pid):
            os.kill(server_pid, signal.SIGKILL)
    assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == build.pid  # left behind


def test_the_next_build_stops_a_server_a_dead_build_left(tmp_path):
    """Where the parent-death signal is not delivered, the lock file names the server."""
    from pedsynth.server_process import reap

    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", APP], start_new_session=True
    )
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        reap({"host": socket.gethostname(), "server_pid": other.pid})  # not a server: kept
        reap({"host": "elsewhere", "server_pid": fake.pid})  # another host's pid: kept
        time.sleep(0.2)
        assert other.poll() is None and fake.poll() is None
        reap({"host": socket.gethostname(), "server_pid": fake.pid})
        assert fake.wait(timeout=10) == -signal.SIGTERM
    finally:
        for proc in (fake, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()

"""One build per output folder: a second one refuses naming the holder, waits, or recovers a
lock its killed holder left."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pedsynth import cli, lock
from pedsynth.errors import PreflightError

REPO = Path(__file__).resolve().parents[1]

HOLD = """
import sys, time
from pedsynth import lock
with lock.build_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _holder(out: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out), str(seconds)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_build_refuses_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "out"
    proc = _holder(out, 30)
    try:
        info = json.loads((out / lock.LOCK_FILE).read_text())
        assert info["pid"] == proc.pid and info["host"] == socket.gethostname()
        with pytest.raises(PreflightError) as exc:
            lock.acquire(out)
        assert str(exc.value) == (
            f"{out} is being built by pid {proc.pid} on host {socket.gethostname()} "
            f"since {info['started']}; pass --wait to wait"
        )
        # The command line refuses at once, before Prefect starts, with the same line.
        started = time.monotonic()
        code = cli.main(["build", "--source", f"cuhk-pedes:{_tiny_source(tmp_path)}",
                         "--out", str(out)])  # fmt: skip
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and time.monotonic() - started < 10
        assert err == [f"error: {exc.value}"]
    finally:
        proc.kill()
        proc.wait()


def _tiny_source(tmp_path: Path) -> Path:
    from pedsynth.procedural import generate

    root = tmp_path / "src"
    generate(root, identities=4, images_per_identity=1, seed=1, workers=1)
    return root


def test_wait_takes_the_lock_once_the_holder_releases(tmp_path, caplog):
    out = tmp_path / "out"
    proc = _holder(out, 1.5)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="pedsynth.lock"), lock.build_lock(out, wait=True):
        waited = time.monotonic() - started
        assert proc.wait(timeout=5) == 0  # the holder finished and released first
        assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    assert waited >= 1.0
    assert any(f"pid {proc.pid}" in r.getMessage() and "waiting" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert not (out / lock.LOCK_FILE).exists()  # released on the way out
    assert not [r for r in caplog.records if "recover" in r.getMessage()]


def test_a_lock_left_by_a_killed_holder_is_recovered(tmp_path, caplog):
    out = tmp_path / "out"
    proc = _holder(out, 60)
    proc.kill()
    proc.wait()
    assert (out / lock.LOCK_FILE).exists()  # SIGKILL ran no clean-up
    with caplog.at_level(logging.WARNING, logger="pedsynth.lock"), lock.build_lock(out):
        assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
    (message,) = [r.getMessage() for r in caplog.records if r.name == "pedsynth.lock"]
    assert f"pid {proc.pid}" in message and "recovering" in message


def test_a_stale_lock_file_of_a_dead_pid_is_recovered(tmp_path, caplog):
    """A lock file whose pid is dead on this host (no flock held by anyone)."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    info = {"host": socket.gethostname(), "pid": dead.pid, "started": "2020-01-01T00:00:00+00:00"}
    (out / lock.LOCK_FILE).write_text(json.dumps(info))
    os.utime(out / lock.LOCK_FILE, (time.time() - 60, time.time() - 60))
    with caplog.at_level(logging.WARNING, logger="pedsynth.lock"):
        lock.acquire(out)
    try:
        assert json.loads((out / lock.LOCK_FILE).read_text())["pid"] == os.getpid()
        assert any(f"pid {dead.pid}" in r.getMessage() for r in caplog.records)
    finally:
        lock.release(out)
    assert not (out / lock.LOCK_FILE).exists()


def test_the_lock_is_reentrant_and_records_the_flow_run(tmp_path):
    out = tmp_path / "out"
    with lock.build_lock(out):
        with lock.build_lock(out):
            lock.note(out, flow_run_id="abc")
        assert lock.held(out) and (out / lock.LOCK_FILE).exists()
        info = json.loads((out / lock.LOCK_FILE).read_text())
        assert info["flow_run_id"] == "abc" and info["pid"] == os.getpid()
        assert "flow run abc" in lock.describe_holder(out, info)
    assert not lock.held(out) and not (out / lock.LOCK_FILE).exists()


def test_the_flow_takes_the_lock_too(tmp_path):
    """A deployment run (no command line) refuses as well: the flow function is wrapped."""
    from pedsynth.flows.build_dataset import build_dataset

    out = tmp_path / "out"
    other = _holder(out, 30)
    try:
        with pytest.raises(PreflightError, match=f"by pid {other.pid} on host"):
            build_dataset.fn(config=None, sources=[f"cuhk-pedes:{tmp_path}"], out=str(out))
    finally:
        other.kill()
        other.wait()

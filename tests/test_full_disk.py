"""A disk that fills up part-way through a build: one line naming the path, a non-zero exit,
and an output that a rerun (with space again) finishes equal to an uninterrupted build.

The disk is a real, small tmpfs (mounting needs root; the test is skipped without it). The
build's preflight wants 64 MiB free, so the disk starts with room and a ballast file fills it
once the first work shards are committed.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from pedsynth.schemas.manifest import resolve_build
from pedsynth.verify import verify
from tests.test_fault_injection import _pairs
from tests.test_resume import _build_cmd, _env

pytestmark = pytest.mark.slow


@pytest.fixture()
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=80m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk: Path, leave_bytes: int) -> Path:
    ballast = disk / "ballast"
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(ballast, "ab") as fh:
        block = b"\0" * (1 << 20)
        remaining = free - leave_bytes
        while remaining > 0:
            try:
                fh.write(block[: min(len(block), remaining)])
                fh.flush()
            except OSError:
                break
            remaining -= len(block)
    return ballast


def test_a_full_disk_is_one_line_and_the_rerun_finishes(
    prefect_server, procedural_small, small_disk, tmp_path
):
    env = _env(prefect_server)
    reference = tmp_path / "reference"
    done = subprocess.run(
        _build_cmd(procedural_small, reference), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]

    out = small_disk / "out"
    proc = subprocess.Popen(
        _build_cmd(procedural_small, out), env=env, stderr=subprocess.PIPE, text=True
    )
    work = out / "_work" / "ingest"
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if work.is_dir() and len(list(work.glob("*.parquet"))) >= 4:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the build finished before the disk could fill"
    ballast = _fill(small_disk, leave_bytes=16 * 1024)
    _, stderr = proc.communicate(timeout=240)
    assert proc.returncode != 0
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr[-3000:]
    assert "no space left on the device" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in stderr.split(lines[0])[-1]

    ballast.unlink()  # space again: the same command finishes what was left
    done = subprocess.run(
        _build_cmd(procedural_small, out), env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = verify(out)
    assert report.sound, report.problems
    assert _pairs(resolve_build(out)).equals(_pairs(resolve_build(reference)))

"""SIGKILL a build at seeded random points, rerun after each kill: the published output ends
equal to an uninterrupted build, and ``latest`` always names a version that verifies.

Each kill lands where work is left (a rerun reuses what the killed run committed): part-way
through ingest (after a seeded random number of work shards), while final shards are being
committed (a seeded random delay after the first final shard of a new version), and while a
finished version is verified and published (its manifest exists, ``latest`` does not name it
yet). The second half builds again with a changed write setting (the same rows, a new version),
so its kills land during a write over an earlier, published version.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pedsynth.schemas.manifest import MANIFEST_FILE, latest_version, resolve_build
from pedsynth.verify import verify
from pedsynth.versions import version_ids, versions_dir
from tests.test_resume import _build_cmd, _env, _read_sorted

pytestmark = pytest.mark.slow

SEED = 10
# Kills per phase, in the order a build reaches them: each one lands where the killed runs
# before it left work (a rerun reuses what they committed; a killed write leaves an unfinished
# version folder, and the rerun starts a new one). The default run has one kill of each kind;
# CI's `pytest -m fault` run has 20.
TARGETED = {"first": ["ingest", "shards", "publish"], "over": ["shards", "publish"]}
TWENTY = {
    "first": ["ingest"] * 8 + ["shards"] * 3 + ["publish"],
    "over": ["shards"] * 7 + ["publish"],
}
CHANGED = ["--set", "write.card_examples=1"]  # a new write fingerprint, the same rows


def _run(cmd: list[str], env: dict) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _new_version_has(out: Path, name: str, before: set[str]) -> bool:
    """Whether a version folder this build made holds ``name`` (a file, or a folder's files)."""
    for version in set(version_ids(out)) - before:
        path = versions_dir(out) / version / name
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            return True
    return False


def _kill_at(cmd: list[str], env: dict, out: Path, point: tuple[str, float]) -> str:
    """Start the build, SIGKILL its process group at ``point``; returns what was hit."""
    trigger, delay = point
    before = set(version_ids(out))
    proc = subprocess.Popen(
        cmd,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    started = time.monotonic()
    try:
        while proc.poll() is None and time.monotonic() - started < 240:
            if trigger == "ingest" and _work_shards(out) >= delay:
                break
            if trigger == "shards" and _new_version_has(out, "data", before):
                time.sleep(delay)
                break
            if trigger == "publish" and _new_version_has(out, MANIFEST_FILE, before):
                break
            time.sleep(0.003)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            hit = trigger
        else:
            hit = "finished"
        proc.wait(timeout=30)
    return hit


def _work_shards(out: Path) -> int:
    return len([p for p in (out / "_work" / "ingest").glob("*.parquet") if "rejects" not in p.name])


def _check_latest(out: Path) -> None:
    if latest_version(out) is None:
        return
    report = verify(out)
    assert report.sound, [p.line(Path(report.out)) for p in report.problems]


def _pairs(folder: Path) -> pa.Table:
    table = _read_sorted(folder / "data").combine_chunks()
    return table.take(pc.sort_indices(table, [("pair_id", "ascending")]))


@pytest.mark.parametrize(
    "phases",
    [
        pytest.param(TARGETED, id="one-of-each"),
        pytest.param(TWENTY, id="twenty", marks=pytest.mark.fault),
    ],
)
def test_kills_at_random_points_then_reruns_equal_an_uninterrupted_build(
    prefect_server, procedural_small, tmp_path, phases
):
    env = _env(prefect_server)
    reference = tmp_path / "reference"  # uninterrupted; the changed setting keeps its rows
    _run(_build_cmd(procedural_small, reference), env)
    total = _work_shards(reference)
    expected = _pairs(resolve_build(reference))
    expected_rejects = _read_sorted(resolve_build(reference) / "rejects")

    rng = random.Random(SEED)
    out = tmp_path / "out"
    hits: list[str] = []
    for phase, triggers in phases.items():
        cmd = _build_cmd(procedural_small, out) + (CHANGED if phase == "over" else [])
        published = latest_version(out)
        n_ingest = triggers.count("ingest")
        ingest_at = iter(sorted(rng.sample(range(2, total - 1), n_ingest)))  # after each other
        for trigger in triggers:
            at = next(ingest_at) if trigger == "ingest" else rng.uniform(0, 0.05)
            hits.append(_kill_at(cmd, env, out, (trigger, at)))
            _check_latest(out)  # before the rerun: latest is absent or sound
            assert latest_version(out) == published  # it moves only when a version verifies
        _run(cmd, env)  # the last rerun, uninterrupted
        _check_latest(out)
        assert latest_version(out) != published
        assert _pairs(resolve_build(out)).equals(expected)
        assert _read_sorted(resolve_build(out) / "rejects").equals(expected_rejects)
    assert hits == [t for triggers in phases.values() for t in triggers]  # every kill landed

    final = resolve_build(out)
    pair_ids = _pairs(final).column("pair_id").to_pylist()
    assert len(pair_ids) == len(set(pair_ids)) > 0  # nothing twice
    # Two finished versions remain (A and B); the folders killed writes left were pruned.
    finished = [v for v in version_ids(out) if (versions_dir(out) / v / MANIFEST_FILE).is_file()]
    assert version_ids(out) == finished and len(finished) == 2
    assert verify(versions_dir(out) / finished[0]).sound
    assert _pairs(versions_dir(out) / finished[0]).equals(expected)
    assert finished[1] == latest_version(out)

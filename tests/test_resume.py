"""A build killed with SIGKILL part-way, rerun, equals an uninterrupted build row for row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pedsynth.schemas.manifest import resolve_build

REPO = Path(__file__).resolve().parents[1]


def _build_cmd(source: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pedsynth.cli",
        "build",
        "--source",
        f"cuhk-pedes:{source}",
        "--out",
        str(out),
        "--set",
        "shard_rows=8",
        "--set",
        "workers=1",
    ]


def _env(api_url: str) -> dict:
    return {**os.environ, "PREFECT_API_URL": api_url}


def _read_sorted(folder: Path) -> pa.Table:
    files = sorted(folder.glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files])


def test_sigkill_then_rerun_equals_uninterrupted(prefect_server, procedural_small, tmp_path):
    env = _env(prefect_server)
    reference = tmp_path / "reference"
    subprocess.run(
        _build_cmd(procedural_small, reference),
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _build_cmd(procedural_small, out),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ingest_dir = out / "_work" / "ingest"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list(ingest_dir.glob("*[!s].parquet"))) < 3:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    done_at_kill = len([p for p in ingest_dir.glob("*.parquet") if "rejects" not in p.name])
    total_chunks = len(
        [p for p in (reference / "_work" / "ingest").glob("*.parquet") if "rejects" not in p.name]
    )
    assert 3 <= done_at_kill < total_chunks, "the kill must land part-way through ingest"
    assert not list(out.glob("versions/*/manifest.json")) and not (out / "latest").exists()

    rerun = subprocess.run(
        _build_cmd(procedural_small, out), env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    built, expected = resolve_build(out), resolve_build(reference)
    assert sorted(p.name for p in (built / "data").iterdir()) == sorted(
        p.name for p in (expected / "data").iterdir()
    )
    assert _read_sorted(built / "data").equals(_read_sorted(expected / "data"))
    assert _read_sorted(built / "rejects").equals(_read_sorted(expected / "rejects"))
    final = [p for p in (out / "_work" / "ingest").glob("*.parquet") if "rejects" not in p.name]
    assert len(final) == total_chunks  # finished shards were reused, none written twice

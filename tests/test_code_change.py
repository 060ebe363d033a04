"""Resume tracks the code: a change to one stage recomputes it and what follows, not the rest.

Runs the real CLI on a copy of the package (first on PYTHONPATH), edits one stage's source in
the copy, and reads from each build's manifest which stages reused their shards.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import pedsynth

STAGES_ON = [
    "faithfulness={alpha: 0.6}",
    "score={clip: {model: pedsynth-tiny-clip, pretrained: random, batch_size: 16}}",
]


@pytest.fixture
def package_copy(tmp_path) -> Path:
    root = tmp_path / "pkg"
    shutil.copytree(
        Path(pedsynth.__file__).parent,
        root / "pedsynth",
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return root


def _build(package: Path, source: Path, out: Path, api_url: str) -> dict:
    cmd = [sys.executable, "-m", "pedsynth.cli", "build", "--source", f"cuhk-pedes:{source}"]
    cmd += ["--out", str(out), "--set", "shard_rows=40", "--set", "workers=2"]
    for item in STAGES_ON:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(package), "PREFECT_API_URL": api_url}
    proc = subprocess.run(cmd, env=env, cwd=package, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"code {pedsynth.__version__}+" in proc.stdout
    return json.loads((out / "latest" / "manifest.json").read_text())


def _reused(manifest: dict) -> dict[str, tuple[int, int]]:
    return {name: (c["reused"], c["shards"]) for name, c in manifest["stages"].items()}


def test_changing_one_stage_recomputes_it_and_the_stages_after(
    prefect_server, procedural_small, package_copy, tmp_path
):
    out = tmp_path / "out"
    first = _build(package_copy, procedural_small, out, prefect_server)
    n = first["stages"]["ingest"]["shards"]
    assert n >= 2 and _reused(first) == {
        "ingest": (0, n),
        "faithfulness": (0, n),
        "score": (0, n),
        "write": (0, len(first["shards"])),
    }
    data_files = {p.name: p.read_bytes() for p in (out / "latest" / "data").glob("*.parquet")}

    stage_file = package_copy / "pedsynth" / "tasks" / "faithfulness.py"
    stage_file.write_text(stage_file.read_text() + "\n\nCHANGED_FOR_A_TEST = True\n")
    second = _build(package_copy, procedural_small, out, prefect_server)
    assert _reused(second) == {
        "ingest": (n, n),  # untouched code: reused
        "faithfulness": (0, n),  # its code changed: recomputed
        "score": (0, n),  # its input's fingerprint changed: recomputed
        "write": (0, len(second["shards"])),
    }
    changed = {
        k for k in first["code_hashes"] if first["code_hashes"][k] != second["code_hashes"][k]
    }
    assert changed == {"faithfulness"}
    # The change did not alter what the stage computes, so the dataset is the same bytes.
    assert {
        p.name: p.read_bytes() for p in (out / "latest" / "data").glob("*.parquet")
    } == data_files

    # A comment or formatting change is not a code change.
    stage_file.write_text(stage_file.read_text() + "\n# a note for readers\n")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    third = _build(package_copy, procedural_small, out, prefect_server)
    assert third["build_fingerprint"] == second["build_fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == before

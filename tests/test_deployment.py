"""build-dataset/local through a real Prefect server and a real process worker on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = [sys.executable, "-m", "prefect"]


@pytest.mark.slow
@pytest.mark.deployment  # ~2.5 min: CI runs it on its own (pytest -m deployment)
def test_local_deployment_runs_on_a_process_worker(prefect_server, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    for item in ("prefect.yaml", "configs", "pedsynth"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, project / item)
    env = {**os.environ, "PREFECT_API_URL": prefect_server, "PREFECT_WORKER_QUERY_SECONDS": "1"}

    def prefect(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(
            [*PREFECT, *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
        return done

    prefect("work-pool", "create", "local", "--type", "process", "--overwrite")
    prefect("--no-prompt", "deploy", "--name", "local")
    worker = subprocess.Popen(
        [*PREFECT, "worker", "start", "--pool", "local", "--run-once"],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        run = prefect("deployment", "run", "build-dataset/local", "--watch", timeout=420)
        assert "Completed" in run.stdout + run.stderr
        worker_log = worker.communicate(timeout=120)[0]
    finally:
        if worker.poll() is None:
            worker.kill()
    assert worker.returncode == 0, worker_log[-3000:]

    # The deployment generated the procedural benchmark and built it with the offline config.
    out = project / "out" / "offline-tiny"
    manifest = json.loads((out / "latest" / "manifest.json").read_text())
    annotations = json.loads((project / "data" / "procedural" / "reid_raw.json").read_text())
    expected = sum(len(r["captions"]) for r in annotations)
    data = pq.read_table(out / "latest" / "data", columns=["caption_source"])
    sources = data.column("caption_source").to_pylist()
    # Every original caption, plus what the offline text stages (tiny models) added.
    assert sources.count("original") == expected
    assert data.num_rows == manifest["totals"]["pairs"] == len(sources)
    assert sources.count("mllm") > 0 and {"caption", "rewrite"} <= set(manifest["stages"])
    assert manifest["config"]["name"] == "offline-tiny"
    assert set(manifest["totals"]["by_split"]) == {"train", "val", "test"}

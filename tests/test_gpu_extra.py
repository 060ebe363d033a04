"""`pip install '.[gpu]'` resolves, in a fresh venv, to a current vLLM and a Prefect the project
declares, without backtracking into old vLLM releases (README: GPU worker)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from tests.package_index import index_unreachable

REPO = Path(__file__).resolve().parents[1]
OLDEST_VLLM = Version("0.32")  # the floor: what "a current vLLM" means today


def _declared(name: str) -> list[Requirement]:
    """Every requirement on ``name`` that `.[gpu]` brings: the base list and the gpu extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = [*project["dependencies"], *project["optional-dependencies"]["gpu"]]
    found = [r for r in map(Requirement, lines) if r.name.lower() == name]
    assert found, f"pyproject.toml declares no {name} requirement"
    return found


@pytest.mark.slow
@pytest.mark.network
def test_gpu_extra_resolves_to_current_vllm(tmp_path):
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # empty: nothing installed biases the resolution
    report = tmp_path / "report.json"
    cmd = [
        sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"),
        "install", "--dry-run", "--ignore-installed", "--retries", "1",
        "--timeout", "60", "--report", str(report), f"{REPO}[gpu]",
    ]  # fmt: skip
    started = time.monotonic()
    try:  # a clean resolution takes one to three minutes; backtracking runs far longer
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as stuck:
        out = stuck.stdout or b""  # bytes even in text mode (subprocess docs)
        tail = out.decode(errors="replace") if isinstance(out, bytes) else out
        pytest.fail(f"pip was still resolving .[gpu] after 900 s (backtracking?):\n{tail[-4000:]}")
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    if done.returncode != 0:
        if index_unreachable(output):
            pytest.skip(f"the package index cannot be reached: {output.strip()[-300:]}")
        pytest.fail(f"pip could not resolve .[gpu] ({seconds:.0f} s):\n{output[-4000:]}")

    picked = {
        item["metadata"]["name"].lower(): Version(item["metadata"]["version"])
        for item in json.loads(report.read_text())["install"]
    }
    assert "vllm" in picked, f"vllm not in the resolution: {sorted(picked)}"
    assert picked["vllm"] >= OLDEST_VLLM, f"resolved an old vLLM: {picked['vllm']}"
    for requirement in _declared("vllm") + _declared("prefect"):
        name = requirement.name.lower()
        assert requirement.specifier.contains(picked[name], prereleases=True), (
            f"{name} {picked[name]} is outside the declared {requirement}"
        )
    # No backtracking: pip announces it when it tries several releases of a package.
    for name in ("vllm", "prefect"):
        assert f"looking at multiple versions of {name}" not in output, output[-4000:]
    print(
        f"resolved vllm {picked['vllm']}, prefect {picked['prefect']}, "
        f"fastapi {picked.get('fastapi')}, torch {picked.get('torch')} in {seconds:.0f} s"
    )

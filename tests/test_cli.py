"""The pedsynth command as a person uses it: errors say what is wrong, inspect summarises."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pedsynth.cli import main
from pedsynth.errors import describe
from pedsynth.schemas.config import load_config
from pedsynth.schemas.manifest import Manifest, StageCounts

REPO = Path(__file__).resolve().parents[1]


def test_bad_config_value_exits_2_naming_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: many\n")
    assert main(["build", "--config", str(bad), "--source", "folder:/x"]) == 2
    err = capsys.readouterr().err
    assert "workers" in err and "'many'" in err


def test_bad_source_format_exits_2(capsys):
    assert main(["build", "--source", "coco:/data"]) == 2
    assert "unknown format 'coco'" in capsys.readouterr().err


def test_sample_data_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "bench"
    assert (
        main(
            [
                "sample-data",
                str(out),
                "--identities",
                "6",
                "--images-per-identity",
                "2",
                "--seed",
                "3",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    records = json.loads((out / "reid_raw.json").read_text())
    assert len(records) == 12 and summary
    # The reference bank for reference-guided edits comes with it, every file named there.
    listed = json.loads((out / "references" / "references.json").read_text())["references"]
    assert summary["references"] == len(listed) > 0
    assert all((out / "references" / r["path"]).is_file() for r in listed)
    assert main(["sample-data", str(out), "--identities", "6"]) == 2
    assert "exist" in capsys.readouterr().err.lower()


def test_inspect_summarises_a_manifest(tmp_path, capsys):
    manifest = Manifest(
        name="demo",
        schema_version="1.0",
        code_version="0.1.0+abc",
        created="2026-01-01T00:00:00+00:00",
        build_fingerprint="f",
        config={},
        shards=[
            {
                "path": "data/train-00000-of-00001.parquet",
                "split": "train",
                "rows": 10,
                "sha256": "0",
            }
        ],
        rejects=[],
        stages={
            "ingest": StageCounts(
                shards=2,
                reused=1,
                rows_in=7,
                rows_out=10,
                rejected=3,
                seconds=1.25,
                rejects_by_reason={"missing_file": 2, "truncated": 1},
            )
        },
        totals={
            "pairs": 10,
            "images": 5,
            "identities": 2,
            "rejects": 3,
            "by_split": {"train": {"pairs": 10, "images": 5, "identities": 2}},
        },
    )
    manifest.save(tmp_path)
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "10 pairs, 5 images, 2 identities, 3 rejects" in out
    assert re.search(r"ingest\s+7\s+10\s+3\s+1/2\s+1\.2s\s+\(missing_file=2, truncated=1\)", out), (
        out
    )
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text("{not json")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "cannot be read" in capsys.readouterr().err


def _one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_missing_source_is_one_line_before_prefect_starts(tmp_path, capsys):
    bench = tmp_path / "bench"
    bench.mkdir()
    (bench / "reid_raw.json").write_text("[]")
    assert (
        main(["build", "--source", f"cuhk-pedes:{tmp_path / 'nope'}", "--out", str(tmp_path / "o")])
        == 2
    )
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert main(["build", "--source", f"cuhk-pedes:{bench}", "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "imgs" in line and str(bench) in line
    assert main(["build", "--source", f"folder:{tmp_path / 'none'}", "--out", str(tmp_path)]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    assert main(["build", "--source", f"shards:{bench}", "--out", str(tmp_path / "o")]) == 2
    assert "no .parquet files" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_unusable_output_is_one_line(tmp_path, capsys):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "reid_raw.json").write_text("[]")
    a_file = tmp_path / "taken"
    a_file.write_text("x")
    assert main(["build", "--source", f"cuhk-pedes:{tmp_path}", "--out", str(a_file)]) == 2
    assert "is a file, not a folder" in _one_error_line(capsys.readouterr().err)
    under_file = a_file / "out"
    assert main(["build", "--source", f"cuhk-pedes:{tmp_path}", "--out", str(under_file)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(under_file) in line and "choose another --out" in line


def test_disk_errors_say_what_to_do():
    full = OSError(errno.ENOSPC, "No space left on device", "/data/out/_work/x.parquet")
    assert describe(full) == (
        "/data/out/_work/x.parquet: no space left on the device; "
        "free some space or choose another --out"
    )
    assert "read-only" in describe(OSError(errno.EROFS, "Read-only file system", "/ro"))
    assert describe(KeyError("x")) == "KeyError: 'x'"


@pytest.mark.parametrize(
    "override, expected",
    [
        ("shard_rows=true", "shard_rows = True: Value error, expected a number, got true"),
        ("workers=false", "workers = False: Value error, expected a number, got false"),
        ("memory.hnsw_m=8", "the memory stage is off in this config"),
    ],
)
def test_strict_overrides(override, expected, tmp_path, capsys):
    assert main(["build", "--source", f"folder:{tmp_path}", "--set", override]) == 2
    assert expected in capsys.readouterr().err


def test_set_can_turn_a_stage_on_with_its_defaults():
    cfg = load_config(None, overrides=["memory={}", "memory.hnsw_m=8"])
    assert cfg.memory is not None and cfg.memory.hnsw_m == 8 and cfg.memory.dedupe is True


def test_a_failure_inside_the_flow_ends_in_one_error_line(
    prefect_server, procedural_small, tmp_path
):
    """A model that cannot load fails the build: a short error, the traceback in the log file."""
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pedsynth.cli",
            "build",
            "--source",
            f"cuhk-pedes:{procedural_small}",
            "--out",
            str(out),
            "--set",
            "caption={engine: {model: 'tiny-random:no-such-model'}}",
        ],
        env={**os.environ, "PREFECT_API_URL": prefect_server},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "no-such-model" in errors[0], proc.stderr[-3000:]
    assert len(proc.stderr.splitlines()) < 40
    logs = list((out / "_logs").glob("build-*.log"))
    assert len(logs) == 1 and "Traceback" in logs[0].read_text()


def test_readme_keeps_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    install_and_run, test = commands
    assert "pedsynth build" in install_and_run and "pytest" in test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run README's test command verbatim"

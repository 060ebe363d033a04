"""The pedsynth command as a person uses it: errors say what is wrong, inspect summarises."""

from __future__ import annotations

import json
import re
from pathlib import Path

from pedsynth.cli import main

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
    assert main(["sample-data", str(out), "--identities", "6"]) == 2
    assert "exist" in capsys.readouterr().err.lower()


def test_inspect_summarises_a_manifest(tmp_path, capsys):
    manifest = {
        "name": "demo",
        "schema_version": "1.0",
        "code_version": "0.1.0",
        "created": "2026-01-01T00:00:00+00:00",
        "shards": [{"path": "data/train-00000-of-00001"}],
        "totals": {
            "pairs": 10,
            "images": 5,
            "identities": 2,
            "rejects": 3,
            "by_split": {"train": {"pairs": 10, "images": 5, "identities": 2}},
        },
        "stages": {
            "ingest": {
                "rows_out": 10,
                "rejected": 3,
                "rejects_by_reason": {"missing_file": 2, "truncated": 1},
            }
        },
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "10 pairs, 5 images, 2 identities, 3 rejects" in out
    assert re.search(r"ingest\s+out\s+10\s+rejected\s+3\s+\(missing_file=2, truncated=1\)", out)
    assert main(["inspect", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err


def test_readme_keeps_two_setup_commands_and_ci_runs_the_test_one():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)
    assert len(commands) == 2 and all("\n" not in c for c in commands)
    install_and_run, test = commands
    assert "pedsynth build" in install_and_run and "pytest" in test
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert test in ci, ".ci/run must run README's test command verbatim"

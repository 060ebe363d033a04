"""The benchmark plumbing: ``benchmarks/report.py`` (sections, tables, goals), the run_all
child protocol and selection, and the metric benchmark's reference against ``rank_metrics``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import metrics as metrics_bench  # noqa: E402  (benchmarks/metrics.py)
import report  # noqa: E402  (benchmarks/report.py)
import run_all  # noqa: E402  (benchmarks/run_all.py)


def test_write_section_replaces_only_its_own_section(tmp_path):
    path = tmp_path / "B.md"
    path.write_text(
        "# B\n\n<!-- a:start -->\nold a\n<!-- a:end -->\n\n<!-- b:start -->\nb\n<!-- b:end -->\n"
    )
    report.write_section("a", "new a\n", path)
    text = path.read_text()
    assert "old a" not in text and "<!-- a:start -->\nnew a\n<!-- a:end -->" in text
    assert "<!-- b:start -->\nb\n<!-- b:end -->" in text
    report.write_section("c", "c body\n", path)  # a new section goes last
    assert path.read_text().rstrip().endswith("<!-- c:start -->\nc body\n<!-- c:end -->")


def test_write_section_first_puts_a_new_section_after_the_intro(tmp_path):
    path = tmp_path / "B.md"
    path.write_text("# B\n\nintro line\n\n<!-- a:start -->\na\n<!-- a:end -->\n")
    report.write_section_first("summary", "the summary\n", path)
    text = path.read_text()
    assert text.index("intro line") < text.index("the summary") < text.index("<!-- a:start -->")
    report.write_section_first("summary", "second\n", path)  # an existing one stays in place
    text = path.read_text()
    assert "the summary" not in text and text.count("<!-- summary:start -->") == 1
    assert text.index("second") < text.index("<!-- a:start -->")


def test_markdown_table_checks_its_shape():
    table = report.markdown_table(("x", "y"), [(1, "a"), (2, "b")], "rl")
    assert table.splitlines() == ["| x | y |", "|---:|---|", "| 1 | a |", "| 2 | b |"]
    with pytest.raises(ValueError, match="3 cells for 2 columns"):
        report.markdown_table(("x", "y"), [(1, 2, 3)], "rl")
    with pytest.raises(ValueError, match="alignment"):
        report.markdown_table(("x", "y"), [], "r")


@pytest.mark.parametrize(
    ("ratio", "goal", "higher", "met"),
    [(0.95, 0.9, True, True), (0.85, 0.9, True, False), (0.2, 0.3, False, True),
     (0.31, 0.3, False, False)],
)  # fmt: skip
def test_figure_goal_direction(ratio, goal, higher, met):
    figure = report.Figure("b", "f", ratio, goal, higher, "a baseline")
    assert figure.met is met
    assert figure.goal_text.startswith("≥" if higher else "<")
    row = report.summary_table([figure]).splitlines()[2]
    assert ("**no**" in row) is (not met) and "a baseline" in row


def test_machine_line_names_the_machine():
    line = report.machine_line(("torch", "no-such-library"))
    assert line.startswith("Machine: cpu ") and "logical CPUs" in line
    assert "torch " in line and "load average" in line and "no-such-library" not in line


def test_child_protocol_returns_a_modules_figures(tmp_path, monkeypatch, capsys):
    """A benchmark module with ``run`` hands its figures back as JSON that rebuild Figures."""
    module = tmp_path / "fake_bench_for_test.py"
    module.write_text(
        "from report import Figure\n"
        "def run(argv):\n"
        "    figure = Figure('fake', 'f', float(argv[0]), 1.0, True, 'b')\n"
        "    return 'body ' + ' '.join(argv), [figure]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.json"
    assert run_all.child("fake_bench_for_test", out, ["1.5"]) == 0
    assert "body 1.5" in capsys.readouterr().out
    (figure,) = [report.Figure(**f) for f in json.loads(out.read_text())]
    assert figure.ratio == 1.5 and figure.met


def test_selection_defaults_and_only():
    names = [b.name for b in run_all.selected(None)]
    assert "metrics" in names and "bench_ray" not in names  # bench_ray runs only on request
    assert [b.name for b in run_all.selected(["metrics"])] == ["metrics"]
    with pytest.raises(SystemExit, match="unknown"):
        run_all.selected(["nope"])


@pytest.mark.parametrize("decimals", [None, 1])
def test_metric_reference_agrees_with_rank_metrics(decimals):
    """The benchmark's plain reference and ``rank_metrics`` give the same numbers (ties too)."""
    from pedsynth.train.metrics import rank_metrics

    rng = np.random.default_rng(3)
    gallery = rng.integers(0, 20, 90)
    queries = rng.choice(np.unique(gallery), 150)
    sim = rng.standard_normal((150, 90)).astype(np.float32)
    if decimals is not None:
        sim = np.round(sim, decimals)
    ours = rank_metrics(sim, queries, gallery)
    reference = metrics_bench.reference_metrics(sim, queries, gallery)
    assert ours == pytest.approx(reference, abs=1e-9)


@pytest.mark.parametrize("fn", ["reference", "rank_metrics"])
def test_metrics_by_hand(fn):
    """Two queries, three gallery items: query 1 matches at ranks 2 and 3 (AP (1/2 + 2/3) / 2,
    INP 2/3), query 2 at rank 1."""
    from pedsynth.train.metrics import rank_metrics

    compute = metrics_bench.reference_metrics if fn == "reference" else rank_metrics
    sim = np.array([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1]], np.float32)
    got = compute(sim, np.array([1, 2]), np.array([2, 1, 1]))
    assert got["R1"] == pytest.approx(50.0) and got["R5"] == pytest.approx(100.0)
    assert got["mAP"] == pytest.approx(100 * ((1 / 2 + 2 / 3) / 2 + 1) / 2)
    assert got["mINP"] == pytest.approx(100 * (2 / 3 + 1) / 2)

"""Shared by the benchmark scripts: tables, the machine line, goals, and BENCHMARKS.md sections.

Each script owns one marked section of BENCHMARKS.md (``<!-- name:start -->`` …
``<!-- name:end -->``) and rewrites only that. A script that states a goal returns
:class:`Figure` rows, which ``benchmarks/run_all.py`` gathers into the summary table.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nMeasured numbers; each section is rewritten by the script named in its "
    "heading (`--write`).\n"
)
DEFAULT_LIBRARIES = ("torch",)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and its end marker."""
    start_mark, end_mark = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    section = f"{start_mark}\n{body.rstrip()}\n{end_mark}\n"
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(end_mark) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def write_section_first(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Like :func:`write_section`, but a new section goes right after the file's intro."""
    start_mark = f"<!-- {name}:start -->"
    text = path.read_text() if path.exists() else HEADER
    if start_mark not in text:
        cut = text.find("<!-- ")
        head, rest = (text, "") if cut == -1 else (text[:cut], text[cut:])
        text = head.rstrip("\n") + f"\n\n{start_mark}\n<!-- {name}:end -->\n\n" + rest
        path.write_text(text)
    write_section(name, body, path)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str) -> str:
    """A Markdown table; ``align`` has one letter per column: ``l`` (left) or ``r`` (right)."""
    if len(align) != len(headers):
        raise ValueError(f"{len(headers)} headers but {len(align)} alignment letters")
    rule = {"l": "---", "r": "---:"}
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(rule[a] for a in align) + "|",
    ]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r}: {len(row)} cells for {len(headers)} columns")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return "\n".join(lines) + "\n"


def _library_version(name: str) -> str | None:
    dist = {"open_clip": "open_clip_torch", "faiss": "faiss-cpu"}.get(name, name)
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> str:
    """The 1 / 5 / 15 minute load averages, e.g. ``1.2 / 0.9 / 0.7``."""
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def machine_line(libraries: Sequence[str] = DEFAULT_LIBRARIES) -> str:
    """One line naming what the numbers were measured on: cpu, cores, memory, python, the
    given libraries' versions (torch also with its thread count), load average and date."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    parts = [f"cpu {_cpu_name()}, {os.cpu_count()} logical CPUs ({usable} usable)"]
    memory = _memory_gib()
    if memory is not None:
        parts.append(f"memory {memory:.0f} GiB")
    parts.append(f"python {platform.python_version()}")
    for name in libraries:
        found = _library_version(name)
        if found is None:
            continue
        if name == "torch":
            import torch

            found += f" ({torch.get_num_threads()} threads)"
        parts.append(f"{name} {found}")
    parts.append(f"load average {load_average()}")
    parts.append(f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC")
    return "Machine: " + "; ".join(parts)


@dataclass(frozen=True)
class Figure:
    """One goal of one benchmark: the measured ratio against its baseline and the goal.

    ``ratio`` is contender / baseline in the figure's own sense (a speed ratio, ≥ goal is
    met; or a time ratio / seconds, ≤ goal is met, given by ``higher_is_better``).
    """

    benchmark: str
    figure: str
    ratio: float
    goal: float
    higher_is_better: bool
    baseline: str
    unit: str = "×"

    @property
    def met(self) -> bool:
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    @property
    def goal_text(self) -> str:
        return f"{'≥' if self.higher_is_better else '<'} {self.goal:g}{self.unit}"

    @property
    def measured_text(self) -> str:
        digits = 3 if self.unit == " s" else 2
        return f"{self.ratio:.{digits}f}{self.unit}"


def summary_table(figures: Sequence[Figure]) -> str:
    """The table run_all prints and writes at the top of BENCHMARKS.md."""
    return markdown_table(
        ("benchmark", "figure", "measured", "goal", "met?", "baseline"),
        (
            (
                f.benchmark,
                f.figure,
                f.measured_text,
                f.goal_text,
                "yes" if f.met else "**no**",
                f.baseline,
            )
            for f in figures
        ),  # fmt: skip
        "llrrll",
    )


def print_run(run: Callable[[list[str] | None], tuple[str, list[Figure]]]) -> int:
    """A benchmark's command line: run it on ``sys.argv`` and print its section."""
    body, _ = run(None)
    print(body)
    return 0

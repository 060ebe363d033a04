"""Shared by the benchmark scripts: each owns one marked section of BENCHMARKS.md."""

from __future__ import annotations

from pathlib import Path

BENCHMARKS_MD = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"
HEADER = (
    "# Benchmarks\n\nMeasured numbers; each section is rewritten by the script named in its "
    "heading (`--write`).\n"
)


def write_section(name: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace (or append) the section between ``<!-- name:start -->`` and its end marker."""
    start_mark, end_mark = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else HEADER
    section = f"{start_mark}\n{body}{end_mark}\n"
    start, end = text.find(start_mark), text.find(end_mark)
    if start != -1 and end > start:
        text = text[:start] + section + text[end + len(end_mark) :].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)

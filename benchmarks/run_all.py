"""Every CPU benchmark in one command: one summary table, and with ``--write`` BENCHMARKS.md.

Each benchmark runs in its own Python process (a fresh model cache, thread setting and memory
per benchmark, and a crash in one does not stop the others) through its module's
``run(argv) -> (section body, figures)``, or ``main(argv)`` where a script has no ``run``. The
figures (measured ratio, goal, baseline) come back as JSON and form the summary table, which
``--write`` puts at the top of BENCHMARKS.md (``<!-- summary:start -->``) while each benchmark
rewrites its own section. Sizes are picked so the whole run takes under 20 minutes on 2 cores.

    python benchmarks/run_all.py --quick            # smoke run: tiny sizes, nothing written
    python benchmarks/run_all.py --write            # the full run; updates BENCHMARKS.md
    python benchmarks/run_all.py --only metrics train
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from report import (  # benchmarks/report.py
    Figure,
    load_average,
    machine_line,
    markdown_table,
    summary_table,
    write_section_first,
)

HERE = Path(__file__).resolve().parent
SECTION = "summary"


@dataclass(frozen=True)
class Bench:
    """One benchmark: its module in benchmarks/, the arguments of a full and a quick run."""

    name: str
    module: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    default: bool = True  # False: only with --only (slow, no goal)


BENCHES = (
    # build overhead: 10k for linearity and memory, 20k and 100k for the goals
    Bench("ingest_write", "ingest_write", ("--pairs", "10000", "20000", "100000", "--repeats", "1"),
          ("--quick",)),
    Bench("caption", "caption", ("--images", "128", "--repeats", "3"), ("--quick",)),
    Bench("score", "score", ("--repeats", "2", "--images", "128", "--large-images", "32"),
          ("--quick",)),
    Bench("memory", "memory", ("--images", "400", "--repeats", "2"), ("--quick",)),
    Bench("train", "train", ("throughput", "--identities", "200"), ("throughput", "--quick")),
    Bench("metrics", "metrics", ("--repeats", "5"), ("--quick",)),
    Bench("bench_edit", "bench_edit", ("--edits", "24", "--repeats", "3"), ("--smoke",)),
    Bench("bench_filter", "bench_filter", ("--identities", "120"), ("--identities", "20")),
    Bench("bench_diversity", "bench_diversity", ("--identities", "400", "--n", "100"),
          ("--identities", "40", "--n", "20")),
    Bench("bench_ray", "bench_ray", (), (), default=False),
)  # fmt: skip


def child(module: str, out: Path, argv: list[str]) -> int:
    """In the benchmark's own process: run it, print its section, save its figures as JSON."""
    sys.path.insert(0, str(HERE))
    mod = importlib.import_module(module)
    figures: list[Figure] = []
    if hasattr(mod, "run"):
        body, figures = mod.run(argv)
        print(body)
        code = 0
    elif inspect.signature(mod.main).parameters:
        code = int(mod.main(argv) or 0)
    else:  # a script whose main() reads sys.argv itself
        sys.argv = [f"{module}.py", *argv]
        code = int(mod.main() or 0)
    out.write_text(json.dumps([dataclasses.asdict(f) for f in figures]))
    return code


def run_one(bench: Bench, args: list[str], folder: Path) -> tuple[list[Figure], float, int]:
    """The benchmark in a subprocess; (figures, seconds, exit code)."""
    out = folder / f"{bench.name}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--child", bench.module, str(out)]
    print(f"\n=== {bench.name}: python benchmarks/{bench.module}.py {shlex.join(args)}", flush=True)
    started = time.perf_counter()
    code = subprocess.run([*command, "--", *args], cwd=HERE.parent, check=False).returncode
    seconds = time.perf_counter() - started
    figures = []
    if out.exists():
        figures = [Figure(**f) for f in json.loads(out.read_text())]
    return figures, seconds, code


def selected(only: list[str] | None) -> list[Bench]:
    present = [b for b in BENCHES if (HERE / f"{b.module}.py").exists()]
    if only:
        unknown = set(only) - {b.name for b in BENCHES}
        if unknown:
            raise SystemExit(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        return [b for b in present if b.name in only]
    return [b for b in present if b.default]


def render(figures: list[Figure], runs: list[tuple[str, float, int]], command: str,
           load_at_start: str) -> str:  # fmt: skip
    timing = markdown_table(
        ("benchmark", "seconds", "result"),
        ((name, f"{s:.0f}", "ok" if code == 0 else f"**exit {code}**") for name, s, code in runs),
        "lrl",
    )
    total = sum(s for _, s, _ in runs)
    missed = [f for f in figures if not f.met]
    return (
        "## Summary (`benchmarks/run_all.py`)\n\n"
        "Every figure is a ratio against a baseline measured in the same run on the same "
        "inputs doing the same work (the baseline of each row is named in it; seconds where "
        "the goal is a time). The sections below give each benchmark's detail and, for a goal "
        "not met, where the remaining time goes.\n\n"
        + summary_table(figures)
        + f"\n{len(figures) - len(missed)} of {len(figures)} goals met.\n\n"
        + timing
        + f"\nWhole run {total / 60:.1f} min; load average {load_at_start} at the start, "
        f"{load_average()} at the end.\n\n{machine_line(('torch', 'pyarrow', 'prefect'))}\n\n"
        f"Command: `{command}`\n"
    )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--child"]:
        module, out = argv[1], Path(argv[2])
        return child(module, out, argv[4:] if argv[3:4] == ["--"] else argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="these benchmarks only")
    args = parser.parse_args(argv)
    if args.quick and args.write:
        parser.error("--quick numbers are not written to BENCHMARKS.md")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    load_at_start = load_average()
    figures: list[Figure] = []
    runs: list[tuple[str, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for bench in selected(args.only):
            bench_args = list(bench.quick if args.quick else bench.full)
            if args.write:
                bench_args.append("--write")
            got, seconds, code = run_one(bench, bench_args, Path(tmp))
            figures += got
            runs.append((bench.name, seconds, code))
    command = "python benchmarks/run_all.py " + shlex.join(argv)
    body = render(figures, runs, command.strip(), load_at_start)
    print("\n" + body)
    if args.write:
        write_section_first(SECTION, body)
    return 0 if all(code == 0 for _, _, code in runs) else 1


if __name__ == "__main__":
    raise SystemExit(main())

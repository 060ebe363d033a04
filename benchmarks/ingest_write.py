"""Ingest + write throughput of pedsynth against a plain single-process baseline.

Both contenders turn the same CUHK-PEDES folder into Parquet files of (image, caption) pairs:

* **pedsynth**: the real ``build_dataset`` Prefect flow (ephemeral API server, as the CLI uses
  it) with ``configs/offline-tiny.yaml``, ``shard_rows=5000`` and ``workers=2``.
* **baseline**: a script a researcher would write: ``json.load`` the annotations, read and fully
  decode every image with Pillow, build the rows, ``pq.write_table`` 5,000-row zstd files per
  split. No pedsynth code.

The images come from a procedural pool generated once (``--cache``); each size gets a folder
whose records point at hard links of the pool images under distinct names, so every record is
a distinct image to both contenders. All files are read once before timing (page cache), and
``os.sync()`` runs, untimed, after each contender so that one's dirty pages are not flushed
during the other's run. Each size runs ``--repeats`` times (default 3) in alternating order
(baseline first on the first round) and the fastest run of each contender counts; CPU seconds
are recorded too, as the shared machines these run on are noisy. The first flow run starts
Prefect's ephemeral server (about 14 s); a tiny warm-up build absorbs it and is reported apart.
The script exits 1 when the two outputs do not hold the same (path, caption) pairs.

A third contender, ``cli``, runs ``pedsynth build`` as a subprocess, as a user types it: its
own Prefect server starts and stops inside the timing (the database was migrated by the
warm-up), and the peak RSS of its whole process tree (CLI + server) is sampled with psutil.
:func:`run` returns the section, the issue-14 goal figures (CLI / baseline at 20k and 100k
pairs, per-pair cost and peak RSS from the smallest to the largest size) and whether the
outputs matched, for ``benchmarks/run_all.py``.

Run ``python benchmarks/ingest_write.py --quick`` for a smoke run, and
``python benchmarks/ingest_write.py --pairs 10000 20000 100000 --write`` to update
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import io
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image
from report import BENCHMARKS_MD, Figure, write_section  # benchmarks/report.py

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "offline-tiny.yaml"
SHARD_ROWS = 5_000
WORKERS = 2
LABEL = "cuhk-pedes"  # pedsynth's image/person id prefix for a cuhk-pedes source
WARMUP_IMAGES = 100

BASELINE_SCHEMA = pa.schema(
    [
        ("pair_id", pa.string()),
        ("image_id", pa.string()),
        ("person_id", pa.string()),
        ("split", pa.string()),
        ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("caption", pa.string()),
    ]
)


# --------------------------------------------------------------------------------------------
# data


def ensure_pool(cache: Path, identities: int, per_identity: int, workers: int | None) -> Path:
    """The procedural pool (CUHK-PEDES layout), generated once into ``cache``."""
    pool = cache / f"pool-{identities}x{per_identity}-seed0"
    done = pool / ".complete"
    if done.exists():
        return pool
    from pedsynth.procedural import generate  # the only pedsynth code the data step uses

    if pool.exists():
        shutil.rmtree(pool)
    print(f"generating the pool: {identities} identities x {per_identity} images → {pool}")
    t0 = time.perf_counter()
    generate(pool, identities=identities, images_per_identity=per_identity, seed=0, workers=workers)
    print(f"  generated in {time.perf_counter() - t0:.1f} s")
    done.write_text("ok\n")
    return pool


def build_source(pool: Path, cache: Path, pairs: int) -> tuple[Path, int, int]:
    """A CUHK-PEDES folder of about ``pairs`` pairs linking the pool's images: (dir, pairs, images).

    Record ``i`` reuses pool record ``i % len(pool)`` in replica ``r = i // len(pool)``: its file is
    a hard link named ``rep{r:03d}/<pool path>`` and its identity is ``id + r * stride``, so every
    record is a distinct image and splits stay identity-disjoint.
    """
    records = json.loads((pool / "reid_raw.json").read_text())
    stride = max(int(r["id"]) for r in records) + 1
    chosen: list[dict[str, Any]] = []
    total = 0
    while total < pairs:
        i = len(chosen)
        rep, k = divmod(i, len(records))
        rec = records[k]
        chosen.append(
            rec
            | {
                "file_path": f"rep{rep:03d}/{rec['file_path']}",
                "id": int(rec["id"]) + rep * stride,
                "_pool_path": rec["file_path"],
            }
        )
        total += len(rec["captions"])
    root = cache / f"cuhk-{pairs}-{pool.name}"
    done = root / ".complete"
    if not done.exists():
        if root.exists():
            shutil.rmtree(root)
        for rec in chosen:
            target = root / "imgs" / rec["file_path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(pool / "imgs" / rec["_pool_path"], target)
        annotations = [{k: v for k, v in rec.items() if not k.startswith("_")} for rec in chosen]
        (root / "reid_raw.json").write_text(json.dumps(annotations))
        done.write_text("ok\n")
    return root, total, len(chosen)


def warm_page_cache(root: Path) -> int:
    """Read every file under ``root`` once; returns the bytes read."""
    n = 0
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as fh:
                n += len(fh.read())
    return n


def dir_mb(path: Path, pattern: str = "**/*.parquet") -> float:
    return sum(p.stat().st_size for p in path.glob(pattern)) / 1e6


# --------------------------------------------------------------------------------------------
# baseline


def _pair_id(image_id: str, k: int, caption: str) -> str:
    blob = "\x1f".join((image_id, "original", str(k), caption)).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:20]


class _SplitFiles:
    """Column buffers of one split, written out every ``rows`` rows."""

    def __init__(self, out: Path, split: str, rows: int) -> None:
        self.out, self.split, self.rows = out, split, rows
        self.cols: dict[str, list[Any]] = {name: [] for name in BASELINE_SCHEMA.names}
        self.cols.update(bytes=[], path=[])
        del self.cols["image"]
        self.files = 0

    def add(self, **row: Any) -> None:
        for key, value in row.items():
            self.cols[key].append(value)
        if len(self.cols["pair_id"]) >= self.rows:
            self.flush()

    def flush(self) -> None:
        cols = self.cols
        if not cols["pair_id"]:
            return
        image = pa.StructArray.from_arrays(
            [pa.array(cols.pop("bytes"), pa.binary()), pa.array(cols.pop("path"), pa.string())],
            fields=list(BASELINE_SCHEMA.field("image").type),
        )
        arrays = [
            image if f.name == "image" else pa.array(cols[f.name], f.type) for f in BASELINE_SCHEMA
        ]
        table = pa.Table.from_arrays(arrays, schema=BASELINE_SCHEMA)
        pq.write_table(
            table, self.out / f"{self.split}-{self.files:05d}.parquet", compression="zstd"
        )
        self.files += 1
        self.cols = {name: [] for name in cols} | {"bytes": [], "path": []}


def run_baseline(source: Path, out: Path, shard_rows: int = SHARD_ROWS) -> int:
    """Annotations → decoded-and-verified images → zstd Parquet per split; returns rows written."""
    with open(source / "reid_raw.json", "rb") as fh:
        records = json.load(fh)
    out.mkdir(parents=True)
    writers: dict[str, _SplitFiles] = {}
    rows = 0
    for rec in records:
        rel = rec["file_path"]
        with open(source / "imgs" / rel, "rb") as fh:
            data = fh.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # full decode: raises on truncated or corrupt files
            width, height = img.size
        split = rec["split"]
        writer = writers.get(split)
        if writer is None:
            writer = writers[split] = _SplitFiles(out, split, shard_rows)
        image_id, person_id = f"{LABEL}:{rel}", f"{LABEL}:{rec['id']}"
        for k, caption in enumerate(rec["captions"]):
            caption = " ".join(caption.split())
            writer.add(
                pair_id=_pair_id(image_id, k, caption),
                image_id=image_id,
                person_id=person_id,
                split=split,
                bytes=data,
                path=rel,
                width=width,
                height=height,
                caption=caption,
            )
            rows += 1
    for writer in writers.values():
        writer.flush()
    return rows


# --------------------------------------------------------------------------------------------
# pedsynth


def setup_prefect(home: Path) -> None:
    """Point Prefect at a private home before it is imported; ephemeral API as the CLI uses."""
    if "prefect" in sys.modules:
        raise RuntimeError("prefect was imported before its settings were made")
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.pop("PREFECT_API_URL", None)
    os.environ.setdefault("MPLBACKEND", "Agg")
    # a fresh database migrates at the first start; on a loaded machine that passes 20 s
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


@dataclass
class Spans:
    """Wall-clock span and thread CPU time of each call of the wrapped pedsynth functions."""

    spans: dict[str, list[tuple[float, float, float]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wall(self, label: str) -> float:
        """From the first start to the last end of ``label``."""
        got = self.spans.get(label)
        return max(e for _, e, _ in got) - min(s for s, _, _ in got) if got else 0.0

    def cpu(self, label: str) -> float:
        """CPU seconds of the calling threads, summed over calls (and threads)."""
        return sum(c for _, _, c in self.spans.get(label, []))


@contextmanager
def timed_pedsynth() -> Iterator[Spans]:
    """Wrap a few pedsynth functions with timers (behaviour unchanged) for the breakdown."""
    from pedsynth.tasks import ingest, shards, sources, stages, write

    spans = Spans()
    targets: list[tuple[Any, str, str]] = [
        (sources, "plan_chunks", "catalog"),
        (stages, "run_shard_stage", "ingest"),  # the only shard stage these builds run
        (ingest, "load_images", "load_images"),
        (shards, "write_parquet_atomic", "work_parquet"),
        (write, "write_dataset", "write"),
        (write._SplitWriter, "_flush", "final_shards"),
        (write, "_totals", "totals"),
        (write, "_write_card", "card"),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]

    def wrap(fn: Callable[..., Any], label: str) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t0, c0 = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                cpu, t1 = time.thread_time() - c0, time.perf_counter()
                with spans.lock:
                    spans.spans[label].append((t0, t1, cpu))

        return timed

    for owner, name, label in targets:
        setattr(owner, name, wrap(getattr(owner, name), label))
    try:
        yield spans
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


def _children_cpu() -> float:
    """CPU seconds used so far by this process's children (the ephemeral Prefect server)."""
    total, me, tick = 0.0, os.getpid(), os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:  # ppid; utime and stime follow at 11 and 12
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Run:
    """One timed run of one contender."""

    seconds: float
    cpu: float  # process CPU seconds, all threads (+ the Prefect server for pedsynth)
    server_cpu: float = 0.0
    spans: Spans | None = None
    manifest: dict[str, Any] | None = None
    peak_rss_mb: float = 0.0  # the largest sum of RSS over the process tree while it ran


STAGES_OFF = ["caption=", "rewrite=", "faithfulness=", "score=", "memory="]


class TreeRss:
    """Peak resident memory of a process and all its descendants, sampled every 20 ms.

    RSS is summed over the tree (the CLI, its Prefect server, any worker), so the peak is what
    the whole build held at once; shared pages count once per process, as ``ps`` shows them.
    """

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            total = 0
            try:
                tree = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                return
            for proc in tree:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    continue
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return self.peak / 1e6


def _children_rusage_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli_command(source: Path, out: Path) -> list[str]:
    """``pedsynth build`` as a user types it (the console script of this interpreter)."""
    script = Path(sys.executable).with_name("pedsynth")
    head = [str(script)] if script.exists() else [sys.executable, "-c", _CLI_MAIN]
    sets = [x for o in [f"shard_rows={SHARD_ROWS}", f"workers={WORKERS}", *STAGES_OFF]
            for x in ("--set", o)]  # fmt: skip
    return [*head, "build", "--config", str(CONFIG), "--source", f"{LABEL}:{source}",
            "--out", str(out), *sets]  # fmt: skip


_CLI_MAIN = "import sys; from pedsynth.cli import main; sys.exit(main())"


def run_cli(source: Path, out: Path) -> Run:
    """One ``pedsynth build`` subprocess: its own Prefect server (as the CLI starts it, on the
    already migrated database of the warm-up), its CPU (server included: the CLI waits for
    it, so its usage reaches ours) and the peak RSS of its process tree."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    c0, t0 = _children_rusage_cpu(), time.perf_counter()
    proc = subprocess.Popen(
        cli_command(source, out), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    with TreeRss(proc.pid) as rss:
        output, _ = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pedsynth build exited {proc.returncode}:\n{output.decode()[-3000:]}")
    manifest = json.loads((out / "latest" / "manifest.json").read_text())
    return Run(seconds, _children_rusage_cpu() - c0, manifest=manifest, peak_rss_mb=rss.peak_mb)


def run_pedsynth(source: Path, out: Path) -> Run:
    """One ``build_dataset`` flow run, with its CPU time and the breakdown spans."""
    from pedsynth.flows.build_dataset import build_dataset

    with timed_pedsynth() as spans, TreeRss(os.getpid()) as rss:
        c0, k0, t0 = _process_cpu(), _children_cpu(), time.perf_counter()
        manifest = build_dataset(
            config=str(CONFIG),
            sources=[f"{LABEL}:{source}"],
            out=str(out),
            # ingest + write only: the model stages of the offline config are switched off
            overrides=[f"shard_rows={SHARD_ROWS}", f"workers={WORKERS}", *STAGES_OFF],
        )
        seconds = time.perf_counter() - t0
        server = _children_cpu() - k0
        cpu = _process_cpu() - c0 + server
    return Run(seconds, cpu, server, spans, manifest, rss.peak_mb)


def time_baseline(source: Path, out: Path) -> tuple[Run, int]:
    """One baseline run; CPU is its (only) thread's."""
    c0, t0 = time.thread_time(), time.perf_counter()
    rows = run_baseline(source, out)
    return Run(time.perf_counter() - t0, time.thread_time() - c0), rows


# --------------------------------------------------------------------------------------------
# correctness


def pairs_multiset(data_dir: Path) -> Counter[tuple[str, str, int]]:
    """Multiset of (image path, caption, image byte count) over the Parquet files in a folder."""
    found: Counter[tuple[str, str, int]] = Counter()
    for f in sorted(data_dir.glob("*.parquet")):
        table = pq.read_table(f, columns=["image", "caption"])
        image = table.column("image").combine_chunks()
        found.update(
            zip(
                image.field("path").to_pylist(),
                table.column("caption").to_pylist(),
                pc.binary_length(image.field("bytes")).to_pylist(),
                strict=True,
            )
        )
    return found


def same_pairs(pedsynth_data: Path, baseline_data: Path) -> tuple[bool, str]:
    """Whether both outputs hold the same rows, and a line that says so."""
    a, b = pairs_multiset(pedsynth_data), pairs_multiset(baseline_data)
    rows_a, rows_b = sum(a.values()), sum(b.values())
    if a == b:
        mb = sum(n * k[2] for k, n in a.items()) / 1e6
        return True, (
            f"outputs match: {rows_a:,} rows each, the same multiset of (image path, caption, "
            f"image size) ({mb:.1f} MB of image bytes)"
        )
    diff = (a - b) + (b - a)
    return False, (
        f"OUTPUTS DIFFER: pedsynth {rows_a} rows, baseline {rows_b}; "
        f"{sum(diff.values())} (path, caption, size) entries differ, e.g. {list(diff)[:3]}"
    )


# --------------------------------------------------------------------------------------------
# report


@dataclass
class Result:
    """The contenders at one size: the fastest run of each counts."""

    pairs: int
    images: int
    pedsynth: list[Run]  # the flow called in this process
    baseline: list[Run]
    pedsynth_mb: float
    baseline_mb: float
    work_mb: float
    orders: list[str]
    check: str
    cli: list[Run] = field(default_factory=list)  # `pedsynth build` subprocesses

    @property
    def ped(self) -> Run:
        return min(self.pedsynth, key=lambda r: r.seconds)

    @property
    def base(self) -> Run:
        return min(self.baseline, key=lambda r: r.seconds)

    @property
    def best_cli(self) -> Run | None:
        return min(self.cli, key=lambda r: r.seconds) if self.cli else None


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical CPUs ({usable} usable)",
        "memory": f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB",
        "python": platform.python_version(),
        "pyarrow": version("pyarrow"),
        "pillow": version("pillow"),
        "prefect": version("prefect"),
        "pedsynth": version("pedsynth"),
        "os": platform.platform(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


def _load() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def render(results: list[Result], info: dict[str, str], command: str, notes: list[str]) -> str:
    """The BENCHMARKS.md section (Markdown)."""
    lines = [
        "## Ingest + write throughput (`benchmarks/ingest_write.py`)",
        "",
        "pedsynth's `build_dataset` flow (ephemeral Prefect API as the CLI starts it, "
        f"`configs/offline-tiny.yaml`, `shard_rows={SHARD_ROWS}`, `workers={WORKERS}` threads) "
        "against a plain single-process script (`json.load` → read + full Pillow decode → rows → "
        f"`pq.write_table`, {SHARD_ROWS:,}-row zstd files per split, no pedsynth code). Same "
        "input files, read from the page cache. Ratio = pedsynth time / baseline time (> 1: "
        "pedsynth is slower). CPU s = CPU seconds of all threads (pedsynth: plus its Prefect "
        "server process).",
        "",
        "| pairs | images | pedsynth s | pairs/s | CPU s | baseline s | pairs/s | CPU s "
        "| ratio | CPU ratio | output MB (pedsynth / baseline) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ped, base = r.ped, r.base
        lines.append(
            f"| {r.pairs:,} | {r.images:,} | {ped.seconds:.1f} | {r.pairs / ped.seconds:,.0f} "
            f"| {ped.cpu:.1f} | {base.seconds:.1f} | {r.pairs / base.seconds:,.0f} "
            f"| {base.cpu:.1f} | **{ped.seconds / base.seconds:.2f}×** "
            f"| {ped.cpu / base.cpu:.2f}× | {r.pedsynth_mb:.1f} / {r.baseline_mb:.1f} |"
        )
    lines += ["", *render_cli(results)]
    lines += [
        "",
        "Where the pedsynth run spends its time (wall seconds of each phase; *CPU* columns are "
        f"CPU seconds summed over the {WORKERS} worker threads; timers wrapped around pedsynth "
        "functions, behaviour unchanged):",
        "",
        "| pairs | total | catalog | ingest | load_images CPU | `_work` Parquet writes CPU "
        "| write stage | final shards | totals | card | flow / Prefect rest | server CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        ped = r.ped
        s = ped.spans or Spans()
        rest = ped.seconds - s.wall("catalog") - s.wall("ingest") - s.wall("write")
        lines.append(
            f"| {r.pairs:,} | {ped.seconds:.1f} | {s.wall('catalog'):.1f} "
            f"| {s.wall('ingest'):.1f} | {s.cpu('load_images'):.1f} "
            f"| {s.cpu('work_parquet'):.1f} | {s.wall('write'):.1f} "
            f"| {s.wall('final_shards'):.1f} | {s.wall('totals'):.1f} | {s.wall('card'):.1f} "
            f"| {rest:.1f} | {ped.server_cpu:.1f} |"
        )
    lines += ["", *[f"- {x}" for x in notes]]
    for r in results:
        runs = "; ".join(
            f"{who} {', '.join(f'{x.seconds:.1f}' for x in xs)} s"
            for who, xs in (("baseline", r.baseline), ("pedsynth", r.pedsynth))
        )
        lines.append(
            f"- {r.pairs:,} pairs: runs in order {' | '.join(r.orders)}, the fastest of each "
            f"counts ({runs}); pedsynth's intermediate `_work/` {r.work_mb:.1f} MB; {r.check}"
        )
    lines += [
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in info.items()),
        "",
        f"Command: `{command}`",
    ]
    return "\n".join(lines) + "\n"


def render_cli(results: list[Result]) -> list[str]:
    """The table of ``pedsynth build`` as a user runs it, against the same baseline runs."""
    rows = [r for r in results if r.best_cli is not None]
    if not rows:
        return []
    lines = [
        "Through the CLI: `pedsynth build` as a subprocess (its own Prefect server started and "
        "stopped, on a database migrated by the warm-up; lock, log file, summary), so start-up "
        "is included. µs/pair = wall time / pairs; peak RSS = the largest sum of RSS over the "
        "whole process tree (CLI + Prefect server), sampled every 20 ms; *flow call* is the same "
        "build called in this benchmark's process.",
        "",
        "| pairs | CLI s | µs/pair | CPU s | peak RSS MB | flow call s | flow peak RSS MB "
        "| baseline s | µs/pair | ratio (CLI / baseline) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cli, base, ped = r.best_cli, r.base, r.ped
        assert cli is not None
        lines.append(
            f"| {r.pairs:,} | {cli.seconds:.1f} | {1e6 * cli.seconds / r.pairs:,.0f} "
            f"| {cli.cpu:.1f} | {max(c.peak_rss_mb for c in r.cli):,.0f} | {ped.seconds:.1f} "
            f"| {max(x.peak_rss_mb for x in r.pedsynth):,.0f} | {base.seconds:.1f} "
            f"| {1e6 * base.seconds / r.pairs:,.0f} | **{cli.seconds / base.seconds:.2f}×** |"
        )
    startup = ", ".join(f"{r.best_cli.seconds - r.ped.seconds:.1f} s at {r.pairs:,}" for r in rows)
    lines += [
        "",
        f"Where the CLI's extra time goes: CLI − flow call = start-up ({startup}): importing the "
        "CLI, Prefect and the flow, and starting the command's own Prefect server (uvicorn; "
        "importing `prefect.server.api.server` alone takes 6–10 s on this machine, then "
        "`create_app` and startup 2–4 s). The flow call's own excess over the baseline is in the "
        "phase table below: catalogue (annotation parsing, a stat per image for the "
        "fingerprints), the dataset card (matplotlib figures, per-row caption statistics), the "
        "second write of every row into the version folder, and Prefect's task-run bookkeeping.",
    ]
    return lines


GOALS = {20_000: 1.5, 100_000: 1.10}  # issue 14: CLI time / baseline time at these sizes


def figures(results: list[Result]) -> list[Figure]:
    """The goals of issue 14 that the measured sizes allow, for benchmarks/run_all.py."""
    out: list[Figure] = []
    cli = [r for r in results if r.best_cli is not None]
    for r in cli:
        if r.pairs in GOALS:
            out.append(
                Figure("ingest_write", f"`pedsynth build` (CLI) at {r.pairs:,} pairs",
                       r.best_cli.seconds / r.base.seconds, GOALS[r.pairs], False,
                       "json → Pillow decode → pyarrow loop, same files, same run")
            )  # fmt: skip
    if len(cli) >= 2:
        small, large = min(cli, key=lambda r: r.pairs), max(cli, key=lambda r: r.pairs)
        per_pair = [r.best_cli.seconds / r.pairs for r in (small, large)]
        out.append(
            Figure("ingest_write", f"CLI per-pair cost, {small.pairs:,} vs {large.pairs:,} pairs",
                   max(per_pair) / min(per_pair), 1.10, False,
                   "the same build at the smaller size (time linear in pairs)")
        )  # fmt: skip
        rss = [max(c.peak_rss_mb for c in r.cli) for r in (small, large)]
        out.append(
            Figure("ingest_write", f"CLI peak RSS (process tree), {large.pairs:,} / "
                   f"{small.pairs:,} pairs", rss[1] / rss[0], 1.20, False,
                   "the same build at the smaller size (memory flat)")
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, nargs="+", default=[10_000, 100_000])
    p.add_argument("--quick", action="store_true", help="one tiny run of 1,000 pairs")
    p.add_argument("--cache", type=Path, default=Path("/tmp/pedsynth-bench"))
    p.add_argument(
        "--pool-identities",
        type=int,
        default=None,
        help="identities in the image pool (default 2,500; 250 with --quick)",
    )
    p.add_argument("--pool-images-per-identity", type=int, default=2)
    p.add_argument("--gen-workers", type=int, default=None, help="workers for the generator")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs per contender and size, order alternating, the fastest counts "
        "(default 3; 1 with --quick)",
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=["pedsynth", "cli"],
        default=["pedsynth", "cli"],
        help="pedsynth contenders beside the baseline: the flow called in this process "
        "(pedsynth) and `pedsynth build` as a subprocess (cli)",
    )
    p.add_argument("--keep", action="store_true", help="keep the output folders")
    p.add_argument("--write", action="store_true", help="update this section of BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.pairs = [1_000]
    if args.pool_identities is None:
        args.pool_identities = 250 if args.quick else 2_500
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def warm_up(pool: Path, cache: Path, runs: Path) -> str:
    """Start Prefect's ephemeral server with a tiny build (not counted); a note on its cost."""
    src, pairs, _ = build_source(pool, cache, 2 * WARMUP_IMAGES)
    warm_page_cache(src)
    t0 = time.perf_counter()
    importlib.import_module("pedsynth.flows.build_dataset")
    import_s = time.perf_counter() - t0
    first = run_pedsynth(src, runs / "warmup").seconds
    again = run_pedsynth(src, runs / "warmup-again").seconds
    cli = run_cli(src, runs / "warmup-cli")
    return (
        f"not counted: importing the flow (and Prefect) {import_s:.1f} s; a first build of "
        f"{pairs} pairs, which starts the ephemeral Prefect server and migrates its fresh "
        f"database, {first:.1f} s; the same build again {again:.1f} s (so the one-off server "
        f"start costs ≈ {first - again:.1f} s); the same {pairs} pairs through the CLI "
        f"{cli.seconds:.1f} s, {cli.peak_rss_mb:,.0f} MB peak RSS (what every CLI build pays "
        "before its first pair: imports, its own Prefect server's start and stop)"
    )


CONTENDERS = ("baseline", "pedsynth", "cli")


def measure(
    pool: Path, cache: Path, runs: Path, pairs: int, repeats: int, modes: list[str]
) -> tuple[Result, bool]:
    """The contenders at one size, ``repeats`` times each, the order rotating each round."""
    src, n_pairs, n_images = build_source(pool, cache, pairs)
    cached = warm_page_cache(src)
    print(f"\n== {n_pairs:,} pairs, {n_images:,} images ({cached / 1e6:.0f} MB read into the "
          f"page cache; load {_load()}) ==", flush=True)  # fmt: skip
    ok = True
    done: dict[str, list[Run]] = {who: [] for who in CONTENDERS}
    orders = []
    chosen = [who for who in CONTENDERS if who == "baseline" or who in modes]
    for rep in range(repeats):
        order = chosen[rep % len(chosen) :] + chosen[: rep % len(chosen)]
        orders.append(" → ".join(order))
        for who in order:
            out = runs / f"{who}-{n_pairs}-{rep}"
            if who == "baseline":
                run, rows = time_baseline(src, out / "data")
                if rows != n_pairs:
                    print(f"baseline wrote {rows} rows, expected {n_pairs}")
                    ok = False
            else:
                run = run_pedsynth(src, out) if who == "pedsynth" else run_cli(src, out)
                got = (run.manifest or {}).get("totals", {}).get("pairs")
                if got != n_pairs:
                    print(f"{who}: the manifest says {got} pairs, expected {n_pairs}")
                    ok = False
            os.sync()  # untimed: flush this contender's writes before the next one runs
            done[who].append(run)
            rate = f"{n_pairs / run.seconds:,.0f} pairs/s"
            rss = f", peak RSS {run.peak_rss_mb:,.0f} MB" if run.peak_rss_mb else ""
            print(f"{who}: {run.seconds:.2f} s ({rate}), CPU {run.cpu:.1f} s{rss}", flush=True)
    base_out = runs / f"baseline-{n_pairs}-0"
    checks = []
    for who in chosen[1:]:
        match, check = same_pairs(
            runs / f"{who}-{n_pairs}-0" / "latest" / "data", base_out / "data"
        )
        ok &= match
        checks.append(f"{who}: {check}")
    print("; ".join(checks), flush=True)
    ped_out = runs / f"{chosen[1]}-{n_pairs}-0"
    result = Result(
        pairs=n_pairs,
        images=n_images,
        pedsynth=done["pedsynth"] or done["cli"],
        baseline=done["baseline"],
        pedsynth_mb=dir_mb(ped_out / "latest" / "data"),
        baseline_mb=dir_mb(base_out / "data"),
        work_mb=dir_mb(ped_out / "_work"),
        orders=orders,
        check="; ".join(checks),
        cli=done["cli"],
    )
    return result, ok


def run(argv: list[str] | None = None) -> tuple[str, list[Figure]]:
    """Measure every size; returns the section body and the goal figures
    (``benchmarks/run_all.py`` calls this). Raises ``RuntimeError`` when an output misses rows
    or differs from the baseline's (after printing the section)."""
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/ingest_write.py", *(argv or [])])
    cache: Path = args.cache
    cache.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=cache))
    setup_prefect(runs / "prefect-home")
    load_before = _load()

    pool = ensure_pool(cache, args.pool_identities, args.pool_images_per_identity, args.gen_workers)
    notes = [warm_up(pool, cache, runs)]
    results: list[Result] = []
    ok = True
    for pairs in args.pairs:
        result, good = measure(pool, cache, runs, pairs, args.repeats, args.modes)
        results.append(result)
        ok &= good
        if not args.keep:
            for path in runs.glob(f"*-{result.pairs}-*"):
                shutil.rmtree(path, ignore_errors=True)

    notes.append(
        f"data: a procedural pool of {args.pool_identities:,} identities × "
        f"{args.pool_images_per_identity} JPEG images (2 captions each), hard-linked under "
        "distinct names as often as needed (splits stay identity-disjoint); every file read once "
        "before timing; `os.sync()`, untimed, after each run; pedsynth fsyncs every file it "
        "writes (and writes each row twice: `_work/` shard, then final shard), the baseline "
        f"writes once and does not fsync; load average (1/5/15 min) {load_before} at the start, "
        f"{_load()} at the end"
    )
    body = render(results, machine_info(), command, notes)
    if args.write:
        write_section("ingest_write", body)
        print(f"updated {BENCHMARKS_MD}")
    if not args.keep:
        shutil.rmtree(runs, ignore_errors=True)
    if not ok:
        print("\n" + body)
        raise RuntimeError("ingest_write: the outputs differ or miss rows (see above)")
    return body, figures(results)


def main(argv: list[str] | None = None) -> int:
    try:
        body, found = run(sys.argv[1:] if argv is None else argv)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print("\n" + body)
    for f in found:
        met = "met" if f.met else "NOT met"
        print(f"{f.figure}: {f.measured_text} (goal {f.goal_text}: {met})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

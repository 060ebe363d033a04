"""``runner: ray`` on this machine: a model build on 1 and 2 Ray workers, and the overhead
of the Ray runner against the thread pool on a build without model stages.

* **model build**: ``configs/offline-tiny.yaml`` with the caption stage only (tiny random
  LLaVA, one CPU thread each) on a procedural source, ``runner: ray`` with a local Ray
  instance of ``workers`` CPUs (1, then 2); wall time and the engine loads the manifest
  records (per worker, per engine).
* **overhead**: ingest + write only (no model stages) of about ``--pairs`` pairs, thread pool
  and Ray, both with ``workers=2``; the ratio of wall times.

Each build starts from an empty output folder (no reuse); the Ray instance is started and
stopped by each Ray build, and its start-up is part of the time. One Prefect test server
serves all builds. Run ``python benchmarks/bench_ray.py`` (``--pairs 10000`` by default).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
CONFIG = str(REPO / "configs" / "offline-tiny.yaml")
TEXT_OFF = ["rewrite=", "faithfulness=", "write.card_plots=false"]


def _build(out: Path, source: Path, identities: int, overrides: list[str]) -> tuple[float, dict]:
    from pedsynth.flows.build_dataset import build_dataset

    started = time.monotonic()
    manifest = build_dataset(
        config=CONFIG,
        out=str(out),
        overrides=[
            f"sources.0.path={source}",
            f"sources.0.identities={identities}",
            *TEXT_OFF,
            *overrides,
        ],
    )
    return time.monotonic() - started, manifest


def _loads(manifest: dict) -> tuple[int, int]:
    """(engine loads in all, workers that loaded any) over the whole build."""
    total, workers = 0, set()
    for counts in manifest["stages"].values():
        for where, engines in counts["engine_loads"].items():
            n = sum(n for e, n in engines.items() if "tiny-random" in e)
            total += n
            if n:
                workers.add(where)
    return total, len(workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--caption-identities", type=int, default=40)
    args = parser.parse_args()

    from prefect.testing.utilities import prefect_test_harness

    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    lines = []
    with prefect_test_harness(server_startup_timeout=180):
        # Warm-up: the procedural source, the tiny model and Prefect's first flow run.
        _build(root / "warm", root / "src-cap", args.caption_identities, ["workers=1"])
        model = {}
        for workers in (1, 2):
            seconds, manifest = _build(
                root / f"cap-ray-{workers}",
                root / "src-cap",
                args.caption_identities,
                ["runner=ray", f"workers={workers}", "shard_rows=40"],
            )
            model[workers] = seconds
            loads, holders = _loads(manifest)
            lines.append(
                f"| caption, ray, {workers} worker(s) | {manifest['totals']['pairs']} | "
                f"{manifest['stages']['caption']['shards']} | {seconds:.1f} | "
                f"{loads} loads in {holders} worker(s) |"
            )
        # Ingest + write only: about --pairs pairs (4 images a person, 2 captions an image).
        identities = max(3, args.pairs // 8)
        plain = ["caption=", "shard_rows=1000", "workers=2"]
        _build(root / "warm-plain", root / "src-plain", identities, plain)  # generates it
        timed = {}
        for runner in ("thread", "ray"):
            seconds, manifest = _build(
                root / f"plain-{runner}",
                root / "src-plain",
                identities,
                [*plain, f"runner={runner}"],
            )
            timed[runner] = seconds
            lines.append(
                f"| ingest+write, {runner}, 2 workers | {manifest['totals']['pairs']} | "
                f"{manifest['stages']['ingest']['shards']} | {seconds:.1f} | - |"
            )
    print("| build | pairs | shards | seconds | engine loads |\n|---|---|---|---|---|")
    print("\n".join(lines))
    print(f"\nmodel build, 1 worker / 2 workers: {model[1] / model[2]:.2f}x")
    print(f"ingest+write, ray / thread: {timed['ray'] / timed['thread']:.2f}x")


if __name__ == "__main__":
    main()

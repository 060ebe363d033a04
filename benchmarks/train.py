"""Trainer benchmarks: does it learn, how fast does it train, how fast is the metric code.

    python benchmarks/train.py learns       # 1,000-identity procedural benchmark, tiny CLIP
    python benchmarks/train.py throughput   # trainer vs a plain PyTorch loop, same batches
    python benchmarks/train.py metrics      # rank_metrics at CUHK-PEDES test size vs IRRA's
    python benchmarks/train.py ablation     # with/without BSS, NAM, CM-MoCo, 30 % noisy captions
    add --write to replace the section in BENCHMARKS.md

Sections: ``train-learns``, ``train-throughput``, ``rank-metrics``, ``train-ablation``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from report import write_section  # benchmarks/report.py

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    return (
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); python {platform.python_version()}; "
        f"load average {' / '.join(f'{x:.1f}' for x in os.getloadavg())}; "
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )


def make_data(root: Path, identities: int, images: int, seed: int) -> Path:
    """Procedural benchmark → ingest → one Parquet file per split (the build's layout)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pedsynth.procedural import generate
    from pedsynth.schemas.config import IngestConfig, SourceConfig
    from pedsynth.tasks import ingest

    bench, out = root / "bench", root / "data"
    generate(bench, identities=identities, images_per_identity=images, seed=seed)
    catalog, _ = ingest.read_catalog(SourceConfig(format="cuhk-pedes", path=str(bench)))
    pairs, _ = ingest.load_images(catalog, IngestConfig())
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        table = pairs.filter(pc.equal(pairs["split"], split))
        pq.write_table(table, out / "data" / f"{split}-00000-of-00001.parquet", row_group_size=500)
    return out


def learns(args: argparse.Namespace) -> str:
    import numpy as np

    from pedsynth.schemas.train import load_train_config
    from pedsynth.train.data import load_split
    from pedsynth.train.loop import train

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        data = make_data(Path(tmp), args.identities, 4, seed=0)
        data_s = time.perf_counter() - started
        overrides = [f"epochs={args.epochs}", "threads=2", *args.set]
        cfg = load_train_config(
            REPO / "configs" / "train-tiny.yaml",
            data=str(data),
            out=str(Path(tmp) / "run"),
            overrides=overrides,
        )
        started = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - started
        test, _ = load_split(str(data), "test")
        gallery = np.asarray(test.image_person)
        queries = [test.image_person[test.caption_image[c]] for c in test.query_captions()]
        chance = 100 * float(np.mean([(gallery == q).mean() for q in queries]))
    rows = [
        f"| {split} | {result[split]['queries']} | {result[split]['gallery']} | "
        + " | ".join(f"{result[split][k]:.1f}" for k in ("R1", "R5", "R10", "mAP", "mINP"))
        + " |"
        for split in ("val", "test")
    ]
    epochs = " ".join(f"{h.get('val_R1', float('nan')):.1f}" for h in result["history"])
    sps = [h["samples_per_s"] for h in result["history"]]
    return (
        "## A tiny CLIP learns the procedural benchmark (`benchmarks/train.py learns`)\n\n"
        f"{args.identities} identities × 4 images (train/val/test 80/10/10 %, identity-disjoint, "
        "2 captions per image), `configs/train-tiny.yaml` (`pedsynth-tiny-clip-small`, 128×64, "
        f"random init, batch 32, SDM τ 0.05 + ID loss), {args.epochs} epochs on CPU. Best "
        f"checkpoint chosen on val ({result['checkpoint']}).\n\n"
        "| split | queries | gallery | R1 | R5 | R10 | mAP | mINP |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows) + "\n\n"
        f"- chance R1 on test (random ranking): {chance:.1f}; test R1 is "
        f"{result['test']['R1'] / chance:.1f}× chance\n"
        f"- val R1 per epoch: {epochs}\n"
        f"- training {train_s:.0f} s ({np.median(sps):.0f} samples/s median epoch, with "
        f"evaluation), data generation + ingest {data_s:.0f} s\n\n"
        f"{machine()}\n\nCommand: `python benchmarks/train.py {shlex.join(sys.argv[1:])}`\n"
    )


def throughput(args: argparse.Namespace) -> str:
    """Trainer (data loading, BSS/NAM off, checkpoints, schedule) vs a bare loop of
    forward + SDM/ID + backward + Adam over the same batches held in memory."""
    import torch
    from torch.utils.data import default_collate

    from pedsynth.schemas.train import load_train_config
    from pedsynth.train import losses
    from pedsynth.train.data import load_split
    from pedsynth.train.datasets import BlockShuffleBatchSampler, TrainDataset
    from pedsynth.train.loop import train
    from pedsynth.train.model import DualEncoder, create_clip

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.identities, 4, seed=1)
        results = []
        for workers in (0, 1):
            cfg = load_train_config(
                REPO / "configs" / "train-tiny.yaml",
                data=str(data),
                out=str(Path(tmp) / f"run{workers}"),
                overrides=["epochs=1", f"num_workers={workers}", "threads=2", *args.set],
            )
            result = train(cfg)
            results.append((workers, result["history"][0]["samples_per_s"]))
        index, _ = load_split(str(data), "train")
        clip, tokenizer = create_clip(cfg.model)
        labels = {p: i for i, p in enumerate(index.persons)}
        ds = TrainDataset(
            index,
            tokenizer,
            image_size=(128, 64),
            seed=0,
            labels=labels,
            augment_cfg=cfg.augment,
            text_cfg=cfg.text,
        )
        sampler = BlockShuffleBatchSampler(index, cfg.batch_size, seed=0)
        batches = [default_collate([ds[k] for k in keys]) for keys in sampler]
        model = DualEncoder(clip, len(labels))
        opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps)
        started = time.perf_counter()
        for b in batches:
            fi, ft = model.encode_image(b["image"]), model.encode_text(b["text"])
            loss = losses.sdm_loss(fi, ft, b["label"], tau=cfg.loss.sdm_tau) + losses.id_loss(
                model.classifier(fi), model.classifier(ft), b["label"]
            )
            opt.zero_grad()
            loss.backward()
            opt.step()
        plain = sum(len(b["label"]) for b in batches) / (time.perf_counter() - started)
    rows = "\n".join(
        f"| trainer, {w} loader worker{'s' if w != 1 else ''} | {s:.0f} | {s / plain:.2f}× |"
        for w, s in results
    )
    return (
        "## Training throughput (`benchmarks/train.py throughput`)\n\n"
        f"One epoch of `configs/train-tiny.yaml` on {args.identities} procedural identities "
        "(batch 32, SDM + ID). *Trainer*: `pedsynth.train.loop.train` — reads and decodes "
        "Parquet images, augments, tokenises, one checkpoint, samples/s of the epoch without "
        "evaluation. *Plain loop*: the same model code, loss and optimiser over the same "
        "batches already decoded and collated in memory (an upper bound: no data work). "
        "Ratio = trainer / plain.\n\n"
        "| run | samples/s | ratio |\n|---|---:|---:|\n"
        f"| plain PyTorch loop (batches in memory) | {plain:.0f} | 1.00× |\n{rows}\n\n"
        f"{machine()}\n\nCommand: `python benchmarks/train.py {shlex.join(sys.argv[1:])}`\n"
    )


def metrics(args: argparse.Namespace) -> str:
    import numpy as np
    import torch

    from pedsynth.train.metrics import rank_metrics

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    gallery = np.repeat(np.arange(1000), 4)[:3074]  # 1,000 identities, ~3 images each
    rng.shuffle(gallery)
    queries = rng.choice(np.unique(gallery), 6156)
    sim = rng.standard_normal((6156, 3074)).astype(np.float32)

    def irra() -> None:
        s, q, g = torch.from_numpy(sim), torch.from_numpy(queries), torch.from_numpy(gallery)
        indices = torch.argsort(s, dim=1, descending=True)
        matches = g[indices].eq(q.view(-1, 1))
        cmc = matches[:, :10].cumsum(1)
        cmc[cmc > 1] = 1
        num_rel = matches.sum(1)
        tmp = matches.cumsum(1)
        inp = [tmp[i][r.nonzero()[-1]] / (r.nonzero()[-1] + 1.0) for i, r in enumerate(matches)]
        tmp = torch.stack([tmp[:, i] / (i + 1.0) for i in range(tmp.shape[1])], 1) * matches
        _ = (tmp.sum(1) / num_rel).mean(), torch.cat(inp).mean()

    def best(fn, repeats: int = 5) -> float:
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    ours = best(lambda: rank_metrics(sim, queries, gallery))
    ties = np.round(sim, 1)
    ours_ties = best(lambda: rank_metrics(ties, queries, gallery))
    reference = best(irra, repeats=2)
    return (
        "## Metric code at CUHK-PEDES test size (`benchmarks/train.py metrics`)\n\n"
        "`rank_metrics` (R1/R5/R10/mAP/mINP) on a 6,156 × 3,074 float32 similarity matrix "
        "(1,000 identities), best of 5, against IRRA's `rank` (full argsort + per-query "
        "mINP loop) on the same matrix, best of 2. Ratio = ours / IRRA's.\n\n"
        "| code | seconds | ratio |\n|---|---:|---:|\n"
        f"| IRRA `rank` | {reference:.3f} | 1.00× |\n"
        f"| `rank_metrics` | {ours:.3f} | {ours / reference:.2f}× |\n"
        f"| `rank_metrics`, scores rounded to 0.1 (many ties) | {ours_ties:.3f} | "
        f"{ours_ties / reference:.2f}× |\n\n"
        f"{machine()}\n\nCommand: `python benchmarks/train.py {shlex.join(sys.argv[1:])}`\n"
    )


def ablation(args: argparse.Namespace) -> str:
    """Every ablation row over ``--seeds`` on a benchmark whose test split has at least 100
    identities; ``--results OUT/ablation.json`` renders an earlier run of the same protocol."""
    from pedsynth.procedural import generate
    from pedsynth.train.ablation import format_table, run_ablation

    seeds = [int(x) for x in args.seeds.split(",")]
    splits = tuple(float(x) for x in args.splits.split(","))
    seconds = None
    if args.results:
        done = json.loads(Path(args.results).read_text())
        table = format_table(done["results"], done["corrupt"], done["seeds"])
    else:
        with tempfile.TemporaryDirectory() as tmp:
            bench = Path(tmp) / "bench"
            generate(
                bench, identities=args.identities, images_per_identity=4, seed=3,
                split_fractions=splits,
            )  # fmt: skip
            started = time.perf_counter()
            table = run_ablation(
                bench,
                out=Path(tmp) / "runs",
                config=REPO / "configs" / "train-tiny.yaml",
                corrupt=args.corrupt,
                overrides=args.set,
                seeds=seeds,
                steps=args.steps,
            )
            seconds = time.perf_counter() - started
    test_ids = round(args.identities * splits[2])
    budget = f"{args.steps} optimiser steps" if args.steps else "the config's epochs"
    return (
        "## Ablation over seeds (`benchmarks/train.py ablation`)\n\n"
        f"`pedsynth ablate` on {args.identities} procedural identities × 4 images, identity "
        f"splits {args.splits} (about {test_ids} test identities). Rows on the noisy dataset: "
        "per train image one `original` and one `rewrite` caption, a share of both corrupted "
        "(every colour word swapped), oracle token noise on the swapped words. Filter rows: "
        "clean originals plus one rewrite each written from the ground truth, the same share "
        "of them with one wrong fact, filtered by the embedding score only or by embedding + "
        f"attributes. `configs/train-tiny.yaml`, {budget} per run, mean ± sample std over "
        f"seeds {seeds}; best-on-val checkpoints, clean val/test captions. A tiny CLIP from "
        "random weights on 2 CPU cores: R1 stays near its floor (chance is 1 in the number of "
        "test identities), so rows whose means differ by less than about two stds cannot be "
        "told apart at this budget.\n\n"
        f"{table}\n\n"
        + (f"- all rows: {seconds:.0f} s\n\n" if seconds is not None else "")
        + (f"- {args.note}\n\n" if args.note else "")
        + f"{machine()}\n\nCommand: `python benchmarks/train.py {shlex.join(sys.argv[1:])}`\n"
    )


SECTIONS = {
    "learns": ("train-learns", learns),
    "throughput": ("train-throughput", throughput),
    "metrics": ("rank-metrics", metrics),
    "ablation": ("train-ablation", ablation),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("what", choices=sorted(SECTIONS))
    parser.add_argument("--identities", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--corrupt", type=float, default=0.3)
    parser.add_argument("--seeds", default="0,1,2", help="ablation: comma-separated seeds")
    parser.add_argument("--steps", type=int, default=None, help="ablation: steps per run")
    parser.add_argument("--splits", default="0.6,0.1,0.3", help="ablation: identity shares")
    parser.add_argument("--results", default=None, help="ablation: render this ablation.json")
    parser.add_argument("--note", default=None, help="ablation: a line on how --results was made")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    if args.identities is None:
        args.identities = {"learns": 1000, "ablation": 400}.get(args.what, 300)
    name, fn = SECTIONS[args.what]
    body = fn(args)
    print(body)
    if args.write:
        write_section(name, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

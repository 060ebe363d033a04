"""Trainer benchmarks: does it learn, how fast does it train, how fast is the metric code.

    python benchmarks/train.py learns       # 1,000-identity procedural benchmark, tiny CLIP
    python benchmarks/train.py throughput   # trainer vs a plain PyTorch loop, same data work
    python benchmarks/train.py ablation     # with/without BSS, NAM, CM-MoCo, 30 % noisy captions
    add --write to replace the section in BENCHMARKS.md

Sections: ``train-learns``, ``train-throughput``, ``train-ablation`` (the metric code:
``benchmarks/metrics.py``).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

from report import (  # benchmarks/report.py
    Figure,
    machine_line,
    markdown_table,
    print_run,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]


def machine() -> str:
    return machine_line()


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


class PlainDataset:
    """A plain PyTorch dataset over the same Parquet shards: one item per (image, caption) row,
    the image's JPEG bytes decoded with Pillow and put through the same torchvision v2
    augmentation, the caption through the same tokenizer. No pedsynth data code."""

    def __init__(self, files: list[Path], tokenizer, transform, labels: dict[str, int]):
        import pyarrow.parquet as pq

        table = pq.read_table(files, columns=["image", "caption", "person_id"])
        self.images = table.column("image").combine_chunks().field("bytes")
        self.captions = table.column("caption").to_pylist()
        self.labels = [labels[p] for p in table.column("person_id").to_pylist()]
        self.tokenizer, self.transform = tokenizer, transform

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, i: int) -> dict:
        import io

        from PIL import Image

        image = Image.open(io.BytesIO(self.images[i].as_py())).convert("RGB")
        return {
            "image": self.transform(image),
            "text": self.tokenizer([self.captions[i]])[0],
            "label": self.labels[i],
        }


def _plain_epoch(model, loader, opt, tau: float) -> float:
    """One epoch of the plain loop: forward, SDM + ID loss, backward, Adam; samples/s."""
    from pedsynth.train import losses

    model.train()
    samples, started = 0, time.perf_counter()
    for b in loader:
        fi, ft = model.encode_image(b["image"]), model.encode_text(b["text"])
        loss = losses.sdm_loss(fi, ft, b["label"], tau=tau) + losses.id_loss(
            model.classifier(fi), model.classifier(ft), b["label"]
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        samples += len(b["label"])
    return samples / (time.perf_counter() - started)


def throughput(args: argparse.Namespace) -> str:
    """The trainer's epochs against a plain PyTorch loop doing the same data and model work."""
    import torch
    from torch.utils.data import DataLoader

    from pedsynth.schemas.train import load_train_config
    from pedsynth.train.data import shard_files
    from pedsynth.train.loop import prepare, train_epoch
    from pedsynth.train.model import DualEncoder, create_clip
    from pedsynth.train.transforms import train_transform

    torch.set_num_threads(2)
    epochs = args.throughput_epochs  # the first warms the loader workers and is not counted
    results: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(Path(tmp), args.identities, 4, seed=1)
        for workers in args.workers:
            cfg = load_train_config(
                REPO / "configs" / "train-tiny.yaml",
                data=str(data),
                out=str(Path(tmp) / f"run{workers}"),
                overrides=[f"epochs={epochs}", f"num_workers={workers}", "threads=2", *args.set],
            )
            run = prepare(cfg)
            clip, _ = create_clip(cfg.model)  # the same architecture, its own weights
            tokenizer, geometry = run.tokenizer, run.eval_kwargs
            transform = train_transform(
                geometry["image_size"], cfg.augment, resize_mode=geometry["resize_mode"],
                mean=geometry["mean"], std=geometry["std"],
            )  # fmt: skip
            labels = {p: i for i, p in enumerate(run.identities)}
            plain_ds = PlainDataset(shard_files(data, "train"), tokenizer, transform, labels)
            loader = DataLoader(
                plain_ds,
                batch_size=cfg.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=workers,
                persistent_workers=workers > 0,
                multiprocessing_context="spawn" if workers > 0 else None,
            )
            model = DualEncoder(clip, len(labels))
            opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, eps=cfg.optim.eps)
            ours, plain = [], []
            for epoch in range(epochs):  # interleaved: contention hits both alike
                ours.append(train_epoch(run, epoch)["samples_per_s"])
                plain.append(_plain_epoch(model, loader, opt, cfg.loss.sdm_tau))
            results[f"ours {workers}"], results[f"plain {workers}"] = ours, plain
            del run, loader
    rows, figures = [], []
    for workers in args.workers:
        ours, plain = results[f"ours {workers}"], results[f"plain {workers}"]
        best_ours, best_plain = max(ours[1:]), max(plain[1:])
        rows.append(
            (str(workers), f"{best_plain:.0f}", f"{best_ours:.0f}",
             f"**{best_ours / best_plain:.2f}×**",
             " ".join(f"{x:.0f}" for x in plain), " ".join(f"{x:.0f}" for x in ours))
        )  # fmt: skip
        figures.append(
            Figure("train", f"trainer samples/s, {workers} loader worker(s)",
                   best_ours / best_plain, 0.9, True,
                   "plain PyTorch loop: same shards, Pillow decode, v2 augmentation, tokenizer, "
                   "DataLoader workers, model, SDM + ID, Adam")
        )  # fmt: skip
    args.figures = figures
    table = markdown_table(
        ("loader workers", "plain loop samples/s", "trainer samples/s", "ratio",
         "plain, per epoch", "trainer, per epoch"),
        rows, "rrrrll",
    )  # fmt: skip
    return (
        "## Training throughput (`benchmarks/train.py throughput`)\n\n"
        f"`configs/train-tiny.yaml` on {args.identities} procedural identities (batch 32, "
        f"SDM + ID, random init), {epochs} epochs each. *Trainer*: "
        "`pedsynth.train.loop.train_epoch` after `prepare`: its block-shuffle sampler, Parquet "
        "reader with row-group cache, Pillow decode, IRRA augmentation, tokenizer, learning-"
        "rate schedule and loss bookkeeping. *Plain loop*: a plain PyTorch `Dataset` over the "
        "same Parquet shards (rows held by pyarrow, each JPEG decoded with Pillow per item, the "
        "same torchvision v2 augmentation and tokenizer), a `DataLoader` with the same batch "
        "size and workers (spawned, persistent), the same model, SDM + ID loss and Adam. "
        "Epochs alternate between the two; the first (worker start-up) is listed but not "
        "counted, the best later epoch is. Ratio = trainer / plain samples/s; goal ≥ 0.9×.\n\n"
        f"{table}\n"
        f"{machine_line()}\n\nCommand: `python benchmarks/train.py {shlex.join(args.argv)}`\n"
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
    "ablation": ("train-ablation", ablation),
}


def run(argv: list[str] | None = None) -> tuple[str, list[Figure]]:
    """Run one benchmark; returns its section body and its goal figures (throughput only)."""
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
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1], help="throughput")
    parser.add_argument(
        "--throughput-epochs", type=int, default=3, help="throughput: epochs (first not counted)"
    )
    parser.add_argument("--quick", action="store_true", help="throughput: 60 identities")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args(argv)
    args.argv = list(argv if argv is not None else sys.argv[1:])
    if args.identities is None:
        default = 60 if args.quick else 300
        args.identities = {"learns": 1000, "ablation": 400}.get(args.what, default)
    args.throughput_epochs = max(2, args.throughput_epochs)
    args.figures = []
    name, fn = SECTIONS[args.what]
    body = fn(args)
    if args.write:
        write_section(name, body)
    return body, args.figures


if __name__ == "__main__":
    raise SystemExit(print_run(run))

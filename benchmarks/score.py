"""Score-stage throughput against open_clip's own ``encode_image`` loop, on the same batches.

Contenders, all on the same procedural images, the same weights, device and precision:
- ``open_clip loop`` (the baseline: what a user would write with open_clip alone, doing the
  stage's work): open_clip's preprocess transform per image, ``forward_intermediates`` per
  image batch (pooled + patch features at the stage's block), then per caption batch
  ``forward_intermediates`` (pooled + token features), the pooled cosine and the token noise
  1 − max patch cosine;
- ``engine images``: ``ClipEngine.encode_images`` (decode + keep-ratio preprocess + pooled);
- ``score stage``: ``score_table`` over a pairs shard (2 captions per image): pooled image and
  text embeddings, patch/token features at the intermediate block and token noise.
Each is timed ``--repeats`` times in one process, interleaved, and the fastest run counts
(robust to other load on the machine). Ratio = contender images/s ÷ baseline images/s.

FLOPs per image come from ``torch.utils.flop_counter`` on one ``encode_image``; on a GPU the
achieved TFLOP/s is also shown as a fraction of the device's dense bf16 peak.

    python benchmarks/score.py                      # CPU: tiny + ViT-B-16, random weights
    python benchmarks/score.py --device cuda --precision bf16 --models ViT-B-16 ViT-L-14 \
        --images 2048 --batch-size 256 --write
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu import bf16_peak_tflops, clip_image_flops  # benchmarks/gpu.py
from PIL import Image
from report import Figure, machine_line, print_run, write_section  # benchmarks/report.py

REPO = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks (no sparsity), from the vendors' data sheets.


@dataclass
class Row:
    model: str
    contender: str
    images: int
    seconds: float
    flops_per_image: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds


def procedural_shard(images: int, cache: Path):
    """A pairs shard of ``images`` procedural images (2 captions each), ingested for real."""
    from pedsynth.procedural import generate
    from pedsynth.schemas.config import IngestConfig, SourceConfig
    from pedsynth.tasks import sources
    from pedsynth.tasks.shards import read_shard

    root = cache / f"procedural-{images}"
    if not (root / "reid_raw.json").exists():
        generate(root, identities=max(3, -(-images // 4)), images_per_identity=4, seed=0)
    out = cache / f"ingest-{images}"
    chunks, _ = sources.plan_chunks(
        SourceConfig(format="cuhk-pedes", path=str(root)), out, 10 * images
    )
    import pyarrow as pa

    table = pa.concat_tables(
        [read_shard(sources.ingest_chunk(c, IngestConfig(), out)) for c in chunks]
    )
    first = {}
    for i, image_id in enumerate(table.column("image_id").to_pylist()):
        first.setdefault(image_id, i)
    keep = sorted(first.values())[:images]
    wanted = {table.column("image_id")[i].as_py() for i in keep}
    mask = [image_id in wanted for image_id in table.column("image_id").to_pylist()]
    table = table.filter(pa.array(mask))
    image_bytes = [table.column("image")[i]["bytes"].as_py() for i in keep]
    return table, image_bytes


def flops_per_image(model: torch.nn.Module, engine) -> float:
    """FLOPs of one image through the image tower, attention included (benchmarks/gpu.py)."""
    return clip_image_flops(model, engine.height, engine.width)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_model(name: str, args: argparse.Namespace, cache: Path) -> list[Row]:
    import open_clip

    from pedsynth.engines.clip import load_clip
    from pedsynth.schemas.vision import ClipModelConfig, ScoreConfig
    from pedsynth.tasks.score import score_table

    n = args.images if name.startswith("pedsynth-tiny") else args.large_images
    table, image_bytes = procedural_shard(n, cache)
    cfg = ClipModelConfig(
        model=name,
        pretrained="random",
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
    )
    engine = load_clip(cfg)
    model = engine.model
    _, _, preprocess = open_clip.create_model_and_transforms(name, force_image_size=(384, 128))
    batches = [image_bytes[i : i + args.batch_size] for i in range(0, n, args.batch_size)]

    tokenizer = open_clip.get_tokenizer(name)
    layers = engine.feature_layers  # the same blocks the stage reads, 1-based
    captions = table.column("caption").to_pylist()
    image_ids = table.column("image_id").to_pylist()
    slot = {image_id: k for k, image_id in enumerate(dict.fromkeys(image_ids))}
    text_proj = getattr(model, "text", model).text_projection

    def project(x: torch.Tensor, proj) -> torch.Tensor:
        return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj

    def baseline() -> None:
        """open_clip alone: pooled + patch features per image batch, pooled + token features
        per caption batch, the pooled cosine and 1 - max patch cosine per token."""
        pooled, patches = [], []
        with torch.inference_mode():
            for batch in batches:
                x = torch.stack(
                    [preprocess(Image.open(io.BytesIO(b)).convert("RGB")) for b in batch]
                )
                out = model.forward_intermediates(
                    image=x.to(engine.device, engine.dtype),
                    image_indices=[layers["image"] - 1],
                    normalize_intermediates=True,
                    image_output_fmt="NLC",
                )
                pooled.append(F.normalize(out["image_features"].float(), dim=-1))
                patch = project(out["image_intermediates"][0], model.visual.proj)
                patches.append(F.normalize(patch.float(), dim=-1))
            pooled_t, patches_t = torch.cat(pooled), torch.cat(patches)
            for start in range(0, len(captions), args.batch_size):
                texts = captions[start : start + args.batch_size]
                rows = torch.tensor([slot[i] for i in image_ids[start : start + args.batch_size]])
                ids = tokenizer(texts).to(engine.device)
                out = model.forward_intermediates(
                    text=ids, text_indices=[layers["text"] - 1], normalize_intermediates=True
                )
                text = F.normalize(out["text_features"].float(), dim=-1)
                tokens = F.normalize(project(out["text_intermediates"][0], text_proj).float(), -1)
                _ = (text * pooled_t[rows]).sum(-1).cpu()
                eot = ids.argmax(dim=-1)
                noise = 1.0 - torch.bmm(tokens, patches_t[rows].transpose(1, 2)).amax(-1)
                _ = [r[1:e].cpu().numpy() for r, e in zip(noise, eot.tolist(), strict=True)]

    def engine_images() -> None:
        engine.encode_images(image_bytes)

    def stage() -> None:
        score_table(table, ScoreConfig(clip=cfg), engine)

    contenders = [
        ("open_clip loop", baseline),
        ("engine images", engine_images),
        ("score stage", stage),
    ]
    stage()  # warm-up: kernels, allocator, tokenizer cache
    baseline()
    best = {label: float("inf") for label, _ in contenders}
    for _ in range(args.repeats):
        for label, fn in contenders:
            _sync(engine.device)
            start = time.perf_counter()
            fn()
            _sync(engine.device)
            best[label] = min(best[label], time.perf_counter() - start)
    flops = flops_per_image(model, engine)
    return [Row(name, label, n, best[label], flops) for label, _ in contenders]


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    return name, bf16_peak_tflops(name)


def render(rows: list[Row], args: argparse.Namespace, device: str, peak: float | None) -> str:
    base = {r.model: r for r in rows if r.contender == "open_clip loop"}
    lines = [
        "## CLIP score stage throughput (`benchmarks/score.py`)",
        "",
        f"Random-weight CLIPs at 384×128, device `{device}`, precision `{args.precision}`, "
        f"batch {args.batch_size}; best of {args.repeats} interleaved runs. Baseline "
        "(*open_clip loop*): open_clip alone doing the score stage's work on the same images, "
        "captions (2 per image) and weights: preprocess, image `forward_intermediates` (pooled "
        "+ patch features), text `forward_intermediates` (pooled + token features), pooled "
        "cosine and per-token noise. *engine images*: pooled image embeddings only (less "
        "work). Goal: score stage ≥ 0.9× the open_clip loop.",
        "",
        "| model | contender | images | s | images/s | ratio vs open_clip | "
        "GFLOP/image | achieved TFLOP/s" + (" | % bf16 peak |" if peak else " |"),
        "|---|---|---:|---:|---:|---:|---:|---:" + ("|---:|" if peak else "|"),
    ]
    for r in rows:
        achieved = r.flops_per_image * r.images_per_s / 1e12
        ratio = r.images_per_s / base[r.model].images_per_s
        line = (
            f"| {r.model} | {r.contender} | {r.images} | {r.seconds:.2f} | {r.images_per_s:,.1f} "
            f"| {ratio:.2f}× | {r.flops_per_image / 1e9:.2f} | {achieved:.3f} |"
        )
        if peak:
            line += f" {100 * achieved / peak:.1f}% |"
        lines.append(line)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    lines += [
        "",
        "- FLOPs: `torch.utils.flop_counter` over one `encode_image` (image tower only, "
        "attention included: `benchmarks/gpu.py`), so "
        f"the score stage's TFLOP/s counts image work only; load average during the run {load}",
        f"- command: `python benchmarks/score.py {' '.join(sys.argv[1:])}`",
        "",
        machine_line(("torch", "open_clip")),
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["pedsynth-tiny-clip", "ViT-B-16"])
    p.add_argument("--images", type=int, default=256, help="images for tiny models")
    p.add_argument("--large-images", type=int, default=64, help="images for the others")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--cache", type=Path, default=Path("/tmp/pedsynth-bench-score"))
    p.add_argument("--quick", action="store_true", help="tiny model, 64 images, 1 repeat")
    p.add_argument("--write", action="store_true", help="rewrite this section of BENCHMARKS.md")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> tuple[str, list[Figure]]:
    """Measure every model; returns the section body and the score-stage figure per model."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.quick:
        args.models, args.images, args.repeats = ["pedsynth-tiny-clip"], 64, 1
    from pedsynth.engines.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    args.precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[
        resolve_dtype(args.precision, device)
    ]
    args.cache.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    for name in args.models:
        rows += bench_model(name, args, args.cache)
        print(f"done: {name}", file=sys.stderr)
    device_name, peak = peak_tflops(device)
    body = render(rows, args, device_name, peak)
    base = {r.model: r for r in rows if r.contender == "open_clip loop"}
    figures = [
        Figure("score", f"score stage, {r.model}", r.images_per_s / base[r.model].images_per_s,
               0.9, True, "open_clip alone: same images, captions, pooled + patch + token "
               "features, cosine, token noise")
        for r in rows
        if r.contender == "score stage"
    ]  # fmt: skip
    if args.write:
        write_section("score", body)
    return body, figures


if __name__ == "__main__":
    raise SystemExit(print_run(run))

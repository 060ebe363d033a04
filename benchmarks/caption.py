"""Caption-stage throughput (transformers backend) against the same model's batched generate.

Both contenders caption the same procedural images with the same model, batch size, token
budget and sampling settings, one caption per image:

* **stage**: pedsynth's ``CaptionStage`` on an ingested pairs shard (template sampling, request
  building, image decoding, the engine's batched ``generate``, output checks, row building,
  the output Arrow table). ``max_retries: 0`` so it asks exactly one question per image, like
  the baseline; ``reject_truncated: false`` so nothing is regenerated for length.
* **baseline**: a plain loop over the same model with no pedsynth code: ``AutoProcessor`` and
  ``AutoModelForImageTextToText`` from the same folder, ``apply_chat_template`` over batches of
  the same size with the static instruction, ``model.generate``, ``batch_decode``.

Models are loaded and warmed up before timing; contenders alternate ``--repeats`` times and the
median is reported; ratio = stage time / baseline time (1.0 = no overhead).

Run ``python benchmarks/caption.py --quick`` for a smoke run and
``python benchmarks/caption.py --images 256 --write`` to update BENCHMARKS.md. ``--model`` takes
any image-text-to-text model folder or hub id (default the tiny random LLaVA); ``--device cuda``
runs both on a GPU.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

from report import BENCHMARKS_MD, write_section  # benchmarks/report.py

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def ingest(root: Path, images: int):
    """An ingested pairs shard of ``images`` procedural images (2 per identity)."""
    from pedsynth.procedural import generate
    from pedsynth.schemas.config import IngestConfig, SourceConfig
    from pedsynth.tasks import sources
    from pedsynth.tasks.shards import read_shard

    generate(root / "bench", identities=max(3, images // 2), images_per_identity=2, seed=1)
    chunks, _ = sources.plan_chunks(
        SourceConfig(format="cuhk-pedes", path=str(root / "bench")), root / "out", 10**6
    )
    table = read_shard(sources.ingest_chunk(chunks[0], IngestConfig(), root / "out"))
    first = table.group_by("image_id", use_threads=False).aggregate([])["image_id"]
    import pyarrow.compute as pc

    keep = pc.is_in(table["image_id"], value_set=first.slice(0, images))
    table = table.filter(keep)
    # one row per image, so the stage and the baseline see the same images
    seen, rows = set(), []
    for i, image_id in enumerate(table["image_id"].to_pylist()):
        if image_id not in seen:
            seen.add(image_id)
            rows.append(i)
    return table.take(rows)


class Baseline:
    """The model called directly: batches of images, one generate call per batch."""

    def __init__(self, folder: str, device: str, dtype, engine_cfg):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = AutoProcessor.from_pretrained(folder)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).to(device)
        self.model.eval()
        self.device, self.cfg = device, engine_cfg

    def run(self, images: list[bytes], prompt: str) -> list[str]:
        import torch
        from PIL import Image

        out: list[str] = []
        size = self.cfg.batch_size
        for start in range(0, len(images), size):
            batch = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start : start + size]]
            conversations = [
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": im},
                            {"type": "text", "text": prompt},
                        ],
                    }
                ]
                for im in batch
            ]
            with torch.inference_mode():
                enc = self.processor.apply_chat_template(
                    conversations,
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=True,
                    return_tensors="pt",
                    processor_kwargs={"padding": True},
                ).to(self.device)
                torch.manual_seed(start)
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=self.cfg.max_tokens,
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out


def measure(args: argparse.Namespace) -> dict:
    import torch

    from pedsynth.engines.device import resolve_device, resolve_dtype
    from pedsynth.engines.text import get_generator
    from pedsynth.engines.tiny_models import is_tiny, tiny_model_dir
    from pedsynth.prompts import load_prompt
    from pedsynth.schemas.text import CaptionConfig, EngineConfig
    from pedsynth.tasks.caption import CaptionStage

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = EngineConfig(
        model=args.model,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=args.device,
        temperature=0.9,
    )
    cfg = CaptionConfig(
        engine=engine,
        captions_per_image=1,
        template_share=args.template_share,
        max_retries=0,
        reject_truncated=False,
        max_words=10_000,
    )
    with tempfile.TemporaryDirectory() as tmp:
        shard = ingest(Path(tmp), args.images)
    images = [row["bytes"] for row in shard["image"].to_pylist()]
    device = resolve_device(args.device)
    folder = str(tiny_model_dir(args.model)) if is_tiny(args.model) else args.model
    baseline = Baseline(folder, device, resolve_dtype("auto", device), engine)
    stage = CaptionStage(cfg, seed=0)
    get_generator(engine, "vision")  # load before timing
    warm = shard.slice(0, min(len(images), args.batch_size))
    stage(warm)
    baseline.run(images[: args.batch_size], load_prompt("caption_static").text)

    stage_times, base_times = [], []
    produced = rejected = 0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out, rejects = stage(shard)
        stage_times.append(time.perf_counter() - t0)
        produced = out.num_rows - shard.num_rows
        rejected = rejects.num_rows
        t0 = time.perf_counter()
        texts = baseline.run(images, load_prompt("caption_static").text)
        base_times.append(time.perf_counter() - t0)
        assert len(texts) == len(images)
    stage_s, base_s = statistics.median(stage_times), statistics.median(base_times)
    return {
        "images": len(images),
        "stage_s": stage_s,
        "base_s": base_s,
        "stage_rate": len(images) / stage_s,
        "base_rate": len(images) / base_s,
        "ratio": stage_s / base_s,
        "produced": produced,
        "rejected": rejected,
        "device": device,
        "threads": torch.get_num_threads(),
    }


def render(results: list[dict], args: argparse.Namespace, command: str) -> str:
    import torch

    rows = "\n".join(
        f"| {r['images']:,} | {r['share']:.1f} | {r['device']} | {r['threads']} | "
        f"{r['stage_s']:.2f} | "
        f"{r['stage_rate']:.1f} | {r['base_s']:.2f} | {r['base_rate']:.1f} | {r['ratio']:.2f}× | "
        f"{r['produced']} / {r['rejected']} |"
        for r in results
    )
    cpu = platform.processor() or platform.machine()
    return (
        "## Caption stage throughput (`benchmarks/caption.py`)\n\n"
        f"`CaptionStage` (transformers backend, `{args.model}`, batch {args.batch_size}, "
        f"{args.max_tokens} new tokens, one caption per image, no regeneration) against the "
        "same model's batched "
        "`generate` called directly (`AutoProcessor` + `AutoModelForImageTextToText`, same "
        "batches, static instruction). Median of "
        f"{args.repeats} alternating runs; ratio = stage time / direct time (1.00× = no "
        "overhead).\n\n"
        "| images | template share | device | torch threads | stage s | stage captions/s | "
        "direct s | direct captions/s | ratio | captions kept / rejected |\n"
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n"
        f"{rows}\n\n"
        "- template share 0.0: every request carries the static instruction, as the direct "
        "loop does, so the ratio is the stage's own overhead; at 0.5 half the prompts are the "
        "longer template-guided instruction, which the model must also read\n"
        "- the tiny random model writes noise (kept = passed the output checks); throughput, "
        "not text, is measured\n\n"
        f"Machine: {cpu}, {os.cpu_count()} logical CPUs; python {platform.python_version()}; "
        f"torch {torch.__version__}; transformers {version('transformers')}; "
        f"date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC\n\n"
        f"Command: `{command}`\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[256])
    parser.add_argument("--model", default="tiny-random:llava")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--template-share", type=float, nargs="+", default=[0.0, 0.5])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--quick", action="store_true", help="64 images, 1 repeat")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = [64], 1
    results = []
    for n in args.images:
        for share in args.template_share:
            args_n = argparse.Namespace(**vars(args) | {"images": n, "template_share": share})
            results.append(measure(args_n) | {"share": share})
    command = "python benchmarks/caption.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    body = render(results, args, command.strip())
    print(body)
    if args.write:
        write_section("caption", body)
        print(f"wrote the caption section of {BENCHMARKS_MD}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

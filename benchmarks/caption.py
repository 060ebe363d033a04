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
    """The model called directly: batches of prompts (with images for a vision model), one
    ``generate`` call per batch, no pedsynth code."""

    def __init__(self, folder: str, device: str, dtype, engine_cfg, vision: bool = True):
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForImageTextToText,
            AutoProcessor,
            AutoTokenizer,
        )

        self.processor = AutoProcessor.from_pretrained(folder) if vision else None
        self.tokenizer = (
            self.processor.tokenizer if vision else AutoTokenizer.from_pretrained(folder)
        )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        model_cls = AutoModelForImageTextToText if vision else AutoModelForCausalLM
        self.model = model_cls.from_pretrained(folder, dtype=dtype).to(device)
        self.model.eval()
        self.device, self.cfg = device, engine_cfg

    def run(self, prompts: list[str], images: list[bytes] | None = None) -> list[str]:
        import torch
        from PIL import Image

        out: list[str] = []
        size = self.cfg.batch_size
        for start in range(0, len(prompts), size):
            texts = prompts[start : start + size]
            if images is None:
                conversations = [[{"role": "user", "content": t}] for t in texts]
                padding = {"padding": True}
            else:
                batch = [
                    Image.open(io.BytesIO(b)).convert("RGB") for b in images[start : start + size]
                ]
                conversations = [
                    [{"role": "user", "content": [{"type": "image", "image": im},
                                                  {"type": "text", "text": t}]}]
                    for im, t in zip(batch, texts, strict=True)
                ]  # fmt: skip
                padding = {"processor_kwargs": {"padding": True}}
            with torch.inference_mode():
                enc = (
                    (self.processor or self.tokenizer)
                    .apply_chat_template(
                        conversations,
                        add_generation_prompt=True,
                        tokenize=True,
                        return_dict=True,
                        return_tensors="pt",
                        **padding,
                    )
                    .to(self.device)
                )
                torch.manual_seed(start)
                gen = self.model.generate(
                    **enc,
                    max_new_tokens=self.cfg.max_tokens,
                    do_sample=True,
                    temperature=self.cfg.temperature,
                    top_p=self.cfg.top_p,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            new = gen[:, enc["input_ids"].shape[1] :]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out


def _prompt_tokens(table) -> int:
    return int((table.schema.metadata or {}).get(b"pedsynth.prompt_tokens", b"0"))


def _alternate(stage_fn, base_fn, generator, repeats: int):
    """Stage and baseline timed in turn ``repeats`` times. Returns both lists of times, the
    stage's seconds inside the engine's ``generate`` per run, and its last output. The timer
    wraps the engine instance's ``generate``; nothing else changes."""
    inside = [0.0]
    original = generator.generate

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return original(*a, **k)
        finally:
            inside[0] += time.perf_counter() - t0

    stage_times, base_times, generate_times, last = [], [], [], None
    generator.generate = timed
    try:
        for _ in range(repeats):
            inside[0] = 0.0
            t0 = time.perf_counter()
            last = stage_fn()
            stage_times.append(time.perf_counter() - t0)
            generate_times.append(inside[0])
            t0 = time.perf_counter()
            base_fn()
            base_times.append(time.perf_counter() - t0)
    finally:
        del generator.generate  # the class's method again
    return stage_times, base_times, generate_times, last


def _engine(args: argparse.Namespace, model: str):
    from pedsynth.schemas.text import EngineConfig

    return EngineConfig(
        model=model,
        max_tokens=args.max_tokens,
        batch_size=args.batch_size,
        device=args.device,
        temperature=0.9,
        cpu_threads=args.threads or None,
    )


def _baseline(args: argparse.Namespace, model: str, engine, vision: bool) -> Baseline:
    from pedsynth.engines.device import resolve_device, resolve_dtype
    from pedsynth.engines.tiny_models import is_tiny, tiny_model_dir

    device = resolve_device(args.device)
    folder = str(tiny_model_dir(model)) if is_tiny(model) else model
    return Baseline(folder, device, resolve_dtype("auto", device), engine, vision=vision)


def _result(stage: str, share, n: int, timed, base_n: int) -> dict:
    import torch

    stage_times, base_times, generate_times, (out, rejects) = timed
    best = min(range(len(stage_times)), key=stage_times.__getitem__)
    stage_s, base_s = stage_times[best], min(base_times)
    return {
        "stage": stage,
        "share": share,
        "requests": n,
        "stage_s": stage_s,
        "base_s": base_s,
        "stage_rate": n / stage_s,
        "base_rate": n / base_s,
        "speed": base_s / stage_s,
        "outside_generate_s": stage_s - generate_times[best],
        "produced": out.num_rows - base_n,
        "rejected": rejects.num_rows,
        "prompt_tokens": _prompt_tokens(out) / max(1, n),
        "threads": torch.get_num_threads(),
    }


def measure_caption(args: argparse.Namespace, shard, share: float) -> dict:
    from pedsynth.engines.text import get_generator
    from pedsynth.prompts import load_prompt
    from pedsynth.schemas.text import CaptionConfig
    from pedsynth.tasks.caption import CaptionStage

    engine = _engine(args, args.model)
    cfg = CaptionConfig(
        engine=engine,
        captions_per_image=1,
        template_share=share,
        max_retries=0,
        reject_truncated=False,
        max_words=10_000,
    )
    images = [row["bytes"] for row in shard["image"].to_pylist()]
    static = [load_prompt("caption_static").text] * len(images)
    baseline = _baseline(args, args.model, engine, vision=True)
    stage = CaptionStage(cfg, seed=0)
    generator = get_generator(engine, "vision")  # load before timing
    stage(shard.slice(0, min(len(images), args.batch_size)))  # warm-up
    baseline.run(static[: args.batch_size], images[: args.batch_size])
    timed = _alternate(
        lambda: stage(shard), lambda: baseline.run(static, images), generator, args.repeats
    )
    return _result("caption", share, len(images), timed, shard.num_rows)


def measure_rewrite(args: argparse.Namespace, shard) -> dict:
    from pedsynth.engines.text import get_generator
    from pedsynth.prompts import load_prompt
    from pedsynth.schemas.text import RewriteConfig
    from pedsynth.tasks.rewrite import RewriteStage

    engine = _engine(args, args.text_model)
    cfg = RewriteConfig(
        engine=engine,
        rewrites_per_caption=1,
        max_retries=0,
        reject_truncated=False,
        max_words=10_000,
        alpha=None,
        attributes=False,
    )
    prompt = load_prompt("rewrite")
    prompts = [prompt.render(caption=c) for c in shard.column("caption").to_pylist()]
    baseline = _baseline(args, args.text_model, engine, vision=False)
    stage = RewriteStage(cfg, seed=0)
    generator = get_generator(engine, "text")
    stage(shard.slice(0, min(shard.num_rows, args.batch_size)))
    baseline.run(prompts[: args.batch_size])
    timed = _alternate(lambda: stage(shard), lambda: baseline.run(prompts), generator, args.repeats)
    return _result("rewrite", None, len(prompts), timed, shard.num_rows)


def render(results: list[dict], args: argparse.Namespace, command: str) -> str:
    rows = [
        (r["stage"], "—" if r["share"] is None else f"{r['share']:.1f}", f"{r['requests']:,}",
         f"{r['prompt_tokens']:.1f}", f"{r['stage_s']:.2f}", f"{r['stage_rate']:.1f}",
         f"{r['outside_generate_s']:.2f}", f"{r['base_s']:.2f}", f"{r['base_rate']:.1f}",
         f"**{r['speed']:.2f}×**",
         f"{r['produced']} / {r['rejected']}")
        for r in results
    ]  # fmt: skip
    table = markdown_table(
        ("stage", "template share", "requests", "prompt tokens / request", "stage s",
         "stage req/s", "stage s outside `generate`", "direct s", "direct req/s",
         "speed vs direct", "kept / rejected"),
        rows, "llrrrrrrrrr",
    )  # fmt: skip
    static = {r["stage"]: r for r in results if r["share"] in (0.0, None)}
    notes = []
    for r in results:
        base = static.get(r["stage"])
        if r["share"] and base is not None:
            extra = r["prompt_tokens"] - base["prompt_tokens"]
            cost = (r["stage_s"] - base["stage_s"]) / base["stage_s"]
            notes.append(
                f"- template share {r['share']:.1f}: {extra:+.1f} prompt tokens per request "
                f"({100 * extra / base['prompt_tokens']:+.0f} % of the static prompt's "
                f"{base['prompt_tokens']:.0f}, image tokens included) and {100 * cost:+.0f} % "
                "stage time against share 0; the direct loop reads the static prompt in both "
                "rows, so its speed ratio there is not the stage's overhead"
            )
    return (
        "## Caption and rewrite stages against direct `generate` (`benchmarks/caption.py`)\n\n"
        f"*Caption*: `CaptionStage` (`{args.model}`) against the same model's batched "
        "`generate` called directly (`AutoProcessor` + `AutoModelForImageTextToText`, "
        "`apply_chat_template`, static instruction). *Rewrite*: `RewriteStage` "
        f"(`{args.text_model}`, faithfulness filter off: no embedder, no lexicon) against "
        "`AutoTokenizer` + `AutoModelForCausalLM` on the same rendered rewrite prompts. Both: "
        f"transformers backend, batch {args.batch_size}, {args.max_tokens} new tokens, "
        "temperature 0.9, one output per input, no regeneration (`max_retries: 0`), same "
        f"batches; fastest of {args.repeats} alternating runs. Speed = direct time / stage time; "
        "goal ≥ 0.9× at template share 0.\n\n"
        f"{table}\n"
        + "".join(n + "\n" for n in notes)
        + "- *stage s outside `generate`*: the stage's time minus the time spent in the "
        "engine's batched `generate` (a timer around the engine's method), i.e. everything "
        "pedsynth adds: template sampling, request building, image decoding, output checks, "
        "rows; the rest of any gap to the direct loop is the model's own run-to-run spread\n"
        "- the tiny random models write noise (kept = passed the output checks); "
        "throughput, not text, is measured\n\n"
        f"{machine_line(('torch', 'transformers'))}\n\nCommand: `{command}`\n"
    )


def run(argv: list[str] | None = None) -> tuple[str, list[Figure]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--model", default="tiny-random:llava")
    parser.add_argument("--text-model", default="tiny-random:llama")
    parser.add_argument("--stages", nargs="+", default=["caption", "rewrite"])
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
        args.images, args.repeats = 64, 1
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        shard = ingest(Path(tmp), args.images)
    if "caption" in args.stages:
        results += [measure_caption(args, shard, share) for share in args.template_share]
    if "rewrite" in args.stages:
        results.append(measure_rewrite(args, shard))
    command = "python benchmarks/caption.py " + shlex.join(
        argv if argv is not None else sys.argv[1:]
    )
    body = render(results, args, command.strip())
    figures = [
        Figure(r["stage"], f"{r['stage']} stage" + (", template share 0" * (r["share"] == 0)),
               r["speed"], 0.9, True, "the same model's batched `generate` called directly, "
               "same prompts and batches")
        for r in results
        if r["share"] in (0.0, None)
    ]  # fmt: skip
    if args.write:
        write_section("caption", body)
    return body, figures


if __name__ == "__main__":
    raise SystemExit(print_run(run))

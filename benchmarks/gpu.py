"""GPU suite: CLIP encoding, captioning, inpainting and training at real model sizes.

Every model is a real architecture built from a config in code with random weights, so the
suite needs no hub access and no downloads (throughput, not output quality, is measured):

* **clip**: open_clip ViT-B/16 and ViT-L/14 image towers through pedsynth's ``ClipEngine``
  (``image_forward``, what the score stage and the memory stage call), bf16, large batches of
  pixels already on the device; images/s and achieved TFLOP/s as a share of the device's dense
  bf16 peak (FLOPs of one image from ``torch.utils.flop_counter``).
* **caption**: pedsynth's ``TransformersGenerator`` (the caption stage's engine) on a
  Qwen2-VL-2B-size vision-language model saved to a local folder and loaded like a hub model,
  bf16, batches of 8-64 person crops, a fixed output length (``min_new_tokens`` =
  ``max_new_tokens`` in the model's generation config); captions/s.
* **inpaint**: pedsynth's ``DiffusionEngine`` (pad, pipeline, unpad, composite) around a
  ``StableDiffusionInpaintPipeline`` of SD-1.5 size (9-channel UNet, AutoencoderKL, CLIP text
  encoder), fp16, 20 DDIM steps, classifier-free guidance; edits/s at 384x128 and 512x256.
* **train**: the trainer's step (``DualEncoder``, ``weighted_losses`` SDM + ID, ``build_optimizer``
  Adam, the loop's schedule) for ViT-B/16 at 384x128, batch 64, bf16 autocast, on batches
  already on the device (no data loading); steps/s.

Each timing warms up first and brackets its calls with CUDA events (``synchronize`` after);
the best of ``--repeats`` counts. On a CUDA machine with torch + transformers (+ timm), install
what else it imports from a wheel folder, without dependencies::

    pip install --no-index --no-deps --find-links WHEELS open_clip_torch ftfy wcwidth diffusers
    #  and, where missing, pedsynth's own: pydantic pydantic_core annotated_types
    #  typing_inspection pyyaml pyarrow
    python benchmarks/gpu.py --check          # which imports are missing
    python benchmarks/gpu.py --write          # all rows; rewrites the gpu section of BENCHMARKS.md
    python benchmarks/gpu.py --device cpu --smoke   # every row at tiny sizes, in seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import io
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from anywhere, pedsynth installed or not
    sys.path.insert(0, str(REPO))

from report import load_average, markdown_table, write_section  # noqa: E402  (benchmarks/report.py)

SECTION = "gpu"
GROUPS = ("clip", "caption", "inpaint", "train")
# Modules each group needs beyond torch and transformers (pedsynth's own imports included).
NEEDS = {
    "clip": ("open_clip", "ftfy", "pydantic", "yaml"),
    "caption": ("pydantic", "yaml", "PIL"),
    "inpaint": ("diffusers", "pydantic", "yaml", "PIL"),
    "train": ("open_clip", "ftfy", "pydantic", "yaml", "pyarrow"),
}
# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets; the first
# pattern found in ``torch.cuda.get_device_name`` wins, so the specific names come first.
BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H100", 989.4),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989.4),
    ("GH200", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.2),
    ("A6000", 154.8),
)
CLIP_BOS, CLIP_EOS = 49406, 49407


def bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name, or None when the table does not know it."""
    for pattern, peak in BF16_PEAK_TFLOPS:
        if pattern in device_name:
            return peak
    return None


@dataclass
class Row:
    group: str
    model: str
    code: str  # the code path that ran
    shape: str  # input height x width
    batch: int
    precision: str
    rate: float  # items per second
    unit: str
    flops_per_item: float | None = None
    note: str = ""

    def tflops(self) -> float | None:
        return None if self.flops_per_item is None else self.flops_per_item * self.rate / 1e12


@dataclass
class Dims:
    """Model sizes of one run: the real ones, or tiny ones for ``--smoke``."""

    clip_models: tuple[str, ...] = ("ViT-B-16", "ViT-L-14")
    clip_batch: int = 512
    caption_batches: tuple[int, ...] = (8, 16, 32, 64)
    caption_tokens: int = 64
    inpaint_sizes: tuple[tuple[int, int], ...] = ((384, 128), (512, 256))
    inpaint_batch: int = 8
    inpaint_steps: int = 20
    train_model: str = "ViT-B-16"
    train_batch: int = 64
    train_identities: int = 11003  # CUHK-PEDES train
    smoke: bool = False
    repeats: int = 3
    iters: int = 10
    warmup: int = 2


SMOKE = Dims(
    clip_models=("pedsynth-tiny-clip",),
    clip_batch=4,
    caption_batches=(2,),
    caption_tokens=2,
    inpaint_sizes=((64, 32),),
    inpaint_batch=2,
    inpaint_steps=2,
    train_model="pedsynth-tiny-clip",
    train_batch=4,
    train_identities=8,
    smoke=True,
    repeats=1,
    iters=1,
    warmup=1,
)


# ---- timing and FLOPs ---------------------------------------------------------------------


def seconds_per_call(
    fn: Callable[[], Any], device: torch.device, *, iters: int, repeats: int, warmup: int = 2
) -> float:
    """Best over ``repeats`` of the mean time of ``iters`` calls, after ``warmup`` calls.

    On CUDA the calls are bracketed by events and synchronised, so the time is the device's,
    not the launch queue's."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize(device)
            elapsed = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            elapsed = time.perf_counter() - t0
        best = min(best, elapsed / iters)
    return best


def counted_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call as ``torch.utils.flop_counter`` counts them (matmuls, convolutions,
    attention; 2 per multiply-add).

    The counter misses fused attention kernels it has no formula for: ``nn.MultiheadAttention``'s
    inference fast path (``_native_multi_head_attention``: every attention FLOP of an open_clip
    ViT, a third of ViT-B/16's) and the CPU flash kernel of ``scaled_dot_product_attention``. So
    the fast path is off and attention runs as the math kernel (plain matmuls) while counting:
    the same FLOPs on every device."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with (
            torch.inference_mode(),
            sdpa_kernel(SDPBackend.MATH),
            FlopCounterMode(display=False) as counter,
        ):
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return float(counter.get_total_flops())


def clip_image_flops(model: torch.nn.Module, height: int, width: int) -> float:
    """FLOPs of encoding one ``height`` x ``width`` image with ``model.encode_image``."""
    p = next(model.parameters())
    x = torch.zeros(1, 3, height, width, device=p.device, dtype=p.dtype)
    return counted_flops(lambda: model.encode_image(x))


def architecture_patch(name: str) -> int:
    """The image tower's patch size of an open_clip architecture (pedsynth's tiny ones too)."""
    import open_clip

    from pedsynth.engines.tiny_clip import register_tiny_clips

    register_tiny_clips()
    patch = open_clip.get_model_config(name)["vision_cfg"]["patch_size"]
    return int(patch[0] if isinstance(patch, list | tuple) else patch)


def person_shape(patch: int) -> tuple[int, int]:
    """384x128 cut down to a multiple of the patch size (ViT-L/14: 378x126, 27x9 patches)."""
    return (384 // patch * patch, 128 // patch * patch)


# ---- rows ---------------------------------------------------------------------------------


def bench_clip(dims: Dims, device: torch.device) -> list[Row]:
    from pedsynth.engines.clip import build_engine
    from pedsynth.schemas.vision import ClipModelConfig

    precision = "fp32" if device.type == "cpu" else "bf16"
    rows = []
    for name in dims.clip_models:
        for shape in ((224, 224), "person"):
            cfg = ClipModelConfig(
                model=name,
                pretrained="random",
                device=str(device),
                precision=precision,
                batch_size=dims.clip_batch,
                **({"image_size": shape} if shape != "person" else {}),
            )
            if shape == "person":
                shape = person_shape(architecture_patch(name))
                cfg = cfg.model_copy(update={"image_size": shape})
            engine = build_engine(cfg)
            pixels = torch.randn(
                dims.clip_batch, 3, *shape, device=engine.device, dtype=engine.dtype
            )
            seconds = seconds_per_call(
                lambda engine=engine, pixels=pixels: engine.image_forward(pixels, False),
                engine.device,
                iters=dims.iters,
                repeats=dims.repeats,
                warmup=dims.warmup,
            )
            note = "" if shape in ((224, 224), (384, 128)) else "384×128 cut to the 14-px grid"
            rows.append(
                Row(
                    "clip",
                    name,
                    "pedsynth ClipEngine.image_forward",
                    f"{shape[0]}×{shape[1]}",
                    dims.clip_batch,
                    precision,
                    dims.clip_batch / seconds,
                    "images/s",
                    clip_image_flops(engine.model, *shape),
                    note,
                )
            )
            del engine, pixels
            _free(device)
    return rows


def _free(device: torch.device) -> None:
    """Hand cached accelerator memory back between models."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def person_jpegs(count: int, height: int = 384, width: int = 128, seed: int = 0) -> list[bytes]:
    """``count`` distinct JPEG crops (smooth random colour fields: person-crop sized, cheap)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        coarse = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


QWEN2VL_SPECIAL = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
# Qwen2-VL's chat layout: an image part becomes <|vision_start|><|image_pad|><|vision_end|>, which
# the processor expands to one pad token per merged 28x28 patch.
QWEN2VL_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def qwen2vl_config(tokenizer: Any, *, smoke: bool) -> Any:
    """Qwen2-VL-2B-Instruct's architecture (or a tiny one), token ids from ``tokenizer``."""
    from transformers import Qwen2VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN2VL_SPECIAL}
    if smoke:
        text = dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, vocab_size=len(tokenizer),
        )  # fmt: skip
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2)
    else:
        text = dict(
            hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
            num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
        )  # fmt: skip
        vision = dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16)
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    unit = head_dim // 16  # mrope sections (t, h, w) sum to head_dim / 2: 16, 24, 24 at 2B
    text |= dict(
        max_position_embeddings=32768,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 1_000_000.0,
            "mrope_section": [2 * unit, 3 * unit, 3 * unit],
        },
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision |= dict(mlp_ratio=4, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    return Qwen2VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def save_qwen2vl(folder: Path, *, smoke: bool, new_tokens: int, device: torch.device) -> Path:
    """A random-weight Qwen2-VL (bf16 off the CPU) with its processor, saved to ``folder``."""
    from transformers import (
        GenerationConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    from pedsynth.engines.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.add_tokens(QWEN2VL_SPECIAL, special_tokens=True)
    tokenizer.chat_template = QWEN2VL_CHAT_TEMPLATE
    config = qwen2vl_config(tokenizer, smoke=smoke)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
    # A fixed output length: EOS is not allowed before max_new_tokens (= the engine's max_tokens).
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        min_new_tokens=new_tokens,
    )
    model.save_pretrained(folder)
    del model
    _free(device)
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(folder)
    return folder


def bench_caption(dims: Dims, device: torch.device) -> list[Row]:
    from pedsynth.engines.text import ChatRequest
    from pedsynth.engines.transformers_backend import TransformersGenerator
    from pedsynth.prompts import load_prompt
    from pedsynth.schemas.text import EngineConfig

    dtype = "float32" if device.type == "cpu" else "bfloat16"
    prompt = load_prompt("caption_static").text
    images = person_jpegs(max(dims.caption_batches))
    rows = []
    with tempfile.TemporaryDirectory(prefix="pedsynth-gpu-qwen2vl-") as tmp:
        folder = save_qwen2vl(
            Path(tmp), smoke=dims.smoke, new_tokens=dims.caption_tokens, device=device
        )
        engine = TransformersGenerator(
            EngineConfig(
                model=str(folder),
                max_tokens=dims.caption_tokens,
                batch_size=max(dims.caption_batches),
                device=str(device),
                dtype=dtype,
                temperature=0.9,
            ),
            "vision",
        )
        for batch in dims.caption_batches:
            requests = [ChatRequest(f"r{i}", prompt, image=images[i], seed=i) for i in range(batch)]
            lengths: list[int | None] = []

            def run(requests: Sequence[ChatRequest] = requests, lengths: list = lengths) -> None:
                results = engine.generate(requests)
                lengths[:] = [r.completion_tokens for r in results]

            seconds = seconds_per_call(
                run, device, iters=1, repeats=dims.repeats, warmup=dims.warmup
            )
            if set(lengths) != {dims.caption_tokens}:
                raise RuntimeError(f"output lengths {sorted(set(lengths))}, not fixed")
            rows.append(
                Row(
                    "caption",
                    "Qwen2-VL-2B size" if not dims.smoke else "tiny Qwen2-VL",
                    "pedsynth TransformersGenerator (vision)",
                    "384×128",
                    batch,
                    "bf16" if dtype == "bfloat16" else "fp32",
                    batch / seconds,
                    "captions/s",
                    note=f"{dims.caption_tokens} new tokens each",
                )
            )
    return rows


def sd15_inpaint_pipeline(device: torch.device, dtype: torch.dtype) -> Any:
    """A ``StableDiffusionInpaintPipeline`` of SD-1.5 inpainting size, random weights."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from pedsynth.engines.tiny_models import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 77
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(
            sample_size=64,
            in_channels=9,  # latents + masked-image latents + mask
            out_channels=4,
            layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408,
                hidden_size=768,
                intermediate_size=3072,
                num_hidden_layers=12,
                num_attention_heads=12,
                max_position_embeddings=77,
                hidden_act="quick_gelu",
            )
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionInpaintPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe = pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def bench_inpaint(dims: Dims, device: torch.device) -> list[Row]:
    from pedsynth.engines.diffusion import DiffusionEngine, EditRequest
    from pedsynth.schemas.edit import DiffusionConfig

    precision = "fp32" if device.type == "cpu" else "fp16"
    pipe = None
    if not dims.smoke:
        pipe = sd15_inpaint_pipeline(device, torch.float16)
    rng = np.random.default_rng(0)
    rows = []
    for height, width in dims.inpaint_sizes:
        cfg = DiffusionConfig(
            method="inpaint",
            model="tiny-random:sd-inpaint" if dims.smoke else "random:sd-1.5-inpaint",
            device=str(device),
            precision=precision,
            steps=dims.inpaint_steps,
            height=height,
            width=width,
            batch_size=dims.inpaint_batch,
        )
        engine = DiffusionEngine(cfg, pipeline=pipe)
        pipe = engine.pipe
        mask = np.zeros((height, width), bool)
        mask[height // 5 : height // 2, width // 6 : -width // 6] = True  # the upper garment
        requests = [
            EditRequest(
                rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
                mask,
                "a red jacket",
                seed=i,
            )
            for i in range(dims.inpaint_batch)
        ]
        seconds = seconds_per_call(
            lambda engine=engine, requests=requests: engine.edit(requests),
            device,
            iters=1,
            repeats=dims.repeats,
            warmup=1,
        )
        rows.append(
            Row(
                "inpaint",
                "SD-1.5 inpaint size" if not dims.smoke else "tiny-random:sd-inpaint",
                "pedsynth DiffusionEngine.edit",
                f"{height}×{width}",
                dims.inpaint_batch,
                precision,
                dims.inpaint_batch / seconds,
                "edits/s",
                note=f"{dims.inpaint_steps} DDIM steps, guidance {cfg.guidance_scale}",
            )
        )
    del pipe
    _free(device)
    return rows


def bench_train(dims: Dims, device: torch.device) -> list[Row]:
    from pedsynth.schemas.train import LossConfig, ModelConfig, OptimConfig
    from pedsynth.train import losses
    from pedsynth.train.model import DualEncoder, create_clip
    from pedsynth.train.optim import build_optimizer, get_lr, set_lr

    torch.manual_seed(0)
    clip, _ = create_clip(ModelConfig(name=dims.train_model, image_size=(384, 128)), device)
    model = DualEncoder(clip, dims.train_identities).to(device).train()
    optim_cfg, loss_cfg = OptimConfig(), LossConfig()
    optimizer = build_optimizer(model, optim_cfg)
    b = dims.train_batch
    images = torch.randn(b, 3, 384, 128, device=device)
    tokens = torch.zeros(b, 77, dtype=torch.long, device=device)
    lengths = torch.randint(12, 60, (b,), device=device)
    tokens[:, 0] = CLIP_BOS
    body = torch.randint(1, CLIP_BOS, (b, 77), device=device)
    positions = torch.arange(77, device=device)
    tokens = torch.where((positions > 0) & (positions < lengths[:, None]), body, tokens)
    tokens[torch.arange(b, device=device), lengths] = CLIP_EOS
    labels = torch.randint(0, dims.train_identities, (b // 2,), device=device).repeat(2)
    amp = device.type == "cuda"
    step_count = [0]

    def step() -> None:  # the body of pedsynth.train.loop.train_epoch (no momentum, no accum)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            parts = losses.weighted_losses(
                loss_cfg,
                model.classifier,
                model.encode_image(images),
                model.encode_text(tokens),
                labels,
            )
        loss = sum(parts.values())
        loss.backward()
        lr = get_lr(step_count[0], base_lr=optim_cfg.lr, total_steps=10_000, warmup_steps=100)
        set_lr(optimizer, lr)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(loss.detach())  # the loop reads every loss back for its report
        step_count[0] += 1

    seconds = seconds_per_call(
        step, device, iters=dims.iters, repeats=dims.repeats, warmup=dims.warmup + 1
    )
    row = Row(
        "train",
        dims.train_model,
        "pedsynth DualEncoder + weighted_losses + build_optimizer (train_epoch's step)",
        "384×128",
        b,
        "bf16 autocast" if amp else "fp32",
        1 / seconds,
        "steps/s",
        note=f"SDM + ID over {dims.train_identities:,} ids, Adam; {b / seconds:,.0f} samples/s",
    )
    return [row]


BENCHES: dict[str, Callable[[Dims, torch.device], list[Row]]] = {
    "clip": bench_clip,
    "caption": bench_caption,
    "inpaint": bench_inpaint,
    "train": bench_train,
}


# ---- report -------------------------------------------------------------------------------


def missing_modules(group: str) -> list[str]:
    return [m for m in NEEDS[group] if importlib.util.find_spec(m) is None]


def device_line(device: torch.device) -> tuple[str, float | None]:
    """The device in words (name, memory, torch and CUDA versions) and its bf16 peak."""
    if device.type != "cuda":
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return (
            f"cpu {platform.processor() or platform.machine()}, {cpus} usable CPUs; torch "
            f"{torch.__version__}",
            None,
        )
    props = torch.cuda.get_device_properties(device)
    name = torch.cuda.get_device_name(device)
    peak = bf16_peak_tflops(name)
    return (
        f"{name}, {props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs; "
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
        f"{torch.backends.cudnn.version()}; bf16 dense peak "
        f"{f'{peak:,.0f} TFLOP/s' if peak else 'unknown'}",
        peak,
    )


TABLE_COLUMNS = (
    "row", "model", "code", "input", "batch", "precision", "throughput", "GFLOP/item",
    "TFLOP/s", "% bf16 peak", "note",
)  # fmt: skip


def render_table(rows: Sequence[Row], peak: float | None) -> str:
    cells = []
    for r in rows:
        tflops = r.tflops()
        cells.append(
            (
                r.group,
                r.model,
                r.code,
                r.shape,
                r.batch,
                r.precision,
                f"{r.rate:,.1f} {r.unit}",
                "–" if r.flops_per_item is None else f"{r.flops_per_item / 1e9:,.1f}",
                "–" if tflops is None else f"{tflops:,.2f}",
                "–" if tflops is None or peak is None else f"{100 * tflops / peak:.1f}%",
                r.note,
            )  # fmt: skip
        )
    return markdown_table(TABLE_COLUMNS, cells, "llllrlrrrrl")


def render(rows: Sequence[Row], skipped: dict[str, str], device: torch.device, command: str) -> str:
    described, peak = device_line(device)
    lines = [
        "## GPU suite (`benchmarks/gpu.py`)",
        "",
        "Real architectures with random weights built in code (no downloads); each row warms up, "
        "then times its calls with CUDA events, best of repeats. CLIP rows encode pixels already "
        "on the device (goal: ≥ 40% of the bf16 dense peak); caption rows generate a fixed "
        "number of tokens per caption; inpaint rows run the whole edit (pad, pipeline, unpad, "
        "composite); the train row is one optimiser step on batches already on the device.",
        "",
        render_table(rows, peak),
    ]
    for group, why in skipped.items():
        lines.append(f"- {group}: not run ({why})")
    lines += [
        "- FLOPs per image: `torch.utils.flop_counter` over one `encode_image` (matmuls, "
        "convolutions, attention)",
        f"- device: {described}",
        f"- load average {load_average()}; date {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; "
        f"command: `{command}`",
        "",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--only", nargs="+", choices=GROUPS, default=list(GROUPS))
    p.add_argument("--smoke", action="store_true", help="tiny dims: every row in seconds")
    p.add_argument("--check", action="store_true", help="list missing imports and stop")
    p.add_argument("--clip-batch", type=int, help="images per CLIP call (default 512)")
    p.add_argument("--repeats", type=int, help="timed repeats per row (default 3)")
    p.add_argument("--write", action="store_true", help="rewrite the gpu section of BENCHMARKS.md")
    return p.parse_args(argv)


def run_suite(args: argparse.Namespace) -> tuple[list[Row], dict[str, str], torch.device]:
    from pedsynth.engines.device import resolve_device

    dims = SMOKE if args.smoke else Dims()
    if args.clip_batch:
        dims = replace(dims, clip_batch=args.clip_batch)
    if args.repeats:
        dims = replace(dims, repeats=args.repeats)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    for group in args.only:
        missing = missing_modules(group)
        if missing:
            skipped[group] = f"missing {', '.join(missing)}"
            continue
        started = time.perf_counter()
        rows += BENCHES[group](dims, device)
        _free(device)  # the group's models are garbage now
        print(f"done: {group} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
    return rows, skipped, device


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if args.check:
        for group in args.only:
            missing = missing_modules(group)
            print(f"{group}: {'ready' if not missing else 'missing ' + ', '.join(missing)}")
        return 0
    rows, skipped, device = run_suite(args)
    command = "python benchmarks/gpu.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    body = render(rows, skipped, device, command.strip())
    print(body)
    if args.write:
        write_section(SECTION, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

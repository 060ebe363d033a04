"""Diffusion editing of person crops behind one small engine (diffusers).

:class:`DiffusionEngine` edits a batch of :class:`EditRequest` (an RGB crop, the boolean mask
of the region to change, a prompt, a seed) in one pipeline call per ``batch_size`` and returns
one RGB array per request, in order. What it guarantees for every method:

* **aspect ratio**: a crop is padded (edge pixels repeated) to the pipeline's aspect ratio,
  resized to ``height`` x ``width``, edited, resized back and unpadded, so a 64x160 person is
  never stretched;
* **locality**: pixels outside the mask are copied back from the original, so whatever the
  model did elsewhere, the person's identity cues outside the edited region survive;
* **determinism**: one ``torch.Generator`` per request, seeded from the request, so an edit
  does not depend on its batch neighbours' noise (the same batches give the same bytes; a
  different batch size may move a few pixels by one level, from float summation order).

Methods (``DiffusionConfig.method``): ``inpaint`` (``StableDiffusionInpaintPipeline``, text
guided, the mask given to the model), ``paint-by-example`` (``PaintByExamplePipeline``, guided
by a reference garment image) and ``instruct-pix2pix``
(``StableDiffusionInstructPix2PixPipeline``, an instruction, the mask used for compositing).
``model`` is a hub id, a local folder, or ``tiny-random:sd-inpaint`` /
``tiny-random:paint-by-example`` / ``tiny-random:instruct-pix2pix``: random-weight pipelines
built in code (2-block UNet, tiny VAE and CLIP text encoder, the tiny tokenizer and vision
tower of :mod:`pedsynth.engines.tiny_models`) that run in about 0.1 s per step on a CPU, for
tests and offline configs. The first one built in a process pays the first import of diffusers
and transformers (10-15 s on a small CPU); the build itself takes under a second.
:func:`get_diffusion` keeps one engine per config in each worker through the shared model
cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pedsynth.engines.cache import cache_key, cached, clear_kind
from pedsynth.engines.tiny_models import TINY_PREFIX
from pedsynth.schemas.edit import DiffusionConfig

_CACHE_KIND = "diffusion"
TINY_PIPELINES = ("sd-inpaint", "paint-by-example", "instruct-pix2pix")
_PIPELINE_CLASSES = {
    "inpaint": "StableDiffusionInpaintPipeline",
    "paint-by-example": "PaintByExamplePipeline",
    "instruct-pix2pix": "StableDiffusionInstructPix2PixPipeline",
}


@dataclass(frozen=True)
class EditRequest:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) bool: the pixels the edit may change
    prompt: str
    seed: int
    reference: np.ndarray | None = None  # (h, w, 3) uint8: paint-by-example's garment image


def _tiny_pipeline(name: str) -> Any:
    """A random-weight pipeline of ``tiny-random:NAME`` (fixed seed: the same weights always)."""
    import torch
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionInstructPix2PixPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from pedsynth.engines.tiny_models import (
        build_tokenizer,
        tiny_image_processor,
        tiny_vision_config,
    )

    if name not in TINY_PIPELINES:
        raise ValueError(f"unknown tiny pipeline {TINY_PREFIX}{name}; known: {TINY_PIPELINES}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        tokenizer = build_tokenizer()
        tokenizer.model_max_length = 77
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=32,
            in_channels=8 if name == "instruct-pix2pix" else 9,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=(2, 4),
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        image_encoder = None
        if name == "paint-by-example":
            from diffusers.pipelines.deprecated.paint_by_example import (
                PaintByExampleImageEncoder,
            )

            vision = tiny_vision_config(projection_dim=32)
            image_encoder = PaintByExampleImageEncoder(vision, proj_size=32)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    if image_encoder is not None:
        from diffusers.pipelines.deprecated.paint_by_example import PaintByExamplePipeline

        return PaintByExamplePipeline(
            vae=vae,
            image_encoder=image_encoder,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=tiny_image_processor(),
            requires_safety_checker=False,
        )
    cls = (
        StableDiffusionInpaintPipeline
        if name == "sd-inpaint"
        else StableDiffusionInstructPix2PixPipeline
    )
    return cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def load_pipeline(config: DiffusionConfig) -> Any:
    """The diffusers pipeline of ``config`` on its device and dtype."""
    import diffusers

    from pedsynth.engines.device import resolve_device, resolve_dtype

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.precision, device)
    if config.model.startswith(TINY_PREFIX):
        tiny = config.model.removeprefix(TINY_PREFIX)
        expected = {"inpaint": "sd-inpaint"}.get(config.method, config.method)
        if tiny != expected:
            raise ValueError(f"method {config.method!r} needs {TINY_PREFIX}{expected}")
        pipe = _tiny_pipeline(tiny)
    else:
        cls = getattr(diffusers, _PIPELINE_CLASSES[config.method])
        extra = {} if config.method == "paint-by-example" else {"requires_safety_checker": False}
        pipe = cls.from_pretrained(
            config.model,
            revision=config.revision,
            torch_dtype=dtype,
            safety_checker=None,
            **extra,
        )
    pipe = pipe.to(device)
    if pipe.unet.dtype != dtype:
        pipe = pipe.to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pad_to_aspect(image: np.ndarray, height: int, width: int) -> tuple[np.ndarray, tuple]:
    """``image`` padded (edges repeated) to the aspect ratio ``height:width``, and the
    (top, bottom, left, right) padding to cut off again."""
    h, w = image.shape[:2]
    if h * width >= w * height:  # too tall: pad the sides
        target_w = max(w, round(h * width / height))
        left = (target_w - w) // 2
        pad = (0, 0, left, target_w - w - left)
    else:
        target_h = max(h, round(w * height / width))
        top = (target_h - h) // 2
        pad = (top, target_h - h - top, 0, 0)
    widths = [(pad[0], pad[1]), (pad[2], pad[3])] + [(0, 0)] * (image.ndim - 2)
    mode = "edge" if image.dtype != bool else "constant"
    return np.pad(image, widths, mode=mode), pad


def unpad(image: np.ndarray, pad: tuple) -> np.ndarray:
    top, bottom, left, right = pad
    h, w = image.shape[:2]
    return image[top : h - bottom, left : w - right]


def _resize(array: np.ndarray, size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    from PIL import Image

    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return np.asarray(Image.fromarray(array).resize(size, resample))


class DiffusionEngine:
    """A loaded pipeline and the pad/edit/unpad/composite around it (module docstring)."""

    def __init__(self, config: DiffusionConfig, pipeline: Any | None = None):
        self.config = config
        self.pipe = pipeline if pipeline is not None else load_pipeline(config)

    @property
    def model_id(self) -> str:
        return self.config.model_id

    def pipeline_inputs(self, requests: Sequence[EditRequest]) -> dict[str, Any]:
        """The pipeline's keyword arguments for one batch (also what a benchmark calls the
        pipeline with directly), and the paddings under ``"_pads"``."""
        import torch
        from PIL import Image

        cfg = self.config
        images, masks, pads = [], [], []
        for r in requests:
            padded, pad = pad_to_aspect(r.image, cfg.height, cfg.width)
            mask, _ = pad_to_aspect(r.mask, cfg.height, cfg.width)
            images.append(Image.fromarray(_resize(padded, (cfg.width, cfg.height))))
            mask_u8 = mask.astype(np.uint8) * 255
            masks.append(Image.fromarray(_resize(mask_u8, (cfg.width, cfg.height), nearest=True)))
            pads.append((pad, padded.shape[:2]))
        device = self.pipe.device
        gen_device = device if device.type == "cuda" else "cpu"
        kwargs: dict[str, Any] = {
            "image": images,
            "num_inference_steps": cfg.steps,
            "guidance_scale": cfg.guidance_scale,
            "generator": [torch.Generator(gen_device).manual_seed(r.seed) for r in requests],
            "output_type": "np",
        }
        if cfg.method == "inpaint":
            kwargs |= {
                "prompt": [r.prompt for r in requests],
                "mask_image": masks,
                "height": cfg.height,
                "width": cfg.width,
                "strength": cfg.strength,
            }
        elif cfg.method == "paint-by-example":
            missing = [r.seed for r in requests if r.reference is None]
            if missing:
                raise ValueError(f"paint-by-example needs a reference image (seeds {missing})")
            kwargs |= {
                "example_image": [Image.fromarray(r.reference) for r in requests],
                "mask_image": masks,
                "height": cfg.height,
                "width": cfg.width,
            }
        else:
            kwargs["prompt"] = [r.prompt for r in requests]
            kwargs["image_guidance_scale"] = cfg.image_guidance_scale
        kwargs["_pads"] = pads
        return kwargs

    def edit(self, requests: Sequence[EditRequest]) -> list[np.ndarray]:
        """The edited crops (uint8 RGB, each the size of its input), in request order."""
        import torch

        out: list[np.ndarray] = []
        size = self.config.batch_size
        for start in range(0, len(requests), size):
            batch = list(requests[start : start + size])
            kwargs = self.pipeline_inputs(batch)
            pads = kwargs.pop("_pads")
            with torch.inference_mode():
                frames = self.pipe(**kwargs).images
            for request, frame, (pad, padded_shape) in zip(batch, frames, pads, strict=True):
                out.append(self._finish(request, frame, pad, padded_shape))
        return out

    @staticmethod
    def _finish(request: EditRequest, frame: np.ndarray, pad: tuple, padded_shape) -> np.ndarray:
        edited = (np.clip(np.asarray(frame, dtype=np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)
        edited = unpad(_resize(edited, (padded_shape[1], padded_shape[0])), pad)
        return np.where(request.mask[..., None], edited, request.image)


def get_diffusion(config: DiffusionConfig) -> DiffusionEngine:
    """The process-wide engine for ``config``, loaded on first use and then reused."""
    key = cache_key(_CACHE_KIND, config.model_dump(mode="json"))
    return cached(key, lambda: DiffusionEngine(config))


def clear_diffusion() -> None:
    clear_kind(_CACHE_KIND)

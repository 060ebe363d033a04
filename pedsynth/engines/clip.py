"""CLIP engine on open_clip: pooled embeddings and token-level features from one forward pass.

Noise-aware masking (MLLM4Text-ReID) needs per-token text features and per-patch image features
from an intermediate block (10 of 12), passed through the final norm and projection so they live
in the joint space. open_clip's ``forward_intermediates`` returns the pooled embedding and the
chosen block's output (through the final norm) in one pass; the engine adds the projection.

Preprocessing is :mod:`pedsynth.engines.clip_preprocess` (keep the aspect ratio, then pad or
crop to ``image_size``), weights come through :mod:`pedsynth.engines.clip_weights` (tag, hub
id, local safetensors or a train-retriever checkpoint, never a pickle), and tokens are stored
as :mod:`pedsynth.engines.clip_tokens` writes them.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pedsynth.engines.cache import cache_key, cached
from pedsynth.engines.clip_preprocess import mean_std_of, person_transform
from pedsynth.engines.clip_tokens import (
    TokenizedTexts,
    clip_token_strings,
    is_clip_bpe,
    tokenize,
)
from pedsynth.engines.clip_weights import (
    RANDOM_WEIGHTS,
    ClipLoadError,
    create_clip_model,
    load_clip_tokenizer,
    save_safetensors,
)
from pedsynth.engines.clip_weights import weights_identity as _weights_identity
from pedsynth.engines.device import resolve_device, resolve_dtype
from pedsynth.schemas.vision import ClipModelConfig

__all__ = [
    "RANDOM_WEIGHTS",
    "ClipEngine",
    "ClipLoadError",
    "ImageDecodeError",
    "TokenizedTexts",
    "build_engine",
    "clip_token_strings",
    "load_clip",
    "save_safetensors",
    "weights_identity",
]


class ImageDecodeError(ValueError):
    """Image bytes that Pillow cannot decode; the message says why."""


@dataclass(frozen=True)
class ImageFeatures:
    pooled: np.ndarray  # (N, D) float32, what ``encode_image`` returns (not normalised)
    patches: np.ndarray | None  # (N, P, D) float32 at ``feature_layer``: ln_post + proj, no CLS


@dataclass(frozen=True)
class TextFeatures:
    pooled: np.ndarray  # (N, D) float32, what ``encode_text`` returns (not normalised)
    tokens: list[list[str]]
    token_features: list[np.ndarray] | None  # per text (n_i, D): ln_final + projection
    truncated: list[bool]


@dataclass(frozen=True)
class PairScores:
    """Per pair: cosine of pooled embeddings and r_i = 1 − max_j cos(t_i, v_j) per token."""

    clip_score: np.ndarray  # (N,) float32
    tokens: list[list[str]]
    token_noise: list[np.ndarray]  # per pair (n_i,) float32, aligned with ``tokens``
    truncated: list[bool]


def weights_identity(cfg: ClipModelConfig) -> dict[str, Any]:
    """What the configured weights are, for fingerprints (a local file by its content)."""
    return _weights_identity(cfg.model, cfg.pretrained)


def _project(x: torch.Tensor, proj: Any) -> torch.Tensor:
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _pick_layer(requested: int | None, depth: int, tower: str) -> int:
    layer = requested if requested is not None else max(depth - 2, 1)
    if not 1 <= layer <= depth:
        raise ClipLoadError(f"clip.feature_layer {layer} is outside the {tower} tower (1..{depth})")
    return layer


class ClipEngine:
    """One loaded CLIP; methods take image bytes / strings and return numpy arrays.

    Thread-safe for inference (no state changes after construction), so Prefect's thread
    runner can share one engine across shard tasks.
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Any, cfg: ClipModelConfig):
        from open_clip.transformer import TextTransformer, VisionTransformer

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.precision, self.device)
        self.model = model.eval().to(device=self.device, dtype=self.dtype)
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.height, self.width = cfg.image_size
        mean, std = mean_std_of(model)
        self.preprocess = person_transform(cfg.image_size, cfg.resize_mode, mean, std)

        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ClipLoadError(
                f"{cfg.model}: token-level features need an open_clip ViT image tower without "
                f"attention pooling, got {type(visual).__name__}"
            )
        text = getattr(model, "text", None)  # CustomTextCLIP keeps its text tower apart
        if text is not None and (not isinstance(text, TextTransformer) or text.cls_emb is not None):
            raise ClipLoadError(
                f"{cfg.model}: token-level features need open_clip's own text transformer"
            )
        text_tower = text if text is not None else model
        self._text_proj = text_tower.text_projection
        self._image_layer = _pick_layer(
            cfg.feature_layer, len(visual.transformer.resblocks), "image"
        )
        self._text_layer = _pick_layer(
            cfg.feature_layer, len(text_tower.transformer.resblocks), "text"
        )
        self.context_length = int(getattr(model, "context_length", 77))
        if not is_clip_bpe(tokenizer):
            raise ClipLoadError(
                f"{cfg.model}: token-level features need open_clip's CLIP BPE tokenizer, "
                f"got {type(tokenizer).__name__}"
            )

    # ---- images -------------------------------------------------------------------------

    @property
    def embed_dim(self) -> int:
        return int(self.model.visual.output_dim)

    @property
    def feature_layers(self) -> dict[str, int]:
        return {"image": self._image_layer, "text": self._text_layer}

    def prepare_image(self, data: bytes) -> np.ndarray:
        """Decode and preprocess one image to a (3, H, W) float32 array; keeps the aspect ratio."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
        except Exception as exc:
            raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
        return self.preprocess(img).numpy()

    def pixels(self, images: Sequence[bytes]) -> np.ndarray:
        """(N, 3, H, W) float32; raises ``ImageDecodeError`` naming the first bad index."""
        out = np.empty((len(images), 3, self.height, self.width), np.float32)
        for i, data in enumerate(images):
            try:
                out[i] = self.prepare_image(data)
            except ImageDecodeError as exc:
                raise ImageDecodeError(f"image {i}: {exc}") from None
        return out

    @torch.inference_mode()
    def image_forward(
        self, pixels: np.ndarray | torch.Tensor, patches: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled (N, D), patch features (N, P, D) at the feature layer or None), on device.

        Patch features: the block output through ``ln_post`` (``normalize_intermediates``),
        class token dropped, then ``visual.proj`` into the joint space.
        """
        x = torch.as_tensor(pixels).to(self.device, self.dtype, non_blocking=True)
        if not patches:
            return self.model.encode_image(x, normalize=False), None
        out = self.model.forward_intermediates(
            image=x,
            image_indices=[self._image_layer - 1],
            normalize=False,
            normalize_intermediates=True,
            image_output_fmt="NLC",
        )
        patch = _project(out["image_intermediates"][0], self.model.visual.proj)
        return out["image_features"], patch

    def encode_images(
        self, images: Sequence[bytes] | np.ndarray, *, patches: bool = False
    ) -> ImageFeatures:
        """Pooled embeddings (and per-patch features) of images, in batches of ``batch_size``."""
        pooled, patch_list = [], []
        bs = self.cfg.batch_size
        for start in range(0, len(images), bs):
            batch = images[start : start + bs]
            px = batch if isinstance(batch, np.ndarray) else self.pixels(batch)
            p, t = self.image_forward(px, patches)
            pooled.append(p.float().cpu().numpy())
            if patches:
                patch_list.append(t.float().cpu().numpy())
        d = self.embed_dim
        return ImageFeatures(
            pooled=np.concatenate(pooled) if pooled else np.empty((0, d), np.float32),
            patches=(np.concatenate(patch_list) if patch_list else None) if patches else None,
        )

    # ---- texts --------------------------------------------------------------------------

    def token_strings(self, token_ids: Sequence[int]) -> list[str]:
        """Token ids as the ``tokens`` column stores them."""
        return clip_token_strings(self.tokenizer, token_ids)

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        """Token ids as open_clip builds them (SOT, BPE…, EOT, zero padding; cut to fit)."""
        return tokenize(self.tokenizer, texts, self.context_length)

    @torch.inference_mode()
    def text_forward(
        self, ids: torch.Tensor, token_features: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(pooled (N, D), features of every position (N, L, D) at the feature layer or None).

        Token features: the block output through ``ln_final`` (``normalize_intermediates``),
        then the text projection, at every position (start, end and padding included).
        """
        ids = ids.to(self.device)
        if not token_features:
            return self.model.encode_text(ids, normalize=False), None
        out = self.model.forward_intermediates(
            text=ids,
            text_indices=[self._text_layer - 1],
            normalize=False,
            normalize_intermediates=True,
        )
        return out["text_features"], _project(out["text_intermediates"][0], self._text_proj)

    def encode_texts(self, texts: Sequence[str], *, token_features: bool = False) -> TextFeatures:
        """Pooled embeddings (and content-token features at ``feature_layer``) of texts."""
        tokenized = self.tokenize(texts)
        pooled, feats = [], []
        bs = self.cfg.batch_size
        for start in range(0, len(texts), bs):
            p, t = self.text_forward(tokenized.ids[start : start + bs], token_features)
            pooled.append(p.float().cpu().numpy())
            if token_features:
                t = t.float().cpu().numpy()
                for j, eot in enumerate(tokenized.eot_positions[start : start + bs]):
                    feats.append(t[j, 1:eot])
        return TextFeatures(
            pooled=np.concatenate(pooled) if pooled else np.empty((0, self.embed_dim), np.float32),
            tokens=tokenized.tokens,
            token_features=feats if token_features else None,
            truncated=tokenized.truncated,
        )

    # ---- pairs --------------------------------------------------------------------------

    @torch.inference_mode()
    def score_pairs(
        self, pixels: np.ndarray, captions: Sequence[str], image_index: Sequence[int]
    ) -> PairScores:
        """Score captions against already-prepared images (``pixels[image_index[i]]``).

        Every image goes through the tower once (pooled + patches in one pass), then captions in
        batches; cosines and token noise are computed on the device in fp32.
        """
        n = len(captions)
        if len(image_index) != n:
            raise ValueError(f"{n} captions but {len(image_index)} image indices")
        img_pooled, img_patches = [], []
        for start in range(0, len(pixels), self.cfg.batch_size):
            p, t = self.image_forward(pixels[start : start + self.cfg.batch_size], True)
            img_pooled.append(F.normalize(p.float(), dim=-1))
            img_patches.append(F.normalize(t.float(), dim=-1))
        if n == 0:
            return PairScores(np.empty(0, np.float32), [], [], [])
        img_pooled_t, img_patches_t = torch.cat(img_pooled), torch.cat(img_patches)
        tokenized = self.tokenize(captions)
        index = torch.as_tensor(np.asarray(image_index, np.int64), device=self.device)
        scores, noise = [], []
        for start in range(0, n, self.cfg.batch_size):
            stop = min(start + self.cfg.batch_size, n)
            pooled, tok = self.text_forward(tokenized.ids[start:stop], True)
            rows = index[start:stop]
            pooled = F.normalize(pooled.float(), dim=-1)
            scores.append((pooled * img_pooled_t[rows]).sum(-1))
            sims = torch.bmm(F.normalize(tok.float(), dim=-1), img_patches_t[rows].transpose(1, 2))
            r = (1.0 - sims.amax(dim=-1)).cpu().numpy()  # (B, context)
            for j, eot in enumerate(tokenized.eot_positions[start:stop]):
                noise.append(r[j, 1:eot].astype(np.float32))
        return PairScores(
            clip_score=torch.cat(scores).cpu().numpy().astype(np.float32),
            tokens=tokenized.tokens,
            token_noise=noise,
            truncated=tokenized.truncated,
        )


def build_engine(cfg: ClipModelConfig) -> ClipEngine:
    """A new engine for ``cfg`` (no cache): weights, tokenizer, device."""
    model, tokenizer_name = create_clip_model(
        cfg.model, cfg.pretrained, image_size=cfg.image_size, seed=cfg.seed
    )
    return ClipEngine(model, load_clip_tokenizer(tokenizer_name), cfg)


def load_clip(cfg: ClipModelConfig) -> ClipEngine:
    """The process-wide engine for ``cfg`` (built on first use; Prefect tasks are short-lived)."""
    return cached(cache_key("clip", cfg.model_dump(mode="json")), lambda: build_engine(cfg))

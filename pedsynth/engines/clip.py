"""CLIP engine on open_clip: pooled embeddings and token-level features from one forward pass.

Noise-aware masking (MLLM4Text-ReID) needs per-token text features and per-patch image features
from an intermediate block (10 of 12), passed through the final norm and projection so they live
in the joint space. open_clip's ``encode_*`` only return the last layer, so this engine runs the
residual blocks itself and keeps the intermediate output on the way; a test checks the pooled
result still equals ``encode_image`` / ``encode_text``.

Person crops keep their aspect ratio: images are resized to fit (or cover) ``image_size``
(384×128 by default) and padded (or centre-cropped); a square pretrained model gets its
positional embedding interpolated to that grid. Weights come from an open_clip tag, an
``hf-hub:`` id, a local ``.safetensors`` file (read with safetensors, never unpickled) or a
seeded random init for the tiny test architectures.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from pedsynth.schemas.vision import ClipModelConfig

RANDOM_WEIGHTS = "random"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ClipLoadError(RuntimeError):
    """The configured CLIP cannot be built or its weights cannot be read."""


class ImageDecodeError(ValueError):
    """Image bytes that Pillow cannot decode; the message says why."""


@dataclass(frozen=True)
class TokenizedTexts:
    """CLIP token ids plus, per text, its content tokens (no start/end/padding) as strings."""

    ids: torch.Tensor  # (N, context_length) int64, exactly as open_clip's tokenizer builds it
    eot_positions: list[int]  # index of the end-of-text token in each row
    tokens: list[list[str]]  # content tokens, positions 1 .. eot-1
    truncated: list[bool]  # the caption did not fit the context and was cut


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


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ClipLoadError("clip.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[precision]


_weights_digests: dict[tuple[str, int, int], str] = {}


def weights_identity(cfg: ClipModelConfig) -> dict[str, Any]:
    """What the weights are, for fingerprints: a local file by content, anything else by name."""
    import open_clip

    ident: dict[str, Any] = {"model": cfg.model, "pretrained": cfg.pretrained}
    ident["open_clip"] = open_clip.__version__
    path = Path(cfg.pretrained)
    if cfg.pretrained.endswith(".safetensors") and path.is_file():
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _weights_digests:
            digest = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 22):
                    digest.update(chunk)
            _weights_digests[key] = digest.hexdigest()
        ident["pretrained"] = f"sha256:{_weights_digests[key]}"
    return ident


def _hub_name(cfg: ClipModelConfig) -> str | None:
    for value in (cfg.pretrained, cfg.model):
        if value.startswith("hf-hub:"):
            return value
    return None


def _create_model(cfg: ClipModelConfig) -> tuple[torch.nn.Module, str]:
    """Build the open_clip model on the CPU in fp32; returns it and the tokenizer's model name."""
    import open_clip

    from pedsynth.engines.tiny_clip import register_tiny_clips

    register_tiny_clips()
    size = tuple(cfg.image_size)
    hub = _hub_name(cfg)
    try:
        if hub is not None:
            model = open_clip.create_model(hub, force_image_size=size, weights_only=True)
            return model, hub
        if cfg.model not in open_clip.list_models():
            raise ClipLoadError(
                f"clip.model {cfg.model!r} is not an open_clip architecture "
                f"(see open_clip.list_models(); tiny ones: pedsynth-tiny-clip*)"
            )
        if cfg.pretrained == RANDOM_WEIGHTS or cfg.pretrained.endswith(".safetensors"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = open_clip.create_model(cfg.model, force_image_size=size)
            if cfg.pretrained != RANDOM_WEIGHTS:
                _load_safetensors(model, cfg.pretrained)
            return model, cfg.model
        if Path(cfg.pretrained).exists():
            raise ClipLoadError(
                f"clip.pretrained {cfg.pretrained!r}: local weights must be a .safetensors file "
                "(pickled checkpoints are not loaded)"
            )
        model = open_clip.create_model(
            cfg.model, pretrained=cfg.pretrained, force_image_size=size, weights_only=True
        )
        return model, cfg.model
    except ClipLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/OSError/HTTP errors
        raise ClipLoadError(
            f"cannot load CLIP model={cfg.model!r} pretrained={cfg.pretrained!r}: {exc} "
            "(offline? weights must already be in the Hugging Face cache or a local file)"
        ) from exc


def _load_safetensors(model: torch.nn.Module, path: str) -> None:
    from open_clip.model import resize_pos_embed, resize_text_pos_embed
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ClipLoadError(f"clip.pretrained {path!r}: no such file")
    try:
        state = load_file(path, device="cpu")
    except Exception as exc:
        raise ClipLoadError(
            f"clip.pretrained {path!r}: not a readable safetensors file: {exc}"
        ) from None
    state = {k.removeprefix("module."): v for k, v in state.items()}
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ClipLoadError(
            f"clip.pretrained {path!r} does not fit the architecture: {exc}"
        ) from None


def save_safetensors(model: torch.nn.Module, path: str | Path) -> None:
    """Write a model's weights as safetensors (the format ``pretrained: <file>`` reads)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


class _Tower:
    """The pieces of one tower that the explicit forward pass needs."""

    def __init__(self, blocks: torch.nn.ModuleList, batch_first: bool, layer: int):
        self.blocks, self.batch_first, self.layer = blocks, batch_first, layer

    def run(self, x: torch.Tensor, attn_mask: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        """All blocks; returns (final output, output of block ``layer``), both batch first."""
        if not self.batch_first:
            x = x.transpose(0, 1)
        middle = None
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=attn_mask)
            if i + 1 == self.layer:
                middle = x
        if not self.batch_first:
            x, middle = x.transpose(0, 1), middle.transpose(0, 1)
        return x, middle


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
        from open_clip.model import get_model_preprocess_cfg
        from open_clip.transformer import TextTransformer, VisionTransformer

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.precision, self.device)
        self.model = model.eval().to(device=self.device, dtype=self.dtype)
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.height, self.width = cfg.image_size
        pre = get_model_preprocess_cfg(model)
        self.mean = np.asarray(pre.get("mean", (0.48145466, 0.4578275, 0.40821073)), np.float32)
        self.std = np.asarray(pre.get("std", (0.26862954, 0.26130258, 0.27577711)), np.float32)

        visual = model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None:
            raise ClipLoadError(
                f"{cfg.model}: token-level features need an open_clip ViT image tower without "
                f"attention pooling, got {type(visual).__name__}"
            )
        vt = visual.transformer
        self._vision = _Tower(
            vt.resblocks, vt.batch_first, _pick_layer(cfg.feature_layer, len(vt.resblocks), "image")
        )
        text = getattr(model, "text", None)
        if text is not None:  # CustomTextCLIP
            if not isinstance(text, TextTransformer) or text.cls_emb is not None:
                raise ClipLoadError(
                    f"{cfg.model}: token-level features need open_clip's own text transformer"
                )
            tt, self._ln_final = text.transformer, text.ln_final
            self._text_proj = text.text_projection
            self._text_pool, self._eos_id = text.pool_type, text.eos_id
        else:
            tt, self._ln_final = model.transformer, model.ln_final
            self._text_proj = model.text_projection
            self._text_pool = model.text_pool_type
            self._eos_id = getattr(model, "text_eos_id", None)
        self._text = _Tower(
            tt.resblocks, tt.batch_first, _pick_layer(cfg.feature_layer, len(tt.resblocks), "text")
        )
        self.context_length = int(getattr(model, "context_length", 77))
        for attr in ("encode", "decoder", "byte_decoder", "sot_token_id", "eot_token_id"):
            if not hasattr(tokenizer, attr):
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
        return {"image": self._vision.layer, "text": self._text.layer}

    def prepare_image(self, data: bytes) -> np.ndarray:
        """Decode and preprocess one image to a (3, H, W) float32 array; keeps the aspect ratio."""
        try:
            with Image.open(io.BytesIO(data)) as img:
                img = img.convert("RGB")
        except Exception as exc:
            raise ImageDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from None
        return self.preprocess(img)

    def preprocess(self, img: Image.Image) -> np.ndarray:
        w, h = img.size
        fit = min if self.cfg.resize_mode == "pad" else max
        scale = fit(self.height / h, self.width / w)
        new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        pixels = np.asarray(img, dtype=np.float32) / 255.0
        canvas = np.empty((self.height, self.width, 3), np.float32)
        canvas[:] = self.mean  # padding becomes 0 after normalisation
        top, left = (self.height - new_h) // 2, (self.width - new_w) // 2
        # Negative offsets crop (resize_mode="crop"), positive ones pad.
        src = pixels[max(0, -top) :, max(0, -left) :][: self.height, : self.width]
        dst_top, dst_left = max(0, top), max(0, left)
        canvas[dst_top : dst_top + src.shape[0], dst_left : dst_left + src.shape[1]] = src
        return ((canvas - self.mean) / self.std).transpose(2, 0, 1).copy()

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
    def _image_forward(self, pixels: np.ndarray | torch.Tensor, patches: bool):
        visual = self.model.visual
        x = torch.as_tensor(pixels).to(self.device, self.dtype, non_blocking=True)
        x = visual._embeds(x)
        x, middle = self._vision.run(x, None)
        pooled, _ = visual._pool(x)
        pooled = _project(pooled, visual.proj)
        if not patches:
            return pooled, None
        return pooled, _project(visual.ln_post(middle[:, 1:]), visual.proj)

    def encode_images(
        self, images: Sequence[bytes] | np.ndarray, *, patches: bool = False
    ) -> ImageFeatures:
        """Pooled embeddings (and per-patch features) of images, in batches of ``batch_size``."""
        pooled, patch_list = [], []
        bs = self.cfg.batch_size
        for start in range(0, len(images), bs):
            batch = images[start : start + bs]
            px = batch if isinstance(batch, np.ndarray) else self.pixels(batch)
            p, t = self._image_forward(px, patches)
            pooled.append(p.float().cpu().numpy())
            if patches:
                patch_list.append(t.float().cpu().numpy())
        d = self.embed_dim
        return ImageFeatures(
            pooled=np.concatenate(pooled) if pooled else np.empty((0, d), np.float32),
            patches=(np.concatenate(patch_list) if patch_list else None) if patches else None,
        )

    # ---- texts --------------------------------------------------------------------------

    def _token_string(self, token_id: int) -> str:
        tok = self.tokenizer
        raw = bytearray(tok.byte_decoder[c] for c in tok.decoder[token_id])
        return raw.decode("utf-8", errors="replace").replace("</w>", "")

    def tokenize(self, texts: Sequence[str]) -> TokenizedTexts:
        """Token ids as open_clip builds them (SOT, BPE…, EOT, zero padding; cut to fit)."""
        tok, ctx = self.tokenizer, self.context_length
        ids = torch.zeros(len(texts), ctx, dtype=torch.long)
        eot_positions, tokens, truncated = [], [], []
        for i, text in enumerate(texts):
            body = tok.encode(text)
            cut = len(body) + 2 > ctx
            body = body[: ctx - 2]
            row = [tok.sot_token_id, *body, tok.eot_token_id]
            ids[i, : len(row)] = torch.tensor(row)
            eot_positions.append(len(row) - 1)
            tokens.append([self._token_string(t) for t in body])
            truncated.append(cut)
        return TokenizedTexts(ids, eot_positions, tokens, truncated)

    @torch.inference_mode()
    def _text_forward(self, ids: torch.Tensor, token_features: bool):
        model = self.model
        ids = ids.to(self.device)
        text = getattr(model, "text", None)
        if text is not None:
            x, mask = text._embeds(ids)
        else:
            cast = model.transformer.get_cast_dtype()
            x = model.token_embedding(ids).to(cast) + model.positional_embedding.to(cast)
            mask = model.attn_mask
        x, middle = self._text.run(x, mask)
        from open_clip.transformer import text_global_pool

        pooled = text_global_pool(self._ln_final(x), ids, self._text_pool, self._eos_id)
        pooled = _project(pooled, self._text_proj)
        if not token_features:
            return pooled, None
        return pooled, _project(self._ln_final(middle), self._text_proj)

    def encode_texts(self, texts: Sequence[str], *, token_features: bool = False) -> TextFeatures:
        """Pooled embeddings (and content-token features at ``feature_layer``) of texts."""
        tokenized = self.tokenize(texts)
        pooled, feats = [], []
        bs = self.cfg.batch_size
        for start in range(0, len(texts), bs):
            p, t = self._text_forward(tokenized.ids[start : start + bs], token_features)
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
            p, t = self._image_forward(pixels[start : start + self.cfg.batch_size], True)
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
            pooled, tok = self._text_forward(tokenized.ids[start:stop], True)
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


_engines: dict[str, ClipEngine] = {}
_engines_lock = threading.Lock()


def load_clip(cfg: ClipModelConfig) -> ClipEngine:
    """The process-wide engine for ``cfg`` (built on first use; Prefect tasks are short-lived)."""
    key = cfg.model_dump_json()
    with _engines_lock:
        if key not in _engines:
            import open_clip

            model, tokenizer_name = _create_model(cfg)
            try:
                tokenizer = open_clip.get_tokenizer(tokenizer_name)
            except Exception as exc:
                raise ClipLoadError(
                    f"cannot load the tokenizer of {tokenizer_name!r}: {exc}"
                ) from exc
            _engines[key] = ClipEngine(model, tokenizer, cfg)
        return _engines[key]

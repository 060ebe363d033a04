"""Where CLIP weights come from: one rule for the CLIP engine and the trainer.

``pretrained`` is one of
- an open_clip tag (``openai``, ``laion2b_s34b_b88k``) or an ``hf-hub:org/repo`` id (as the
  model or as ``pretrained``): open_clip fetches it (from the Hugging Face cache when offline);
- a local ``.safetensors`` file: an open_clip state dict, or a checkpoint of ``train-retriever``
  (``RUN_DIR/checkpoints/best.safetensors``), whose CLIP tensors sit under ``model.clip.`` next
  to the identity classifier (and, in ``last``, the optimiser): the CLIP part is taken, strictly;
- ``random`` (or nothing): a random init, seeded when a seed is given.

Pickled weights (``.pt``, ``.bin``, ``.pth``) are never loaded: unpickling runs code. A square
model's position grid is interpolated to a non-square ``image_size`` (person crops).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

RANDOM_WEIGHTS = "random"
HUB_PREFIX = "hf-hub:"
LOCAL_DIR_PREFIX = "local-dir:"
# Where the CLIP's tensors sit in the files we accept, most specific last: a bare open_clip
# state dict, one saved from DataParallel, a train-retriever checkpoint (DualEncoder under
# ``model``), a DualEncoder's own state dict.
CLIP_PREFIXES = ("", "module.", "model.clip.", "clip.")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


class ClipLoadError(RuntimeError):
    """The configured CLIP cannot be built or its weights cannot be read."""


def is_random(pretrained: str | None) -> bool:
    return pretrained in (None, "", RANDOM_WEIGHTS)


def create_clip_model(
    model: str,
    pretrained: str | None = RANDOM_WEIGHTS,
    *,
    image_size: Sequence[int] | None = None,
    seed: int | None = None,
) -> tuple[torch.nn.Module, str]:
    """Build an open_clip model on the CPU in fp32 with the weights ``pretrained`` names.

    ``image_size`` = (height, width) overrides the architecture's; ``seed`` makes a random init
    reproducible on its own (``None``: the global torch RNG decides). Returns the model and the
    name its tokenizer is found under. Raises :class:`ClipLoadError` with what to fix.
    """
    import open_clip

    from pedsynth.engines.tiny_clip import register_tiny_clips

    register_tiny_clips()
    size = tuple(int(s) for s in image_size) if image_size is not None else None
    hub = next((v for v in (pretrained, model) if v and v.startswith(HUB_PREFIX)), None)
    try:
        if hub is not None:
            made = open_clip.create_model(hub, force_image_size=size, weights_only=True)
            return made, hub
        if model.startswith(LOCAL_DIR_PREFIX):
            _refuse_pickles_in(Path(model.removeprefix(LOCAL_DIR_PREFIX)))
            made = open_clip.create_model(model, force_image_size=size, weights_only=True)
            return made, model
        if model not in open_clip.list_models():
            raise ClipLoadError(
                f"CLIP model {model!r} is not an open_clip architecture "
                "(see open_clip.list_models(); tiny ones: pedsynth-tiny-clip*)"
            )
        if is_random(pretrained) or pretrained.endswith(".safetensors"):
            made = _random_init(model, size, seed)
            if not is_random(pretrained):
                load_safetensors_into(made, pretrained)
            return made, model
        if Path(pretrained).exists():
            raise ClipLoadError(
                f"CLIP pretrained {pretrained!r}: local weights must be a .safetensors file "
                "(pickled checkpoints are not loaded)"
            )
        made = open_clip.create_model(
            model, pretrained=pretrained, force_image_size=size, weights_only=True
        )
        return made, model
    except ClipLoadError:
        raise
    except Exception as exc:  # open_clip raises RuntimeError/OSError/HTTP errors
        raise ClipLoadError(
            f"cannot load CLIP model={model!r} pretrained={pretrained!r}: {exc} "
            "(offline? weights must already be in the Hugging Face cache or a local file)"
        ) from exc


def load_clip_tokenizer(name: str, context_length: int | None = None) -> Any:
    """open_clip's tokenizer for a model name returned by :func:`create_clip_model`."""
    import open_clip

    try:
        return open_clip.get_tokenizer(name, context_length=context_length)
    except Exception as exc:
        raise ClipLoadError(f"cannot load the tokenizer of {name!r}: {exc}") from exc


def _random_init(model: str, size: tuple[int, ...] | None, seed: int | None) -> torch.nn.Module:
    import open_clip

    if seed is None:
        return open_clip.create_model(model, force_image_size=size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return open_clip.create_model(model, force_image_size=size)


def _refuse_pickles_in(folder: Path) -> None:
    """open_clip would unpickle a ``.bin``/``.pth`` in a local dir when there is no
    ``.safetensors`` beside it (it prefers safetensors when both exist)."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ClipLoadError(
            f"{LOCAL_DIR_PREFIX}{folder}: holds only pickled weights ({', '.join(pickles)}); "
            "convert them to .safetensors (pickled checkpoints are not loaded)"
        )


def clip_state_of(tensors: dict[str, torch.Tensor], model: torch.nn.Module) -> dict:
    """The CLIP's own tensors out of a saved file: under the first prefix of
    :data:`CLIP_PREFIXES` that holds the model's ``logit_scale``; other tensors are ignored."""
    for prefix in CLIP_PREFIXES:
        if f"{prefix}logit_scale" in tensors:
            break
    else:
        return tensors  # no known layout: the strict load names what is missing
    if prefix:
        ignored = {k.split(".", 1)[0] for k in tensors if not k.startswith(prefix)}
        if ignored:
            log.debug("CLIP weights under %r; ignored: %s", prefix, sorted(ignored))
    return {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}


def load_safetensors_into(model: torch.nn.Module, path: str | Path) -> None:
    """Load a ``.safetensors`` file (see :func:`clip_state_of`) into ``model``, strictly."""
    from open_clip.model import resize_pos_embed, resize_text_pos_embed
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise ClipLoadError(f"CLIP pretrained {str(path)!r}: no such file")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as exc:
        raise ClipLoadError(
            f"CLIP pretrained {str(path)!r}: not a readable safetensors file: {exc}"
        ) from None
    state = clip_state_of(tensors, model)
    _check_position_grid(state, model, path)
    resize_pos_embed(state, model)
    resize_text_pos_embed(state, model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())  # torch's message spans lines; keep one
        raise ClipLoadError(
            f"CLIP pretrained {str(path)!r} does not fit the architecture: {reason}"
        ) from None


def _check_position_grid(state: dict, model: torch.nn.Module, path: str | Path) -> None:
    """open_clip interpolates a saved position grid only from a square one."""
    saved = state.get("visual.positional_embedding")
    grid = getattr(getattr(model, "visual", None), "grid_size", None)
    if saved is None or grid is None:
        return
    rows, cols = (grid, grid) if isinstance(grid, int) else grid
    patches = saved.shape[0] - 1
    if patches != rows * cols and math.isqrt(patches) ** 2 != patches:
        raise ClipLoadError(
            f"CLIP pretrained {str(path)!r} was trained on a non-square grid of {patches} "
            f"patches, this model has {rows}×{cols}: set image_size to the one it was trained at"
        )


def save_safetensors(model: torch.nn.Module, path: str | Path) -> None:
    """Write a model's weights as safetensors (the format ``pretrained: <file>`` reads)."""
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))


_weights_digests: dict[tuple[str, int, int], str] = {}


def weights_identity(model: str, pretrained: str | None) -> dict[str, Any]:
    """What the weights are, for fingerprints: a local file by content, anything else by name."""
    import open_clip

    ident: dict[str, Any] = {"model": model, "pretrained": pretrained}
    ident["open_clip"] = open_clip.__version__
    path = Path(pretrained or "")
    if pretrained and pretrained.endswith(".safetensors") and path.is_file():
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

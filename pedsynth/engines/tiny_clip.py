"""Tiny CLIP architectures registered with open_clip, for tests and offline configs.

open_clip keeps architectures as data (JSON configs in a registry); these are ours. They build
with random weights in well under a second and need no download: ``pretrained: random``.
Names: ``pedsynth-tiny-clip`` (384×128 person crops, 16-pixel patches) and
``pedsynth-tiny-clip-small`` (128×64 input, for fast CPU training tests).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path


def _tiny_config(image_size: tuple[int, int]) -> dict:
    """4 layers of width 64 in both towers, 16-pixel patches; the real CLIP BPE vocabulary."""
    return {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": list(image_size),
            "layers": 4,
            "width": 64,
            "head_width": 32,
            "patch_size": 16,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 4,
        },
    }


TINY_CLIP_CONFIGS: dict[str, dict] = {
    "pedsynth-tiny-clip": _tiny_config((384, 128)),
    "pedsynth-tiny-clip-small": _tiny_config((128, 64)),
}

_registered = False


def register_tiny_clips() -> list[str]:
    """Register the tiny architectures with open_clip (idempotent); returns their names."""
    global _registered
    if not _registered:
        import open_clip

        folder = Path(tempfile.mkdtemp(prefix="pedsynth-clip-configs-"))
        for name, cfg in TINY_CLIP_CONFIGS.items():
            path = folder / f"{name}.json"
            path.write_text(json.dumps(cfg))
            open_clip.add_model_config(path)
        _registered = True
    return list(TINY_CLIP_CONFIGS)

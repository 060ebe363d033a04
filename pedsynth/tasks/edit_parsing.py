"""Region masks from a human-parsing segmentation model: SegFormer clothes parsing.

``masks: {backend: segformer, model: ...}`` loads ``SegformerForSemanticSegmentation`` and its
image processor (a hub id or a local folder, remote code never run) once per worker through
the shared model cache. The checkpoint's ``id2label`` is mapped onto the bank's regions by
label name (``parsing:`` of each region in ``prompts/attributes.yaml``, compared ignoring case
and punctuation), so any checkpoint of a known layout works and an unknown one fails at load
with its labels named. The logits are upsampled to the crop's size before the argmax, so a
mask has the crop's pixels, not the model's quarter-resolution grid.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from pedsynth.engines.cache import cache_key, cached
from pedsynth.schemas.edit import MaskConfig
from pedsynth.tasks.edit_bank import bank

_CACHE_KIND = "parsing"


def _norm(label: str) -> str:
    return re.sub(r"[^a-z0-9]", "", label.lower())


def region_labels(id2label: dict[Any, str]) -> dict[str, tuple[int, ...]]:
    """Each bank region's class ids in a checkpoint's layout (empty: the layout lacks it).
    Raises ValueError when the layout names none of the bank's parsing labels."""
    by_name: dict[str, list[int]] = {}
    for index, label in id2label.items():
        by_name.setdefault(_norm(label), []).append(int(index))
    out = {
        region.name: tuple(
            sorted(i for label in region.parsing for i in by_name.get(_norm(label), ()))
        )
        for region in bank().regions.values()
    }
    if not any(out.values()):
        known = sorted({label for r in bank().regions.values() for label in r.parsing})
        raise ValueError(
            f"unknown parsing layout: the model's labels {sorted(id2label.values())} name none "
            f"of the regions' labels {known} (prompts/attributes.yaml, `parsing:`)"
        )
    return out


def masks_from_logits(
    logits: Any, size: tuple[int, int], labels: dict[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """(C, h, w) logits -> a boolean (H, W) mask per region, the argmax taken at ``size``."""
    import torch.nn.functional as F

    upsampled = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)
    classes = upsampled[0].argmax(0).cpu().numpy()
    return {region: np.isin(classes, ids) for region, ids in labels.items()}


class HumanParser:
    """A loaded SegFormer and its processor; :meth:`regions` parses one RGB crop."""

    def __init__(self, config: MaskConfig):
        from transformers import SegformerForSemanticSegmentation, SegformerImageProcessor

        from pedsynth.engines.device import resolve_device

        self.device = resolve_device(config.device)
        self.processor = SegformerImageProcessor.from_pretrained(
            config.model, revision=config.revision
        )
        model = SegformerForSemanticSegmentation.from_pretrained(
            config.model, revision=config.revision, trust_remote_code=False
        )
        self.model = model.eval().to(self.device)
        self.labels = region_labels(model.config.id2label)
        self.model_id = config.model
        self._last: tuple[Any, dict[str, np.ndarray]] | None = None

    def regions(self, pixels: np.ndarray, key: Any = None) -> dict[str, np.ndarray]:
        """The region masks of ``pixels`` ((H, W, 3) uint8); the last ``key`` is remembered,
        so the several edits of one image parse it once."""
        import torch

        if key is not None and self._last is not None and self._last[0] == key:
            return self._last[1]
        inputs = self.processor(images=[np.array(pixels)], return_tensors="pt")  # a writable copy
        with torch.inference_mode():
            logits = self.model(pixel_values=inputs["pixel_values"].to(self.device)).logits[0]
        masks = masks_from_logits(logits, pixels.shape[:2], self.labels)
        if key is not None:
            self._last = (key, masks)
        return masks


def get_parser(config: MaskConfig) -> HumanParser:
    """The process-wide parser of ``config``, loaded on first use."""
    key = cache_key(_CACHE_KIND, config.model, config.revision, config.device)
    return cached(key, lambda: HumanParser(config))

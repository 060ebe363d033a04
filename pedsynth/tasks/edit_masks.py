"""Region masks of the edit stage, by config: the procedural benchmark's exact label maps, a
human-parsing SegFormer (:mod:`pedsynth.tasks.edit_parsing`), or a proportional body box.

``procedural`` reads ``labels/<image path>.png`` of the benchmark folder ``masks.root`` (written
by ``pedsynth sample-data``, values in its ``labels.json``); an image without a label map of its
size takes the ``box`` fallback, or is rejected (``no_mask``) when the fallback is ``none``.
``segformer`` parses the decoded crop; a region the checkpoint's layout has no label for is
``region_missing``. ``box`` is the region's share of the crop from the attribute bank. A mask
smaller than ``min_pixels`` is empty: the region is not visible (``empty_mask``). The mask is
grown by ``dilate_px`` before the edit, and the name of the backend used is recorded per row.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pedsynth.schemas.edit import MaskConfig
from pedsynth.tasks.edit_bank import bank


@dataclass(frozen=True)
class Mask:
    pixels: np.ndarray | None  # (H, W) bool, dilated; None when there is none
    backend: str  # procedural | segformer | box
    exact: np.ndarray | None = None  # before dilation
    problem: str | None = None  # a reject reason when there is no usable mask
    detail: str = ""


@functools.lru_cache(maxsize=8)
def _legend(root: str) -> dict[str, int] | None:
    path = Path(root) / "labels.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text("utf-8"))
    return {name: int(v) for name, v in data["labels"].items()} | {"_dir": data["directory"]}


def dilate(mask: np.ndarray, px: int) -> np.ndarray:
    """``mask`` grown by ``px`` pixels (a square structuring element)."""
    if px <= 0:
        return mask.copy()
    h, w = mask.shape
    padded = np.pad(mask, px)
    out = np.zeros_like(mask)
    for dy in range(2 * px + 1):
        for dx in range(2 * px + 1):
            out |= padded[dy : dy + h, dx : dx + w]
    return out


def box_mask(region: str, height: int, width: int) -> np.ndarray:
    top, bottom, left, right = bank().regions[region].box
    mask = np.zeros((height, width), dtype=bool)
    rows = slice(round(top * height), round(bottom * height))
    mask[rows, round(left * width) : round(right * width)] = True
    return mask


def _procedural(config: MaskConfig, region: str, path: str | None, shape) -> np.ndarray | None:
    if config.root is None or not path:
        return None
    legend = _legend(str(Path(config.root).absolute()))
    if legend is None:
        return None
    label_file = Path(config.root) / legend["_dir"] / Path(path).with_suffix(".png")
    if not label_file.is_file():
        return None
    from PIL import Image

    with Image.open(label_file) as im:
        labels = np.asarray(im.convert("L"))
    if labels.shape != shape:
        return None
    return labels == legend[bank().regions[region].label]


def region_mask(
    config: MaskConfig,
    region: str,
    path: str | None,
    height: int,
    width: int,
    pixels: np.ndarray | None = None,
) -> Mask:
    """The mask of ``region`` in the image stored at ``path`` (the row's ``image.path``);
    ``pixels`` (the decoded crop) are what ``segformer`` parses."""
    exact, backend = None, config.backend
    if config.backend == "segformer":
        from pedsynth.tasks.edit_parsing import get_parser

        if pixels is None:
            raise ValueError("the segformer mask backend needs the decoded image")
        parser = get_parser(config)
        if not parser.labels[region]:
            detail = f"the parsing model {parser.model_id} has no label for the {region}"
            return Mask(None, backend, problem="region_missing", detail=detail)
        exact = parser.regions(pixels, key=(path, id(pixels)))[region]
    if config.backend == "procedural":
        exact = _procedural(config, region, path, (height, width))
        if exact is None:
            if config.fallback == "none":
                return Mask(None, backend, problem="no_mask", detail=f"no label map for {path}")
            backend = "box"
    if exact is None:
        exact = box_mask(region, height, width)
    count = int(exact.sum())
    if count < config.min_pixels:
        detail = f"the {region} mask has {count} pixels (< {config.min_pixels})"
        return Mask(None, backend, exact, problem="empty_mask", detail=detail)
    return Mask(dilate(exact, config.dilate_px), backend, exact)

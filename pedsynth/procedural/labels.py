"""Exact per-region label maps of the rendered person: which pixel shows which body region.

The figure is painted a second time, by the same painter and skeleton, on a label layer: the
look's colours are replaced by one key colour per region, each of its own hue, and the label
canvas turns every fill into that region's label by its hue. Shading (``tone``) scales a colour
and detail colours (``accent``) scale it or add one value to every channel; neither changes its
hue, so every shade of a region's key maps back to the region. The painter's few fixed colours
(soles, eyes, lips, glasses frames) are grey or near-grey: they take the label of the part being
drawn (a sole belongs to the shoe, eyes and lips to the skin).

The label map covers only the described person (not a distractor behind them), at the image's
size, before blur and camera noise. Values are :data:`LABELS` (0 is the background). It is
saved as a lossless 8-bit PNG next to each JPEG (:func:`label_png`).
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
from typing import Any

import numpy as np
from PIL import Image

from pedsynth.procedural.canvas import Canvas
from pedsynth.procedural.figure import FigurePainter
from pedsynth.procedural.identity import Identity, Look
from pedsynth.procedural.pose import Shot, build_skeleton
from pedsynth.procedural.vocabulary import RGB

LABELS: dict[str, int] = {
    "background": 0,
    "hair": 1,
    "upper": 2,
    "lower": 3,
    "shoes": 4,
    "bag": 5,
    "hat": 6,
    "skin": 7,
}
# One key colour per region, hues 0-300 degrees apart; channels stay below 255 / 1.5 so the
# brightest shade the painter makes (``tone(c, 1.5)``) does not clip and shift the hue.
_KEYS: dict[str, RGB] = {
    "upper": (170, 60, 60),  # 0
    "skin": (170, 115, 60),  # 30
    "bag": (170, 170, 60),  # 60
    "lower": (60, 170, 60),  # 120
    "hat": (60, 170, 170),  # 180
    "shoes": (60, 60, 170),  # 240
    "hair": (170, 60, 170),  # 300
}
_HUES = {name: colorsys.rgb_to_hsv(*(c / 255 for c in rgb))[0] * 360 for name, rgb in _KEYS.items()}
_GREY = 12  # max - min channel below this: a fixed colour, labelled by the part being drawn
# The part each painter method draws, for the fixed colours it uses.
_PART_OF: dict[str, str] = {"_shoe": "shoes", "_shoe_profile": "shoes", "_face": "skin"}


def _label_look(look: Look) -> Look:
    k = _KEYS
    return dataclasses.replace(
        look,
        skin=k["skin"],
        hair=k["hair"],
        upper=k["upper"],
        lower=k["lower"],
        shoes=k["shoes"],
        bag=k["bag"],
        hat=k["hat"],
        inner=k["upper"],  # the shirt under an open jacket is upper clothing too
    )


def _hue_label(fill: RGB, part: str) -> int:
    if max(fill) - min(fill) < _GREY:
        return LABELS[part]
    hue = colorsys.rgb_to_hsv(*(c / 255 for c in fill))[0] * 360
    name = min(_HUES, key=lambda n: min(abs(hue - _HUES[n]), 360 - abs(hue - _HUES[n])))
    return LABELS[name]


class _LabelCanvas(Canvas):
    """A canvas whose every fill becomes its region's label (grey level = label value)."""

    def __init__(self, image: Image.Image, origin: tuple[float, float], scale: float) -> None:
        super().__init__(image, origin, scale)
        self.part = "skin"

    def _key(self, fill: RGB | None) -> RGB | None:
        if fill is None:
            return None
        value = _hue_label(fill, self.part)
        return (value, value, value)

    def polygon(self, points, fill):
        super().polygon(points, self._key(fill))

    def ellipse(self, centre, rx, ry, fill, outline=None, line=0.0):
        super().ellipse(centre, rx, ry, self._key(fill), self._key(outline), line)

    def rect(self, top_left, bottom_right, fill, radius=0.0):
        super().rect(top_left, bottom_right, self._key(fill), radius)

    def line(self, points, width, fill):
        super().line(points, width, self._key(fill))

    def arc(self, centre, rx, ry, start, end, width, fill):
        super().arc(centre, rx, ry, start, end, width, self._key(fill))

    def cap(self, centre, rx, ry, cut_y, fill):
        super().cap(centre, rx, ry, cut_y, self._key(fill))

    # circle and segment draw through ellipse and polygon: their fills are mapped there


class _LabelPainter(FigurePainter):
    """The figure painter, telling the label canvas which part it draws."""

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        part = _PART_OF.get(name)
        if part is None or not callable(value):
            return value
        canvas = object.__getattribute__(self, "c")

        def with_part(*args: Any, **kwargs: Any) -> Any:
            before, canvas.part = canvas.part, part
            try:
                return value(*args, **kwargs)
            finally:
                canvas.part = before

        return with_part


def render_labels(
    identity: Identity,
    look: Look,
    shot: Shot,
    size: tuple[int, int],
    centre_x: float,
    top: float,
    figure_height: float,
    supersample: int,
) -> np.ndarray:
    """The (height, width) uint8 label map of the figure placed as the image placed it."""
    layer = Image.new("RGBA", (size[0] * supersample, size[1] * supersample), (0, 0, 0, 0))
    x = size[0] - centre_x if shot.mirrored else centre_x
    canvas = _LabelCanvas(layer, (x * supersample, top * supersample), figure_height * supersample)
    label_look = _label_look(look)
    _LabelPainter(canvas, identity, label_look, build_skeleton(shot, look), shot).paint()
    if shot.mirrored:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(layer)
    labels = np.where(arr[..., 3] > 0, arr[..., 0], 0).astype(np.uint8)
    return _downscale(labels, supersample)


def _downscale(labels: np.ndarray, factor: int) -> np.ndarray:
    """The commonest label of each ``factor`` x ``factor`` block (ties: the lower label)."""
    h, w = labels.shape[0] // factor, labels.shape[1] // factor
    blocks = labels[: h * factor, : w * factor].reshape(h, factor, w, factor).transpose(0, 2, 1, 3)
    flat = blocks.reshape(h, w, factor * factor)
    counts = np.stack([(flat == v).sum(-1) for v in range(len(LABELS))], axis=-1)
    return counts.argmax(-1).astype(np.uint8)


def label_png(labels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(labels).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def read_label_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("L"))

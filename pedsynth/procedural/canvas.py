"""Drawing in figure units: a thin wrapper over ``ImageDraw`` that scales and shifts points.

The figure code thinks in body proportions (head top = 0, soles = 1); this class turns them into
pixels of the (supersampled) layer, and adds the two shapes bodies need: tapered limbs with round
ends, and an ellipse cut off by a horizontal line (hair, caps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from PIL import Image, ImageDraw

from pedsynth.procedural.vocabulary import RGB

Point = tuple[float, float]


def tone(rgb: RGB, factor: float) -> RGB:
    """``rgb`` scaled by ``factor`` (below 1 darker), clipped to the byte range."""
    return tuple(max(0, min(255, round(c * factor))) for c in rgb)  # type: ignore[return-value]


def accent(rgb: RGB, amount: float = 0.28) -> RGB:
    """A detail colour that shows on ``rgb``: darker on light colours, lighter on dark ones."""
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luminance > 70:
        return tone(rgb, 1.0 - amount)
    return tuple(min(255, round(c + 60 * amount / 0.28)) for c in rgb)  # type: ignore[return-value]


class Canvas:
    """Draws on an RGBA layer; every coordinate is in figure units."""

    def __init__(self, image: Image.Image, origin: Point, scale: float) -> None:
        self.draw = ImageDraw.Draw(image)
        self.origin = origin
        self.scale = scale

    def px(self, point: Point) -> tuple[float, float]:
        return (self.origin[0] + point[0] * self.scale, self.origin[1] + point[1] * self.scale)

    def width(self, units: float) -> int:
        return max(1, round(units * self.scale))

    def polygon(self, points: Sequence[Point], fill: RGB) -> None:
        self.draw.polygon([self.px(p) for p in points], fill=(*fill, 255))

    def ellipse(
        self,
        centre: Point,
        rx: float,
        ry: float,
        fill: RGB | None,
        outline: RGB | None = None,
        line: float = 0.0,
    ) -> None:
        x, y = self.px(centre)
        sx, sy = rx * self.scale, ry * self.scale
        self.draw.ellipse(
            [x - sx, y - sy, x + sx, y + sy],
            fill=None if fill is None else (*fill, 255),
            outline=None if outline is None else (*outline, 255),
            width=self.width(line) if outline is not None else 0,
        )

    def circle(self, centre: Point, radius: float, fill: RGB) -> None:
        self.ellipse(centre, radius, radius, fill)

    def rect(self, top_left: Point, bottom_right: Point, fill: RGB, radius: float = 0.0) -> None:
        (x0, y0), (x1, y1) = self.px(top_left), self.px(bottom_right)
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        self.draw.rounded_rectangle(box, radius=radius * self.scale, fill=(*fill, 255))

    def line(self, points: Sequence[Point], width: float, fill: RGB) -> None:
        self.draw.line([self.px(p) for p in points], fill=(*fill, 255), width=self.width(width))

    def arc(
        self, centre: Point, rx: float, ry: float, start: float, end: float, width: float, fill: RGB
    ) -> None:
        x, y = self.px(centre)
        sx, sy = rx * self.scale, ry * self.scale
        self.draw.arc(
            [x - sx, y - sy, x + sx, y + sy], start, end, fill=(*fill, 255), width=self.width(width)
        )

    def segment(self, a: Point, b: Point, width_a: float, width_b: float, fill: RGB) -> None:
        """A tapered limb segment from ``a`` to ``b`` with round ends."""
        dx, dy = b[0] - a[0], b[1] - a[1]
        length = math.hypot(dx, dy) or 1e-9
        nx, ny = -dy / length, dx / length
        ha, hb = width_a / 2, width_b / 2
        self.polygon(
            [
                (a[0] + nx * ha, a[1] + ny * ha),
                (b[0] + nx * hb, b[1] + ny * hb),
                (b[0] - nx * hb, b[1] - ny * hb),
                (a[0] - nx * ha, a[1] - ny * ha),
            ],
            fill,
        )
        self.circle(a, ha, fill)
        self.circle(b, hb, fill)

    def cap(self, centre: Point, rx: float, ry: float, cut_y: float, fill: RGB) -> None:
        """The part of an ellipse above the horizontal line ``y = cut_y``."""
        k = max(-0.999, min(0.999, (cut_y - centre[1]) / ry))
        bend = math.degrees(math.asin(k))
        x, y = self.px(centre)
        sx, sy = rx * self.scale, ry * self.scale
        self.draw.chord([x - sx, y - sy, x + sx, y + sy], 180 - bend, 360 + bend, fill=(*fill, 255))

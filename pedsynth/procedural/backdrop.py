"""Backgrounds behind the pedestrian: gradients, street fronts, indoor walls and parks.

Colours are drawn independently of the person, so a background sometimes matches a garment,
as in real surveillance crops; that keeps colour from being a trivial cue for the figure mask.
"""

from __future__ import annotations

import colorsys

import numpy as np
from PIL import Image, ImageDraw

from pedsynth.procedural.identity import pick
from pedsynth.procedural.vocabulary import RGB

KINDS = ("gradient", "street", "indoor", "park")
KIND_WEIGHTS = (0.2, 0.4, 0.2, 0.2)


def _colour(rng: np.random.Generator, vivid: float = 0.15, value: tuple = (0.3, 0.9)) -> RGB:
    """A random colour, mostly muted like walls and pavements, sometimes vivid."""
    saturation = rng.uniform(0.5, 0.9) if rng.random() < vivid else rng.uniform(0.03, 0.4)
    r, g, b = colorsys.hsv_to_rgb(rng.random(), saturation, rng.uniform(*value))
    return (int(r * 255), int(g * 255), int(b * 255))


def _vary(rng: np.random.Generator, rgb: RGB, spread: float = 25.0) -> RGB:
    return tuple(int(np.clip(c + rng.normal(0, spread), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _gradient(width: int, height: int, top: RGB, bottom: RGB) -> np.ndarray:
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    column = np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t
    return np.repeat(column, width, axis=1)


def _street(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, ground: int
) -> None:
    """Building fronts with windows above a pavement with kerb and paving lines."""
    x = int(rng.integers(-width // 2, 1))
    while x < width:
        facade = _colour(rng, vivid=0.2)
        span = int(rng.integers(width // 2, width * 2))
        draw.rectangle([x, 0, x + span, ground], fill=facade)
        window = _vary(rng, tuple(int(c * 0.55) for c in facade), 20)
        pitch_x, pitch_y = int(rng.integers(14, 30)), int(rng.integers(20, 40))
        for wx in range(x + 4, x + span - 8, pitch_x):
            for wy in range(int(rng.integers(2, 12)), ground - 20, pitch_y):
                draw.rectangle([wx, wy, wx + pitch_x // 2, wy + pitch_y // 2], fill=window)
        if rng.random() < 0.4:  # a shop door or dark entrance at street level
            dx = x + int(rng.integers(0, max(1, span - 20)))
            draw.rectangle([dx, ground - int(height * 0.25), dx + 20, ground], fill=_colour(rng))
        x += span
    pavement = _colour(rng, vivid=0.05, value=(0.35, 0.8))
    draw.rectangle([0, ground, width, height], fill=pavement)
    line = _vary(rng, tuple(int(c * 0.8) for c in pavement), 8)
    y, step = ground + 3, 4
    while y < height:
        draw.line([0, y, width, y], fill=line, width=1)
        step = int(step * 1.5) + 1
        y += step
    if rng.random() < 0.5:  # a pole or tree trunk
        px = int(rng.integers(0, width))
        draw.rectangle([px, 0, px + int(rng.integers(3, 8)), ground + 4], fill=_colour(rng, 0.0))


def _indoor(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, ground: int
) -> None:
    """A wall with a door or window over a tiled floor."""
    draw.rectangle([0, 0, width, ground], fill=_colour(rng, vivid=0.1, value=(0.5, 0.95)))
    for _ in range(int(rng.integers(0, 3))):
        x0 = int(rng.integers(-20, width))
        y0 = int(rng.integers(0, ground // 2))
        draw.rectangle([x0, y0, x0 + int(rng.integers(20, 50)), ground], fill=_colour(rng))
    floor = _colour(rng, vivid=0.05, value=(0.3, 0.8))
    draw.rectangle([0, ground, width, height], fill=floor)
    draw.line([0, ground, width, ground], fill=tuple(int(c * 0.6) for c in floor), width=2)
    tile = tuple(int(c * 0.85) for c in floor)
    for tx in range(int(rng.integers(0, 20)), width, 20):
        draw.line([tx, ground, tx + (tx - width // 2) // 2, height], fill=tile, width=1)


def _park(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int, ground: int
) -> None:
    """Sky or haze, foliage blobs, grass and a path."""
    draw.rectangle([0, 0, width, ground], fill=_colour(rng, vivid=0.1, value=(0.6, 0.95)))
    for _ in range(int(rng.integers(2, 6))):
        leaf = (int(rng.integers(20, 90)), int(rng.integers(70, 150)), int(rng.integers(20, 80)))
        cx, cy, r = (
            int(rng.integers(0, width)),
            int(rng.integers(0, ground)),
            int(rng.integers(15, 45)),
        )
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=leaf)
        draw.rectangle([cx - 2, cy, cx + 3, ground], fill=(80, 60, 40))
    grass = (int(rng.integers(60, 120)), int(rng.integers(110, 170)), int(rng.integers(40, 90)))
    draw.rectangle([0, ground, width, height], fill=grass)
    path = _colour(rng, vivid=0.0, value=(0.5, 0.8))
    draw.polygon(
        [
            (width * 0.3, ground),
            (width * 0.7, ground),
            (width * 1.1, height),
            (-width * 0.1, height),
        ],
        fill=path,
    )


def backdrop(rng: np.random.Generator, width: int, height: int, ground: float) -> Image.Image:
    """A background of ``width`` x ``height``; the floor starts near ``ground`` (pixels)."""
    kind = pick(rng, KINDS, KIND_WEIGHTS)
    horizon = int(np.clip(ground - rng.uniform(0.15, 0.45) * height, height * 0.35, height - 8))
    if kind == "gradient":
        pixels = _gradient(width, height, _colour(rng, vivid=0.25), _colour(rng, vivid=0.25))
        return Image.fromarray(pixels.astype(np.uint8))
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    {"street": _street, "indoor": _indoor, "park": _park}[kind](draw, rng, width, height, horizon)
    return image

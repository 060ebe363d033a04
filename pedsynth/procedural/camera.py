"""Turns a person and a shot into a JPEG crop: framing, background, lighting, blur, noise.

The figure is drawn at twice the output size and shrunk, which antialiases its edges; then the
photometric changes a surveillance camera would add are applied to the whole crop.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pedsynth.procedural.backdrop import backdrop
from pedsynth.procedural.canvas import Canvas
from pedsynth.procedural.figure import FigurePainter
from pedsynth.procedural.identity import Identity, Look, sample_identity, sample_look
from pedsynth.procedural.pose import Shot, build_skeleton, sample_shot

SUPERSAMPLE = 2
BASE_SIZE = (96, 240)
SIZE_JITTER = 0.15
JPEG_QUALITY = 90
DISTRACTOR_PROBABILITY = 0.2


@dataclass(frozen=True)
class Frame:
    """Where the figure goes in the crop, in output pixels."""

    width: int
    height: int
    centre_x: float
    top: float
    figure_height: float  # head top to the soles of a straight-legged figure


def _frame(rng: np.random.Generator, stature: float, bottom: float) -> Frame:
    scale = rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)
    width = int(np.clip(round(BASE_SIZE[0] * scale * rng.uniform(0.93, 1.07)), 64, 128))
    height = int(np.clip(round(BASE_SIZE[1] * scale * rng.uniform(0.93, 1.07)), 160, 320))
    fill = rng.uniform(0.76, 0.93) * min(1.0, stature)
    figure_height = fill * height / bottom
    spare = height - fill * height
    top = spare * rng.uniform(0.25, 0.75)
    if rng.random() < 0.08:  # sometimes the crop cuts the feet
        top = spare + rng.uniform(0.0, 0.05) * height
    centre_x = width / 2 + rng.uniform(-0.12, 0.12) * width
    return Frame(width, height, centre_x, top, figure_height)


def _paint_figure(
    size: tuple[int, int],
    identity: Identity,
    look: Look,
    shot: Shot,
    centre_x: float,
    top: float,
    figure_height: float,
) -> Image.Image:
    """The figure on a transparent layer of output ``size``, mirrored when the shot says so."""
    layer = Image.new("RGBA", (size[0] * SUPERSAMPLE, size[1] * SUPERSAMPLE), (0, 0, 0, 0))
    x = size[0] - centre_x if shot.mirrored else centre_x
    canvas = Canvas(layer, (x * SUPERSAMPLE, top * SUPERSAMPLE), figure_height * SUPERSAMPLE)
    FigurePainter(canvas, identity, look, build_skeleton(shot, look), shot).paint()
    if shot.mirrored:
        layer = layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return layer.resize(size, Image.Resampling.BOX)


def _distractor(rng: np.random.Generator, scene: Image.Image, ground: float) -> None:
    """Another pedestrian, smaller and cut by the crop edge, behind the one we describe."""
    stranger_seed = int(rng.integers(2**31))
    stranger = sample_identity(stranger_seed, 0)
    look = sample_look(stranger_seed, stranger)
    shot = sample_shot(rng)
    height = scene.height * rng.uniform(0.45, 0.75)
    side = 1 if rng.random() < 0.5 else -1
    centre_x = scene.width / 2 + side * scene.width * rng.uniform(0.45, 0.65)
    top = ground - height * rng.uniform(1.0, 1.08)
    layer = _paint_figure(scene.size, stranger, look, shot, centre_x, top, height)
    layer = layer.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    scene.alpha_composite(layer)


def _shadow(scene: Image.Image, centre_x: float, ground: float, figure_height: float) -> None:
    """A soft dark ellipse under the feet (blurred on a small patch, which is cheaper)."""
    rx, ry, margin = 0.13 * figure_height, 0.02 * figure_height, 4
    patch = Image.new(
        "RGBA", (round(2 * rx) + 2 * margin, round(2 * ry) + 2 * margin), (0, 0, 0, 0)
    )
    ImageDraw.Draw(patch).ellipse(
        [margin, margin, patch.width - margin, patch.height - margin], fill=(0, 0, 0, 70)
    )
    patch = patch.filter(ImageFilter.GaussianBlur(2))
    overlay = Image.new("RGBA", scene.size, (0, 0, 0, 0))
    overlay.paste(patch, (round(centre_x - rx) - margin, round(ground - ry) - margin))
    scene.alpha_composite(overlay)


def _camera_effects(rng: np.random.Generator, image: Image.Image) -> Image.Image:
    """Lens blur, then uneven light, exposure, contrast, colour cast and sensor noise."""
    if rng.random() < 0.7:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.2, 0.9)))
    pixels = np.asarray(image, dtype=np.float32)
    height, width = pixels.shape[:2]
    slope = rng.uniform(-0.25, 0.25)
    light = 1.0 + slope * np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :, None]
    contrast = rng.uniform(0.75, 1.15)
    brightness = rng.uniform(0.72, 1.22)
    cast = rng.uniform(0.93, 1.07, size=3).astype(np.float32)
    pixels *= light
    mean = float(pixels.mean())
    pixels -= mean
    pixels *= contrast
    pixels += mean
    pixels *= brightness * cast
    # Grey (luminance) noise: a third of the random draws of per-channel noise, similar look.
    pixels += rng.standard_normal((height, width, 1), dtype=np.float32) * rng.uniform(1.0, 6.0)
    np.clip(pixels, 0, 255, out=pixels)
    return Image.fromarray(pixels.astype(np.uint8))


def render_image(
    identity: Identity, look: Look, shot: Shot, rng: np.random.Generator
) -> tuple[bytes, int, int]:
    """One JPEG crop of ``identity`` seen as ``shot``; returns the bytes, width and height."""
    jpeg, frame = _render(identity, look, shot, rng)
    return jpeg, frame.width, frame.height


def render_image_and_labels(
    identity: Identity, look: Look, shot: Shot, rng: np.random.Generator
) -> tuple[bytes, np.ndarray]:
    """The JPEG crop of :func:`render_image` (the same bytes for the same ``rng``) and its
    exact region label map (:mod:`pedsynth.procedural.labels`)."""
    from pedsynth.procedural.labels import render_labels

    jpeg, frame = _render(identity, look, shot, rng)
    size = (frame.width, frame.height)
    labels = render_labels(
        identity, look, shot, size, frame.centre_x, frame.top, frame.figure_height, SUPERSAMPLE
    )
    return jpeg, labels


def _render(
    identity: Identity, look: Look, shot: Shot, rng: np.random.Generator
) -> tuple[bytes, Frame]:
    skeleton = build_skeleton(shot, look)
    frame = _frame(rng, look.stature, skeleton.bottom)
    ground = frame.top + skeleton.bottom * frame.figure_height
    size = (frame.width, frame.height)
    scene = backdrop(rng, frame.width, frame.height, ground).convert("RGBA")
    if rng.random() < DISTRACTOR_PROBABILITY:
        _distractor(rng, scene, ground)
    _shadow(scene, frame.centre_x, ground, frame.figure_height)
    scene.alpha_composite(
        _paint_figure(size, identity, look, shot, frame.centre_x, frame.top, frame.figure_height)
    )
    image = _camera_effects(rng, scene.convert("RGB"))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue(), frame

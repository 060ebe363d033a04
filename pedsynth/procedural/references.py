"""A small bank of reference garment images for reference-image editing (Paint-by-Example).

Each reference is one garment alone: a front-view figure wearing it is painted by the
procedural painter, its exact label map (:mod:`pedsynth.procedural.labels`) keeps only that
region's pixels, and the garment is cut out onto white and cropped to its box. One PNG per
(region, type, colour) the painter can draw, under ``<folder>/<region>/<type>/<colour>.png``,
listed in ``<folder>/references.json``. Everything is derived from fixed seeds: the same bank
on every machine.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pedsynth.atomic import atomic_write_bytes
from pedsynth.procedural import vocabulary as vocab
from pedsynth.procedural.identity import Accessory, rng_for, sample_identity, sample_look
from pedsynth.procedural.labels import LABELS, render_labels
from pedsynth.procedural.pose import sample_shot

INDEX = "references.json"
SIZE = (96, 192)  # (width, height) of the figure painted for a reference
_SUPERSAMPLE = 2
# What the painter draws per region (lexicon keys); colours: the bank's that it can paint.
TYPES: dict[str, tuple[str, ...]] = {
    "upper": ("t-shirt", "shirt", "jacket", "coat", "hoodie", "sweater"),
    "lower": ("trousers", "jeans", "leggings"),
    "shoes": ("sneakers", "leather shoes"),
    "bag": ("backpack", "handbag", "shoulder bag"),
}


def reference_path(region: str, garment: str, colour: str) -> str:
    """The reference's path inside the bank folder."""
    return f"{region}/{garment.replace(' ', '-')}/{colour}.png"


def render_garment(region: str, garment: str, colour: str) -> Image.Image:
    """One garment (``region`` of type ``garment`` in ``colour``) cut out onto white."""
    from pedsynth.procedural.camera import _paint_figure

    base = sample_identity(0, 1)
    changes: dict[str, Any] = {"hat": None, "glasses": False, "bag": None}
    if region == "bag":
        changes["bag"] = Accessory(garment, colour)
    else:
        changes |= {f"{region}_type": garment, f"{region}_colour": colour}
    if region == "upper":
        changes["lower_type"] = "trousers"  # a dress would change the lower garment
    identity = dataclasses.replace(base, **changes)
    look = dataclasses.replace(sample_look(0, identity), **{region: vocab.GARMENT_COLOURS[colour]})
    shot = dataclasses.replace(
        sample_shot(rng_for(0, 1, 3)), view="back" if garment == "backpack" else "front"
    )
    shot = dataclasses.replace(shot, mirrored=False, walking=False)
    width, height = SIZE
    top, figure_height = height * 0.04, height * 0.92
    layer = _paint_figure(SIZE, identity, look, shot, width / 2, top, figure_height)
    labels = render_labels(identity, look, shot, SIZE, width / 2, top, figure_height, _SUPERSAMPLE)
    keep = labels == LABELS[region]
    pixels = np.asarray(layer.convert("RGB"))
    out = np.where(keep[..., None], pixels, 255).astype(np.uint8)
    rows, cols = np.nonzero(keep)
    if len(rows) == 0:
        raise ValueError(f"the painter drew no {region} for {garment} {colour}")
    crop = out[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return Image.fromarray(crop)


def write_reference_bank(folder: str | Path, colours: dict[str, tuple[str, ...]]) -> dict:
    """Write the bank under ``folder``: every type of :data:`TYPES` in each of ``colours``
    (region -> colour keys; those the painter cannot paint are skipped). Returns the index."""
    root = Path(folder)
    entries = []
    for region, types in TYPES.items():
        for garment in types:
            for colour in colours.get(region, ()):
                if colour not in vocab.GARMENT_COLOURS:
                    continue
                buffer = io.BytesIO()
                render_garment(region, garment, colour).save(buffer, format="PNG")
                path = reference_path(region, garment, colour)
                atomic_write_bytes(buffer.getvalue(), root / path)
                entries.append({"region": region, "type": garment, "colour": colour, "path": path})
    index = {"version": 1, "references": entries}
    atomic_write_bytes(json.dumps(index, indent=1).encode("utf-8"), root / INDEX)
    return index


def write_benchmark_references(benchmark: str | Path) -> dict:
    """The bank of ``pedsynth sample-data``: ``BENCH/references``, in the attribute bank's
    colours (:mod:`pedsynth.tasks.edit_bank`)."""
    from pedsynth.tasks.edit_bank import bank

    colours = {name: region.colours for name, region in bank().regions.items()}
    return write_reference_bank(Path(benchmark) / "references", colours)

"""The dataset card's images: histograms of the build and thumbnails of its example rows.

matplotlib is imported inside :func:`hist_plot`, so a build that draws no plot never pays its
import. Plots use a bare ``Figure`` on the Agg canvas (no pyplot state: safe in worker
threads). Every file is committed through :mod:`pedsynth.atomic`.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pedsynth.atomic import atomic_write_bytes, atomic_write_with

THUMBNAIL_SIZE = (128, 256)  # (width, height) bound; pedestrian crops are tall
PLOT_DPI = 100
MAX_BINS = 40


def hist_plot(
    path: Path, series: Mapping[str, Sequence[int]], title: str, xlabel: str, ylabel: str
) -> None:
    """Step histograms of integer values, one per series, sharing integer-aligned bins."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(5, 3), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    values = [v for vs in series.values() for v in vs]
    if values:
        lo, hi = min(values), max(values)
        step = max(1, (hi - lo + 1) // MAX_BINS)
        bins = [lo - 0.5 + step * k for k in range((hi - lo) // step + 2)]
        for label, vs in series.items():
            if vs:
                ax.hist(vs, bins=bins, histtype="step", linewidth=1.5, label=f"{label} ({len(vs)})")
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    atomic_write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=PLOT_DPI))


def thumbnail(image: Mapping[str, Any] | None, path: Path) -> bool:
    """Save a small JPEG of a pairs-table image cell; False when its bytes do not decode.

    A finished shard holds only images that passed ingest's checks, so a failure here means
    the file was damaged or written by something else; the card reports it instead of failing.
    """
    from PIL import Image

    data = (image or {}).get("bytes")
    if not data:
        return False
    try:
        with Image.open(io.BytesIO(data)) as im:
            small = im.convert("RGB")
            small.thumbnail(THUMBNAIL_SIZE)
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, Image.DecompressionBombError):
        return False
    atomic_write_bytes(buf.getvalue(), path)
    return True


EDIT_GRID_PNG = "edits_before_after.png"
EDIT_TILE_HEIGHT = 160  # each crop is scaled to this height, keeping its aspect ratio
_GRID_GAP, _LABEL_HEIGHT = 6, 14


def _tile(data: bytes | None, height: int) -> Any:
    """A crop scaled to ``height`` (aspect kept), or a grey placeholder when it does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data or b"")) as im:
            rgb = im.convert("RGB")
        width = max(1, round(rgb.width * height / rgb.height))
        return rgb.resize((width, height), Image.Resampling.BICUBIC)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
        return Image.new("RGB", (height // 2, height), (128, 128, 128))


def before_after_grid(path: Path, examples: Sequence[Any], height: int = EDIT_TILE_HEIGHT) -> None:
    """One PNG: a column per edited example, the parent image on the left and the edited one
    on the right of each, with the attribute change written above the pair. ``examples`` hold
    ``before`` / ``after`` bytes and ``attribute`` / ``original`` / ``target``
    (:class:`pedsynth.tasks.card_stats.EditExample`). PIL only: no matplotlib."""
    from PIL import Image, ImageDraw

    pairs = [(_tile(e.before, height), _tile(e.after, height)) for e in examples]
    widths = [a.width + b.width + _GRID_GAP for a, b in pairs]
    total = sum(widths) + _GRID_GAP * (len(pairs) + 1)
    canvas = Image.new("RGB", (max(total, 1), height + _LABEL_HEIGHT + 2 * _GRID_GAP), "white")
    draw = ImageDraw.Draw(canvas)
    x = _GRID_GAP
    for e, (before, after), width in zip(examples, pairs, widths, strict=True):
        region = str(e.attribute).rsplit("_", 1)[0]
        draw.text((x, 2), f"{region}: {e.original or '?'}>{e.target}", fill=(0, 0, 0))
        top = _LABEL_HEIGHT + _GRID_GAP
        canvas.paste(before, (x, top))
        canvas.paste(after, (x + before.width + _GRID_GAP, top))
        x += width + _GRID_GAP
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(buf.getvalue(), path)


def edit_grid(card_dir: Path, examples: Sequence[Any], draw: bool) -> str | None:
    """Draw the before/after grid of the edited ``examples`` beside the card and return its
    link (relative to the card); with ``draw`` false (``write.card_plots``) or no examples, an
    earlier card's grid is removed and there is no link."""
    path = card_dir / EDIT_GRID_PNG
    if not draw or not examples:
        path.unlink(missing_ok=True)
        return None
    before_after_grid(path, examples)
    return f"card/{EDIT_GRID_PNG}"

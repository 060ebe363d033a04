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

"""The dataset card (``OUT/README.md``) of a finished build, with plots and example rows.

The card is what a person reads before using the data and what ``datasets.load_dataset``
reads to find the splits. :func:`write_dataset_card` only assembles it: the statistics come
from :mod:`pedsynth.tasks.card_stats`, the text from :mod:`pedsynth.tasks.card_markdown`, the
plots and thumbnails from :mod:`pedsynth.tasks.card_figures`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pedsynth.atomic import atomic_write_bytes
from pedsynth.tasks import card_markdown as md
from pedsynth.tasks.card_figures import edit_grid, hist_plot, thumbnail
from pedsynth.tasks.card_stats import (
    BuildStats,
    build_totals,
    edit_summary,
    example_rows,
    rejects_by_stage_reason,
    scan_build,
    split_counts,
)

DEFAULT_CARD_EXAMPLES = 4
CAPTION_LENGTH_PNG = "caption_length.png"
IMAGES_PER_ID_PNG = "images_per_identity.png"
CAPTIONS_PER_ID_PNG = "captions_per_identity.png"
PLOT_FILES = (CAPTION_LENGTH_PNG, IMAGES_PER_ID_PNG, CAPTIONS_PER_ID_PNG)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:60] or "x"


def _draw_plots(card_dir: Path, stats: BuildStats) -> None:
    by_split = {md.hf_split(s): st for s, st in stats.splits.items()}
    hist_plot(
        card_dir / CAPTION_LENGTH_PNG,
        {s: acc.lengths for s, acc in stats.by_source.items()},
        "Caption length by caption source",
        "words per caption",
        "captions",
    )
    hist_plot(
        card_dir / IMAGES_PER_ID_PNG,
        {s: st.images_per_identity for s, st in by_split.items()},
        "Images per identity",
        "images",
        "identities",
    )
    hist_plot(
        card_dir / CAPTIONS_PER_ID_PNG,
        {s: st.captions_per_identity for s, st in by_split.items()},
        "Captions per identity",
        "captions",
        "identities",
    )


def _plot_links() -> list[str]:
    return [
        f"![Caption length by caption source](card/{CAPTION_LENGTH_PNG})\n",
        "## Identities\n",
        f"![Images per identity](card/{IMAGES_PER_ID_PNG})\n",
        f"![Captions per identity](card/{CAPTIONS_PER_ID_PNG})\n",
    ]


def _examples(
    examples_dir: Path, examples: list[dict[str, Any]]
) -> tuple[list[list[object]], list[str]]:
    """Example table rows with their thumbnails, and the image ids that did not decode.

    Thumbnails of an earlier card that this one no longer shows are removed.
    """
    written: set[Path] = set()
    rows: list[list[object]] = []
    undecodable: list[str] = []
    for k, ex in enumerate(examples):
        image_id = str(ex["image_id"])
        thumb = examples_dir / f"{k:02d}-{_safe_name(image_id).removesuffix('.jpg')}.jpg"
        if thumbnail(ex.get("image"), thumb):
            written.add(thumb)
            cell: object = md.Md(f"![{_safe_name(image_id)}](card/examples/{thumb.name})")
        else:
            undecodable.append(image_id)
            cell = "(not decodable)"
        rows.append([cell, ex["person_id"], ex["caption_source"], ex["caption"]])
    if examples_dir.is_dir():
        for old in examples_dir.glob("*.jpg"):
            if old not in written:
                old.unlink(missing_ok=True)
    return rows, undecodable


def _intro(name: str, manifest: Mapping[str, Any], totals: Mapping[str, Any], out: Path) -> str:
    recorded = manifest.get("totals") or {}
    rejects_note = ""
    if recorded.get("rejects") is not None:
        where = ", listed under `rejects/`." if (out / "rejects").is_dir() else "."
        rejects_note = f" The build rejected {md.fmt(recorded['rejects'])} rows{where}"
    return (
        f"**{name}** is a text-based person retrieval dataset built by pedsynth "
        f"(code version `{manifest.get('code_version', '?')}`, pairs schema "
        f"`{manifest.get('schema_version', '?')}`) on {manifest.get('created', '?')}. "
        f"Each row is one (image, caption) pair of a person identity: "
        f"{md.fmt(totals['pairs'])} pairs of {md.fmt(totals['images'])} images and "
        f"{md.fmt(totals['identities'])} identities, in Parquet shards under `data/`."
        f"{rejects_note}\n"
    )


def write_dataset_card(out_dir: str | Path, manifest: Mapping[str, Any]) -> Path:
    """Write ``OUT/README.md`` and its plots/thumbnails under ``OUT/card/``; return the path.

    ``manifest`` is the build's manifest as a dict (a pydantic model is dumped first); its
    ``config.write`` says how many example rows to show (``card_examples``) and whether to draw
    the plots (``card_plots``, default true; without them matplotlib is never imported). Works
    on partial builds: absent splits, an absent ``rejects/`` and 0-row splits are fine.
    """
    if hasattr(manifest, "model_dump"):
        manifest = manifest.model_dump(mode="json")
    out = Path(out_dir)
    card_dir = out / "card"
    config = manifest.get("config") or {}
    stages = manifest.get("stages") or {}
    name = str(manifest.get("name") or "pedsynth")

    write_cfg = config.get("write") or {}
    plots = bool(write_cfg.get("card_plots", True))

    stats = scan_build(out)
    card_dir.mkdir(parents=True, exist_ok=True)
    if plots:
        _draw_plots(card_dir, stats)
    else:  # plots of an earlier card would otherwise sit beside one that does not show them
        for plot in PLOT_FILES:
            (card_dir / plot).unlink(missing_ok=True)

    n_examples = int(write_cfg.get("card_examples", DEFAULT_CARD_EXAMPLES))
    example_split = stats.example_split()
    examples = example_rows(stats, example_split, n_examples) if example_split else []
    example_cells, undecodable = _examples(card_dir / "examples", examples)
    edits = edit_summary(stats, n_examples)
    grid = edit_grid(card_dir, edits.examples, plots)

    recorded_totals = manifest.get("totals") or {}
    lines, mismatches = split_counts(stats, recorded_totals.get("by_split") or {})
    totals = build_totals(stats, recorded_totals)
    files = md.data_files(stats)
    rejects, origin = rejects_by_stage_reason(stages, out)

    parts = [
        md.front_matter(name, files, int(totals["pairs"] or 0)),
        f"# {name}\n",
        _intro(name, manifest, totals, out),
        md.sources_section(config),
        md.splits_section(stats, lines, totals, mismatches),
        md.changes_section(manifest.get("changes")),
        md.stages_section(stages, rejects, origin),
        md.captions_section(stats),
        *(_plot_links() if plots else []),
        md.examples_section(example_split, example_cells, undecodable),
        md.edits_section(edits, grid),
        md.how_to_load(out, stats, [e["split"] for e in files]),
        md.columns_section(),
    ]
    readme = out / "README.md"
    atomic_write_bytes("\n".join(parts).encode("utf-8"), readme)
    return readme

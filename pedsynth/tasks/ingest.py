"""Ingest: turn a dataset on disk into pairs rows, and reject what cannot be used.

Ingest is split in two because the two halves cost very different amounts:

1. :func:`read_catalog` (:mod:`pedsynth.tasks.readers`) reads only the annotation file (or lists
   a folder). It is cheap, runs once per source, and gives a table of image records to cut into
   chunks.
2. :func:`load_images` opens, fully decodes and verifies the images of one chunk of that catalog
   (:mod:`pedsynth.tasks.image_checks`), checks its captions (:mod:`pedsynth.tasks.caption_checks`)
   and assembles the pairs rows. This is the expensive part, run on many chunks in parallel.

:func:`verify_pairs` re-checks rows read back from existing pedsynth shards (the ``shards``
source) with the same image checks.

Bad data never raises here: every unusable record, image or caption becomes one row of the
rejects table (stage ``ingest``, a reason from :data:`REJECT_REASONS`, a human-readable
detail). Exceptions are kept for config errors (a source that is not there) and programmer
errors (a table with the wrong schema). Nothing here imports Prefect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa

from pedsynth.schemas.config import IngestConfig
from pedsynth.schemas.tables import (
    CATALOG_SCHEMA,
    PAIRS_SCHEMA,
    REJECT_ROW_FIELDS,
    pairs_table,
    rejects_table,
    stable_id,
)
from pedsynth.tasks.caption_checks import check_caption, normalize_caption
from pedsynth.tasks.image_checks import CheckedImage, check_image, read_image_file
from pedsynth.tasks.ingest_rejects import (
    REJECT_REASONS,
    STAGE,
    Rejection,
    as_text,
    ingest_reject,
    show,
)
from pedsynth.tasks.readers import (
    IMAGE_EXTENSIONS,
    image_root_of,
    leaves_root,
    read_catalog,
    real_root,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "REJECT_REASONS",
    "STAGE",
    "CheckedImage",
    "Rejection",
    "check_caption",
    "check_image",
    "load_images",
    "normalize_caption",
    "read_catalog",
    "verify_pairs",
]


def _require_catalog(catalog: pa.Table) -> None:
    """Raise for a table that is not a catalog (a programmer error, not bad data)."""
    if not isinstance(catalog, pa.Table):
        raise TypeError(f"load_images: expected a pyarrow Table, got {type(catalog).__name__}")
    for field in CATALOG_SCHEMA:
        if field.name not in catalog.column_names:
            raise ValueError(f"load_images: the catalog has no column {field.name!r}")
        column = catalog.column(field.name)
        if column.type != field.type:
            raise ValueError(
                f"load_images: catalog column {field.name!r} is {column.type}, "
                f"expected {field.type}"
            )
        if not field.nullable and column.null_count:
            raise ValueError(f"load_images: catalog column {field.name!r} has nulls")


def load_images(catalog: pa.Table, cfg: IngestConfig) -> tuple[pa.Table, pa.Table]:
    """Open and verify the images of (a chunk of) a catalog: (pairs, rejects).

    One pairs row per good caption, or one uncaptioned row (``caption`` null) for a good image
    without any; rows keep catalog order. Bad images and captions become rejects.
    """
    _require_catalog(catalog)
    pairs: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    roots: dict[Path, str] = {}
    for entry in catalog.to_pylist():
        image = _outside_root(entry, roots) or read_image_file(
            entry["image_path"], entry["rel_path"], cfg
        )
        if isinstance(image, Rejection):
            rejects.append(ingest_reject(image, entry["source"], entry))
            continue
        captions, caption_rejects = _check_captions(entry, cfg)
        rejects.extend(caption_rejects)
        pairs.extend(_pair_rows(entry, image, captions))
    return pairs_table(pairs), rejects_table(rejects)


def _outside_root(entry: dict[str, Any], roots: dict[Path, str]) -> Rejection | None:
    """Refuse a catalogue row whose image resolves outside its dataset root, before opening it.

    :func:`read_catalog` refused such records already; this repeats the check at the moment the
    file is opened, for links changed since the catalogue was made.
    """
    image_root = image_root_of(entry["image_path"], entry["rel_path"])
    if image_root not in roots:
        roots[image_root] = real_root(image_root)
    why = leaves_root(entry["rel_path"], image_root, roots[image_root])
    return None if why is None else Rejection("outside_root", f"{show(entry['rel_path'])}: {why}")


def _check_captions(
    entry: dict[str, Any], cfg: IngestConfig
) -> tuple[list[tuple[int, str]], list[dict[str, Any]]]:
    """The good captions of one catalog row as (index, text), and rejects for the others."""
    good: list[tuple[int, str]] = []
    rejects: list[dict[str, Any]] = []
    for k, value in enumerate(entry["captions"] or []):
        if value is None:  # not a string; read_catalog rejected it already
            continue
        checked = check_caption(value, cfg.max_caption_chars)
        if isinstance(checked, Rejection):
            where = f"{entry['source']}/caption{k}"
            rejects.append(ingest_reject(checked, where, entry, caption=as_text(value)))
        else:
            good.append((k, checked))
    return good, rejects


def _pair_rows(
    entry: dict[str, Any], image: CheckedImage, captions: list[tuple[int, str]]
) -> list[dict[str, Any]]:
    """The pairs rows of one good image: one per caption, or one uncaptioned row."""
    label = entry["image_id"].split(":", 1)[0]
    base = {
        "image_id": entry["image_id"],
        "person_id": entry["person_id"],
        "split": entry["split"],
        "image": {"bytes": image.data, "path": image.path},
        "width": image.width,
        "height": image.height,
        "parent_id": None,
        "generator": f"dataset:{label}",
    }
    if not captions:
        pair_id = stable_id(entry["image_id"], "uncaptioned")
        return [base | {"pair_id": pair_id, "caption": None, "source": entry["source"]}]
    return [
        base
        | {
            "pair_id": stable_id(entry["image_id"], "original", k, caption),
            "caption": caption,
            "caption_source": "original",
            "source": f"{entry['source']}/caption{k}",
        }
        for k, caption in captions
    ]


def _cast_to_pairs(table: pa.Table, label: str) -> pa.Table:
    """``table`` with PAIRS_SCHEMA: missing optional columns null, extra columns dropped."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"verify_pairs: expected a pyarrow Table, got {type(table).__name__}")
    missing = [f.name for f in PAIRS_SCHEMA if not f.nullable and f.name not in table.column_names]
    if missing:
        raise ValueError(
            f"shards source {label!r}: the rows lack required column(s) {', '.join(missing)}"
        )
    columns = []
    for field in PAIRS_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"shards source {label!r}: column {field.name!r} is {column.type}, "
                f"which does not cast to {field.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=PAIRS_SCHEMA)


def _null_required(table: pa.Table) -> list[str | None]:
    """Per row, the first required column that is null there (None when there is none)."""
    found: list[str | None] = [None] * table.num_rows
    for field in PAIRS_SCHEMA:
        column = table.column(field.name)
        if field.nullable or not column.null_count:
            continue
        for i, valid in enumerate(column.is_valid().to_pylist()):
            if not valid and found[i] is None:
                found[i] = field.name
    return found


def verify_pairs(table: pa.Table, cfg: IngestConfig, label: str) -> tuple[pa.Table, pa.Table]:
    """Re-verify pairs rows read from existing shards: (good rows unchanged, rejects).

    The table is cast to PAIRS_SCHEMA first (a missing required column raises ``ValueError``).
    Each row's image bytes go through :func:`check_image`; a row with a null required value is a
    ``bad_record``, a row without image bytes a ``missing_file``.
    """
    table = _cast_to_pairs(table, label)
    null_columns = _null_required(table)
    images = table.column("image").to_pylist()
    shown = table.select(list(REJECT_ROW_FIELDS)).to_pylist()
    keep: list[bool] = []
    rejects: list[dict[str, Any]] = []
    checked: dict[tuple[str, bytes], CheckedImage | Rejection] = {}  # captions share an image
    for i, (image, row) in enumerate(zip(images, shown, strict=True)):
        name = (image or {}).get("path") or f"{label}#{i}"
        data = (image or {}).get("bytes")
        if null_columns[i] is not None:
            result: CheckedImage | Rejection = Rejection(
                "bad_record", f"{name}: required column {null_columns[i]!r} is null"
            )
        elif data is None:
            result = Rejection("missing_file", f"{name}: the row has no image bytes")
        else:
            if (name, data) not in checked:
                checked[name, data] = check_image(data, name, cfg)
            result = checked[name, data]
        keep.append(not isinstance(result, Rejection))
        if isinstance(result, Rejection):
            rejects.append(ingest_reject(result, row["source"] or f"{label}#{i}", row))
    return table.filter(pa.array(keep, pa.bool_())), rejects_table(rejects)

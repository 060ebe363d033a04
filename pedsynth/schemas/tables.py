"""Arrow schemas of every table pedsynth writes.

The pairs table is the data contract: one row per (image, caption) pair. ``image`` is the
Hugging Face ``Image`` layout (struct ``{bytes, path}``) so ``datasets`` decodes it and the
shards are self-contained. Bump ``SCHEMA_VERSION`` on any change a reader could notice.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

SCHEMA_VERSION = "1.1"  # 1.1: fact_conflicts

CAPTION_SOURCES = ("original", "mllm", "rewrite", "edit")
SPLITS = ("train", "val", "test")

IMAGE_TYPE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])

EDIT_TYPE = pa.struct(
    [
        ("parent_image_id", pa.string()),
        ("attribute", pa.string()),  # e.g. "upper_garment"
        ("target", pa.string()),  # the reference attribute as text
        ("reference_image_id", pa.string()),  # set when the reference is an image
        ("method", pa.string()),  # e.g. "inpaint", "instruct-pix2pix"
        ("strength", pa.float32()),
        ("original", pa.string()),  # the replaced value, e.g. "red"
        ("mask", pa.string()),  # the mask backend used: procedural | box
        ("model", pa.string()),  # the diffusion model, diffusers:model@revision
        ("seed", pa.int64()),  # the diffusion seed of this edit
    ]
)

PAIRS_SCHEMA = pa.schema(
    [
        pa.field("pair_id", pa.string(), nullable=False),
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("person_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("image", IMAGE_TYPE, nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("caption", pa.string()),  # null only before the caption stage
        pa.field("caption_source", pa.string()),
        pa.field("source", pa.string(), nullable=False),  # dataset:annotation-file#record
        pa.field("parent_id", pa.string()),  # pair_id this row was derived from
        pa.field("template_id", pa.string()),
        pa.field("generator", pa.string(), nullable=False),  # backend:model@revision
        pa.field("prompt_hash", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("faithfulness", pa.float32()),  # cosine to the parent caption
        pa.field("fact_conflicts", pa.list_(pa.string())),  # [] facts agree, null not checked
        pa.field("clip_score", pa.float32()),
        pa.field("tokens", pa.list_(pa.string())),
        pa.field("token_noise", pa.list_(pa.float32())),
        pa.field("hard_negatives", pa.list_(pa.string())),
        pa.field("edit", EDIT_TYPE),
    ],
    metadata={"pedsynth.schema_version": SCHEMA_VERSION, "pedsynth.table": "pairs"},
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field("stage", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("detail", pa.string()),
        pa.field("source", pa.string(), nullable=False),  # what was rejected: file#record
        pa.field("image_id", pa.string()),
        pa.field("pair_id", pa.string()),
        pa.field("person_id", pa.string()),
        pa.field("split", pa.string()),
        pa.field("caption", pa.string()),
    ],
    metadata={"pedsynth.schema_version": SCHEMA_VERSION, "pedsynth.table": "rejects"},
)


CATALOG_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # annotation-file#record-index
        pa.field("image_path", pa.string(), nullable=False),  # absolute path on disk
        pa.field("rel_path", pa.string(), nullable=False),  # as the annotation names it
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("person_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("captions", pa.list_(pa.string())),  # raw, validated later; may be empty
    ],
    metadata={"pedsynth.schema_version": SCHEMA_VERSION, "pedsynth.table": "catalog"},
)
"""What an annotation file says about one image, before the image is opened."""


def stable_id(*parts: object) -> str:
    """A short, stable hash of ``parts``: the same inputs give the same id on any machine."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).hexdigest()
    return digest[:20]


def empty_table(schema: pa.Schema) -> pa.Table:
    return schema.empty_table()


def pairs_table(rows: list[dict]) -> pa.Table:
    """Build a pairs table from row dicts; missing optional columns become null."""
    return pa.Table.from_pylist(rows, schema=PAIRS_SCHEMA)


REJECT_COLUMNS: tuple[str, ...] = tuple(REJECTS_SCHEMA.names)
REJECT_ROW_FIELDS: tuple[str, ...] = (
    "source",
    "image_id",
    "pair_id",
    "person_id",
    "split",
    "caption",
)
"""The columns of a pairs (or catalogue) row that a reject row copies."""


def reject_row(
    stage: str, reason: str, detail: str | None, row: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    """The one builder of a rejects row: what was rejected (``row``, any superset of the
    id columns), by which stage, and why. ``fields`` override what ``row`` says."""
    out: dict[str, Any] = {"stage": stage, "reason": reason, "detail": detail}
    for name in REJECT_ROW_FIELDS:
        out[name] = (row or {}).get(name)
    out.update(fields)
    return out


def rejects_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=REJECTS_SCHEMA)

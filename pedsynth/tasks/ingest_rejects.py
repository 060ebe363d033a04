"""What ingest rejects, and how a reject row quotes the value it rejected.

The readers, the image checks and the caption checks all reject through this vocabulary, so
every ingest reject row carries a reason from :data:`REJECT_REASONS` and a detail whose quoted
values are cut to the same length.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from pedsynth.schemas.tables import reject_row

STAGE = "ingest"

REJECT_REASONS: tuple[str, ...] = (
    # read_catalog
    "malformed_json",  # annotation file is not JSON, or its top level is not a list
    "bad_record",  # a record with missing keys or fields of the wrong type
    "duplicate_image",  # a second record for the same image file
    "outside_root",  # the image path (``..``, absolute, or a symbolic link) leaves the dataset
    # load_images / verify_pairs
    "missing_file",
    "unreadable_file",  # the file exists but cannot be read (permissions, I/O error)
    "empty_file",
    "too_large",
    "too_small",
    "truncated",
    "undecodable",
    # captions (non-string captions are rejected by read_catalog, the rest by load_images)
    "non_text_caption",
    "empty_caption",
    "caption_too_long",
)

SHOWN_CHARS = 200  # longest value quoted in a reject detail
REJECTED_CAPTION_CHARS = 2_000  # longest caption copied into a reject row


class Rejection(NamedTuple):
    """Why an image or caption was rejected: a reason from REJECT_REASONS and a detail."""

    reason: str
    detail: str


def show(value: object) -> str:
    """``repr(value)`` cut to a length fit for a reject detail."""
    text = repr(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def as_text(value: object) -> str:
    """Something storable in a string column that shows what ``value`` was."""
    if isinstance(value, str):
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    else:
        text = json.dumps(value, default=repr)
    return text[:REJECTED_CAPTION_CHARS]


def is_utf8(text: str) -> bool:
    """False for strings Arrow cannot store (unpaired surrogates from JSON ``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def ingest_reject(
    rejection: Rejection, source: str, row: dict[str, Any] | None = None, **fields: Any
) -> dict[str, Any]:
    """One ingest rejects row: ``rejection`` of what ``source`` names; ids from ``row``/fields."""
    return reject_row(STAGE, rejection.reason, rejection.detail, row, source=source, **fields)

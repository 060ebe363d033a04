"""Caption checks: the normalised text of a caption, or why it is not usable as one.

A caption is stored NFC-normalised with whitespace runs collapsed; it must contain a letter,
no control or replacement character, and fit ``max_caption_chars``. Non-string captions are
caught earlier, while cataloguing (:mod:`pedsynth.tasks.readers`), because the catalogue's
caption column holds strings only.
"""

from __future__ import annotations

import re
import unicodedata

from pedsynth.tasks.ingest_rejects import Rejection, show


def normalize_caption(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


# Unicode categories Cc (C0/C1 controls) and Cs (surrogates), and U+FFFD; one regex search
# instead of a per-character category lookup, which dominated ingest time on large corpora.
_CONTROL_OR_REPLACEMENT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")


def _not_text(text: str) -> str | None:
    """Why a normalised caption is not text: no letter, or a control character; else None."""
    if not any(ch.isalpha() for ch in text):
        return "has no letters"
    if (bad := _CONTROL_OR_REPLACEMENT.search(text)) is not None:
        return f"has the control or replacement character U+{ord(bad.group()):04X}"
    return None


def check_caption(value: object, max_chars: int) -> str | Rejection:
    """The normalised caption, or why it is rejected."""
    if not isinstance(value, str):
        return Rejection("non_text_caption", f"not a string: {show(value)}")
    text = normalize_caption(value)
    if not text:
        what = "empty" if not value else "whitespace only"
        return Rejection("empty_caption", f"caption is {what}: {show(value)}")
    problem = _not_text(text)
    if problem is not None:
        return Rejection("non_text_caption", f"caption {problem}: {show(text)}")
    if len(text) > max_chars:
        return Rejection(
            "caption_too_long", f"{len(text)} characters > max_caption_chars {max_chars}"
        )
    return text

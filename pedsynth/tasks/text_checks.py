"""The checks every generated caption must pass, whichever stage wrote it (caption, rewrite, an
edit's re-annotation): not empty, text, no leaked template slot, no refusal, within the word
limits, not cut off, not looping. :func:`check_generated` returns the cleaned text or why it
cannot be a caption; :func:`generated_text_check` makes it a check of the regenerate loop.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Protocol

from pedsynth.prompts import SLOT_LEAK_MARKERS
from pedsynth.tasks.regenerate import Check, Draft, Rejected

_REFUSAL = re.compile(
    r"\b(i'?m sorry|i am sorry|i apologi[sz]e|i can(?:not|'t)|i am unable|i'm unable|"
    r"unable to (?:describe|determine|see|identify|help)|as an ai|cannot (?:describe|determine|"
    r"identify|help|see)|no person (?:is )?(?:visible|in the image))",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+(?:['’-]\w+)*")
_PREAMBLE = re.compile(r"^(?:rewritten caption|caption|description)\s*:\s*", re.IGNORECASE)


def clean_generated(text: str) -> str:
    """NFC, whitespace collapsed, a leading ``Caption:`` and wrapping quotes removed."""
    text = " ".join(unicodedata.normalize("NFC", text).split())
    text = _PREAMBLE.sub("", text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _repetition(words: Sequence[str]) -> str | None:
    """Why a word sequence is degenerate (a looping generation), or None."""
    lowered = [w.lower() for w in words]
    run = 1
    for prev, cur in zip(lowered, lowered[1:], strict=False):
        run = run + 1 if cur == prev else 1
        if run >= 4:
            return f"the word {cur!r} {run} times in a row"
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(lowered) - 2):
        gram = tuple(lowered[i : i + 3])
        grams[gram] = grams.get(gram, 0) + 1
        if grams[gram] >= 3:
            return f"the phrase {' '.join(gram)!r} 3 times"
    if len(lowered) >= 12 and len(set(lowered)) / len(lowered) < 0.35:
        return f"only {len(set(lowered))} distinct words of {len(lowered)}"
    return None


def check_generated(
    text: str | None,
    *,
    min_words: int,
    max_words: int,
    truncated: bool = False,
) -> str | Rejected:
    """The cleaned text of a generation, or why it cannot be a caption."""
    if text is None or not text.strip():
        return Rejected("empty", "the model returned no text")
    cleaned = clean_generated(text)
    if not any(ch.isalpha() for ch in cleaned):
        return Rejected("not_text", f"no letters: {cleaned[:80]!r}")
    for ch in cleaned:
        if ch == "\ufffd" or unicodedata.category(ch) in ("Cc", "Cs"):
            return Rejected("not_text", f"control or replacement character U+{ord(ch):04X}")
    leaked = [m for m in SLOT_LEAK_MARKERS if m in cleaned]
    if leaked:
        return Rejected("template_leak", f"contains {leaked[0]!r}")
    refusal = _REFUSAL.search(cleaned)
    if refusal:
        return Rejected("refusal", f"says {refusal.group(0)!r}")
    words = _WORD.findall(cleaned)
    if len(words) < min_words:
        return Rejected("too_short", f"{len(words)} words < min_words {min_words}")
    if len(words) > max_words:
        return Rejected("too_long", f"{len(words)} words > max_words {max_words}")
    if truncated:
        return Rejected("too_long", "stopped at max_tokens before the caption ended")
    repeated = _repetition(words)
    if repeated:
        return Rejected("repetitive", repeated)
    return cleaned


class TextLimits(Protocol):
    """The settings of a stage section that shape its caption checks."""

    min_words: int
    max_words: int
    reject_truncated: bool  # a draft stopped at max_tokens counts as too long


def generated_text_check(limits: TextLimits) -> Check:
    """:func:`check_generated` as a check of a draft, with a stage's word limits."""

    def check(draft: Draft, text: str) -> str | Rejected:
        truncated = limits.reject_truncated and draft.result.finish_reason == "length"
        return check_generated(
            text, min_words=limits.min_words, max_words=limits.max_words, truncated=truncated
        )

    return check

"""Re-annotation of an edited image's caption, and the checks every re-annotation passes.

:func:`substitute` is the deterministic re-annotator: it replaces the edited attribute's words
in the original caption (the colour words bound to the region's garment, or the garment word;
"a" / "an" follow the new word) and returns None when the caption does not state the attribute.
It is also the reference of the checks: the caption an edit should yield is the parent's with
the edit applied, so faithfulness is judged against that caption (the edited fact is then
expected to change and every other fact must still agree).

Checks of a draft (the regenerate loop's :data:`Check` s):
``missing_target`` (the draft does not name the new value for the edited fact),
``keeps_original`` (it still names the replaced value), then the project's faithfulness filter
(:func:`pedsynth.tasks.faithfulness.faithfulness_check`) against the edited parent caption:
``contradicts:<fact>`` / ``adds:<fact>``, or ``unfaithful`` when an embedding ``alpha`` is set;
with a CLIP configured, :func:`clip_check`: ``clip_prefers_original`` (the draft does not score
higher with the edited image than with the original).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pedsynth.engines.text import ChatRequest, GenerationResult, failure
from pedsynth.lexicon import _Reader, extract_facts, lexicon
from pedsynth.tasks.edit_bank import EditSpec, bank
from pedsynth.tasks.regenerate import BatchCheck, Draft, Rejected, Verdict

SUBSTITUTE_ID = "substitute:lexicon@1"
_ARTICLE = re.compile(r"(?<![A-Za-z])(an|a)$", re.IGNORECASE)


def _spans(caption: str, spec: EditSpec) -> list[tuple[int, int]]:
    """Character spans of the words that state ``spec``'s original value."""
    lex = lexicon()
    reader = _Reader(lex, caption)
    units = reader.units
    spans: list[tuple[int, int]] = []
    for k, unit in enumerate(units):
        if spec.kind == "type":
            if (
                unit.kind == "garment"
                and unit.entry.region == spec.region
                and unit.value == spec.original
                and not reader.negated(k)
            ):
                spans.append((unit.start, unit.end))
            continue
        if unit.kind != "colour" or unit.value != spec.original:
            continue
        target = reader.binding.get(k)
        noun = units[target] if isinstance(target, int) else None
        if spec.region == "hair":
            if (noun is not None and noun.kind in ("hair_noun", "gender", "person")) or (
                unit.value in lex.hair_only
            ):
                spans.append((unit.start, unit.end))
        elif noun is not None and noun.kind == "garment" and noun.entry.region == spec.region:
            spans.append((unit.start, unit.end))
    return spans


def substitute(caption: str, spec: EditSpec) -> str | None:
    """``caption`` with the edit applied, or None when it does not state the edited value."""
    if spec.original is None:
        return None
    spans = _spans(caption, spec)
    if not spans:
        return None
    word = bank().word(spec.region, spec.kind, spec.to)
    out, last = [], 0
    for start, end in spans:
        head = caption[last:start]
        stripped = head.rstrip()
        gap = head[len(stripped) :]
        article = _ARTICLE.search(stripped)
        if article is not None:
            new = "an" if word[0] in "aeiou" else "a"
            new = new.capitalize() if article.group(1)[0].isupper() else new
            stripped = stripped[: article.start(1)] + new
        out.append(stripped + gap)
        out.append(word)
        last = end
    out.append(caption[last:])
    return "".join(out)


def describe_edit(spec: EditSpec) -> str:
    """The edit in words, for the LLM re-annotation prompt."""
    b = bank()
    what = "hair colour" if spec.region == "hair" else f"{spec.region} {spec.kind}"
    original = b.word(spec.region, spec.kind, spec.original) if spec.original else "?"
    return f"the {what} changed from {original} to {b.word(spec.region, spec.kind, spec.to)}"


def target_check(draft: Draft[Any], text: str) -> str | Rejected:
    """The draft names the new value of the edited fact and no longer the replaced one."""
    spec: EditSpec = draft.payload.spec
    lex = lexicon()
    values = [v for v in extract_facts(text).get(spec.fact, ()) if v not in ("none", "no")]
    if not any(lex.values_compatible(spec.fact, v, spec.to) for v in values):
        return Rejected("missing_target", f"the caption does not name {spec.fact} {spec.to}")
    stale = [
        v
        for v in values
        if lex.values_compatible(spec.fact, v, spec.original)
        and not lex.values_compatible(spec.fact, v, spec.to)
    ]
    if stale:
        return Rejected("keeps_original", f"the caption still names {spec.fact} {stale[0]}")
    return text


def _unit(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def clip_check(
    engine: Any,
    images_of: Callable[[Draft[Any]], tuple[str, bytes, bytes]],
    margin: float,
    scores: dict[tuple[str, str], tuple[float, float]],
) -> BatchCheck:
    """The draft must score higher (cosine of pooled CLIP embeddings) with the edited image than
    with the original by more than ``margin``, or the edit did not make the caption truer.

    ``images_of(draft)`` gives (edit key, edited image bytes, original image bytes); each
    image is encoded once per key. Every judged (key, text) gets its (edited, original) scores
    in ``scores``, so the stage can record the kept caption's score."""
    embedded: dict[str, np.ndarray] = {}

    def check(drafts: Sequence[Draft[Any]], texts: Sequence[str]) -> list[Verdict]:
        keys = []
        for draft in drafts:
            key, edited, original = images_of(draft)
            keys.append(key)
            if key not in embedded:
                embedded[key] = _unit(engine.encode_images([edited, original]).pooled)
        text_vectors = _unit(engine.encode_texts(list(texts)).pooled)
        verdicts: list[Verdict] = []
        for key, text, vector in zip(keys, texts, text_vectors, strict=True):
            with_edit, with_original = (float(s) for s in embedded[key] @ vector)
            scores[(key, text)] = (with_edit, with_original)
            if with_edit - with_original > margin:
                verdicts.append(text)
                continue
            detail = (
                f"clip score with the edited image {with_edit:.6f}, with the original "
                f"{with_original:.6f} (margin {margin})"
            )
            verdicts.append(Rejected("clip_prefers_original", detail))
        return verdicts

    return BatchCheck(check)


class SubstituteGenerator:
    """The substitute re-annotator behind the generator protocol, so it runs through the same
    regenerate loop and checks as an LLM: each request's answer is fixed in advance."""

    kind = "text"
    config = None

    def __init__(self, answers: dict[str, str | None]):
        self.answers = answers

    @property
    def generator_id(self) -> str:
        return SUBSTITUTE_ID

    def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        out = []
        for r in requests:
            text = self.answers.get(r.request_id)
            if text is None:
                out.append(failure(r, "bad_request", "the caption does not state the attribute"))
            else:
                out.append(GenerationResult(r.request_id, text, finish_reason="stop"))
        return out

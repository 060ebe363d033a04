"""The faithfulness filter (LLM-DA's Text Faithfulness Filter plus an attribute check) and its
stage for derived captions.

:func:`judge` is the one filter, used by this stage and inside the rewrite loop
(:func:`faithfulness_check`). Two checks of a derived caption against its parent:
- **embedding** (LLM-DA): the cosine of the two captions under a sentence embedder (default
  the packaged all-MiniLM-L6-v2) must be at least ``alpha``; it catches drift, but a single
  wrong fact still scores 0.7-0.9 (``tests/test_faithfulness.py`` pins that);
- **attributes** (``attributes: true``, the default): the facts of both captions
  (:mod:`pedsynth.lexicon`) must agree: the child may not contradict a fact both state or add
  one the parent does not. This catches the single wrong colour, garment, gender or bag.

A caption failing the embedding is rejected ``unfaithful`` (detail: the cosine, and any fact
conflicts); one that passes it but not the attributes is rejected with its first conflict as
the reason, ``contradicts:upper_colour`` or ``adds:bag``, every conflict in the detail. Rows
store both results: ``faithfulness`` (the cosine, null when not embedded) and
``fact_conflicts`` (``[]`` checked and agreeing, null not checked).

The stage: for each row whose ``caption_source`` is in ``sources`` and that has a
``parent_id``, both checks against its parent's caption; a failing row becomes a reject row.
A row that already has a score or a ``fact_conflicts`` list (the rewrite stage judges its own
drafts and regenerates the unfaithful ones) is not computed again, only held to this stage's
``alpha`` and attribute setting. A row whose parent is not in the shard cannot be judged and
is rejected as ``parent_missing``. Every other row passes through unchanged.

Regeneration needs the model that wrote the text, so it happens in the stage that owns that
model (rewrite; the edit stage for its re-annotations); this stage is the filter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.embedder import SentenceEmbedder, get_embedder
from pedsynth.lexicon import compare_facts, extract_facts
from pedsynth.schemas.base import shaping_dump
from pedsynth.schemas.tables import PAIRS_SCHEMA, REJECT_ROW_FIELDS, reject_row, rejects_table
from pedsynth.schemas.text import FaithfulnessConfig
from pedsynth.tasks.regenerate import BatchCheck, Draft, Rejected, Scored, Verdict


@dataclass(frozen=True)
class Judgement:
    """The filter's verdict on one derived caption."""

    score: float | None  # cosine to the parent; None when not embedded
    conflicts: tuple[str, ...] | None  # fact conflicts; None when not checked
    reason: str | None  # None: faithful
    detail: str


def judge(
    captions: Sequence[str],
    parents: Sequence[str],
    *,
    embedder: SentenceEmbedder | None,
    alpha: float | None,
    attributes: bool,
    scores: Sequence[float | None] | None = None,
    conflicts: Sequence[Sequence[str] | None] | None = None,
) -> list[Judgement]:
    """Judge each caption against its parent (module docstring). ``scores``/``conflicts`` are
    results computed earlier (None where not): only the missing ones are computed, the cosines
    of a batch in one embedder call. ``alpha=None`` turns the embedding check off."""
    n = len(captions)
    got = list(scores) if scores is not None else [None] * n
    facts = [None if c is None else tuple(c) for c in conflicts] if conflicts else [None] * n
    if alpha is not None:
        todo = [i for i in range(n) if got[i] is None]
        if todo:
            if embedder is None:
                raise ValueError("the embedding check needs an embedder")
            sims = embedder.pair_similarity([captions[i] for i in todo], [parents[i] for i in todo])
            for i, sim in zip(todo, sims.tolist(), strict=True):
                got[i] = float(sim)
    if attributes:
        parent_facts: dict[str, Any] = {}  # a parent has K rewrites: read it once
        for i in range(n):
            if facts[i] is None:
                parent = parent_facts.get(parents[i])
                if parent is None:
                    parent = parent_facts[parents[i]] = extract_facts(parents[i])
                facts[i] = tuple(compare_facts(parent, extract_facts(captions[i])))
    out = []
    for score, found in zip(got, facts, strict=True):
        found = found if attributes else None
        listed = ", ".join(found or ())
        if alpha is not None and score is not None and score < alpha:
            facts_note = f"; facts: {listed}" if listed else ""
            detail = f"cosine {score:.3f} < alpha {alpha}{facts_note}"
            out.append(Judgement(score, found, "unfaithful", detail))
        elif found:
            cosine = f" (cosine {score:.3f})" if score is not None else ""
            out.append(Judgement(score, found, found[0], f"facts: {listed}{cosine}"))
        else:
            out.append(Judgement(score, found, None, ""))
    return out


def faithfulness_check(
    embedder: SentenceEmbedder | None, alpha: float | None, attributes: bool
) -> BatchCheck:
    """:func:`judge` as a check of the regenerate loop: each draft against its parent's caption
    (``draft.payload.parent["caption"]``), a round embedded in one call. A passing draft
    carries its cosine as its score."""

    def check(drafts: Sequence[Draft[Any]], texts: Sequence[str]) -> list[Verdict]:
        parents = [d.payload.parent["caption"] for d in drafts]
        verdicts: list[Verdict] = []
        for text, j in zip(
            texts,
            judge(texts, parents, embedder=embedder, alpha=alpha, attributes=attributes),
            strict=True,
        ):
            if j.reason is not None:
                verdicts.append(Rejected(j.reason, f"{j.detail} to its parent"))
            else:
                verdicts.append(text if j.score is None else Scored(text, j.score))
        return verdicts

    return BatchCheck(check)


class FaithfulnessStage:
    name = "faithfulness"

    def __init__(self, config: FaithfulnessConfig, seed: int):
        self.config, self.seed = config, seed

    def fingerprint_parts(self) -> dict[str, Any]:
        return {"config": shaping_dump(self.config)}

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        table = table.cast(PAIRS_SCHEMA) if table.schema != PAIRS_SCHEMA else table
        n = table.num_rows
        sources = pa.array(self.config.sources)
        derived = pc.and_(
            pc.is_valid(table.column("parent_id")), pc.is_valid(table.column("caption"))
        )
        in_scope = pc.fill_null(
            pc.and_(pc.is_in(table.column("caption_source"), value_set=sources), derived), False
        ).to_numpy(zero_copy_only=False)
        stored_scores = table.column("faithfulness").to_pylist()
        stored_facts = table.column("fact_conflicts").to_pylist()
        captions = table.column("caption").to_pylist()
        parents = table.column("parent_id").to_pylist()
        by_pair = dict(zip(table.column("pair_id").to_pylist(), captions, strict=True))

        missing, judged = [], []
        for i in np.flatnonzero(in_scope):
            if parents[i] in by_pair and by_pair[parents[i]] is not None:
                judged.append(int(i))
            else:
                missing.append(int(i))
        cfg = self.config
        needs_embedding = any(stored_scores[i] is None for i in judged)
        verdicts = judge(
            [captions[i] for i in judged],
            [by_pair[parents[i]] for i in judged],
            embedder=get_embedder(cfg.embedder) if needs_embedding else None,
            alpha=cfg.alpha,
            attributes=cfg.attributes,
            scores=[stored_scores[i] for i in judged],
            conflicts=[stored_facts[i] for i in judged],
        )

        rejects: list[dict[str, Any]] = []
        info = table.select(list(REJECT_ROW_FIELDS)).to_pylist()
        for i in missing:
            detail = f"parent {parents[i]} is not in this shard"
            rejects.append(reject_row(self.name, "parent_missing", detail, info[i]))
        keep = np.ones(n, dtype=bool)
        keep[missing] = False
        scores, facts = list(stored_scores), list(stored_facts)
        for i, verdict in zip(judged, verdicts, strict=True):
            scores[i] = verdict.score
            facts[i] = None if verdict.conflicts is None else list(verdict.conflicts)
            if verdict.reason is not None:
                keep[i] = False
                detail = f"{verdict.detail} to parent {parents[i]}"
                rejects.append(reject_row(self.name, verdict.reason, detail, info[i]))

        out = _set(table, "faithfulness", scores)
        out = _set(out, "fact_conflicts", facts)
        return out.filter(pa.array(keep)), rejects_table(rejects)


def _set(table: pa.Table, name: str, values: list[Any]) -> pa.Table:
    field = PAIRS_SCHEMA.field(name)
    return table.set_column(table.schema.get_field_index(name), field, pa.array(values, field.type))


def build_stage(config: FaithfulnessConfig, seed: int) -> FaithfulnessStage:
    return FaithfulnessStage(config, seed)

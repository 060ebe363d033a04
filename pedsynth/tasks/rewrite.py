"""The rewrite stage: an LLM rewrites captions K times each (LLM-DA), and the text faithfulness
filter runs inside its loop.

Each selected caption (``sources``, default the originals) gets K requests with the rewrite
instruction; the sampling seed comes from (seed, parent pair_id, k, attempt). A draft must pass
the generic checks (:func:`pedsynth.tasks.text_checks.check_generated`), differ from its
parent, and pass the faithfulness filter (:func:`pedsynth.tasks.faithfulness.judge`, the same
one the faithfulness stage runs): when ``alpha`` is set a sentence-embedding cosine with its
parent of at least ``alpha`` (one embedder call per round), and when ``attributes`` is on no
fact conflict with its parent (``contradicts:upper_colour``, ``adds:bag``, ...). The shared
regenerate loop (:mod:`pedsynth.tasks.regenerate`) asks a failed draft again, up to
``max_retries`` (R) times: each discarded draft is a reject row ``regenerated:<reason>`` and a
slot that still fails a reject row ``<reason>`` (``unfaithful`` for the cosine, the first fact
conflict for the attributes). Passing rows carry their cosine in ``faithfulness`` and
``fact_conflicts = []`` when the attributes were checked. The filter runs here because
regenerating needs the rewrite engine; the separate ``faithfulness`` stage filters captions made
elsewhere (edit re-annotations).

Rows: ``caption_source=rewrite``, ``parent_id`` = the parent's pair_id, image columns copied
from the parent, ``pair_id = stable_id(parent_id, "rewrite", k, caption)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.embedder import get_embedder
from pedsynth.engines.text import ChatRequest, get_generator
from pedsynth.prompts import load_prompt
from pedsynth.schemas.base import shaping_dump
from pedsynth.schemas.tables import pairs_table, rejects_table, stable_id
from pedsynth.schemas.text import RewriteConfig
from pedsynth.tasks.faithfulness import faithfulness_check
from pedsynth.tasks.regenerate import (
    BatchCheck,
    Check,
    Draft,
    Rejected,
    Slot,
    SlotStage,
    regenerate,
)
from pedsynth.tasks.shards import with_requests
from pedsynth.tasks.text_checks import generated_text_check

_PARENT_COLUMNS = [
    "pair_id",
    "image_id",
    "person_id",
    "split",
    "image",
    "width",
    "height",
    "caption",
    "source",
    "edit",
]


@dataclass(frozen=True)
class _Job:
    """One rewrite slot: the k-th rewrite of a parent caption."""

    parent: dict[str, Any]
    k: int

    @property
    def source(self) -> str:
        return f"{self.parent['source']}/rewrite{self.k}"


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.lower().split()).rstrip(".") == " ".join(b.lower().split()).rstrip(".")


def _changed(draft: Draft[_Job], text: str) -> str | Rejected:
    """A rewrite must differ from its parent (case, spacing and a final full stop aside)."""
    if _same_text(text, draft.payload.parent["caption"]):
        return Rejected("unchanged", "the rewrite repeats the caption")
    return text


class RewriteStage(SlotStage):
    name = "rewrite"

    def __init__(self, config: RewriteConfig, seed: int):
        self.config, self.seed = config, seed
        self.prompt = load_prompt("rewrite")

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "config": shaping_dump(self.config),
            "generator": self.config.engine.generator_id,
            "prompt": self.prompt.hash,
            "seed": self.seed,
        }

    def _parents(self, table: pa.Table) -> list[dict[str, Any]]:
        wanted = pc.and_(
            pc.is_valid(table.column("caption")),
            pc.is_in(table.column("caption_source"), value_set=pa.array(self.config.sources)),
        )
        return table.filter(pc.fill_null(wanted, False)).select(_PARENT_COLUMNS).to_pylist()

    def _slot(self, job: _Job) -> Slot[_Job]:
        pair_id = job.parent["pair_id"]
        request = ChatRequest(
            request_id=f"{pair_id}#{job.k}",
            prompt=self.prompt.render(caption=job.parent["caption"]),
        )
        return Slot(job, request, seed_parts=(pair_id, job.k))

    def _checks(self, with_filter: bool) -> list[Check | BatchCheck]:
        cfg = self.config
        checks: list[Check | BatchCheck] = [generated_text_check(cfg), _changed]
        if with_filter and (cfg.alpha is not None or cfg.attributes):
            embedder = get_embedder(cfg.embedder) if cfg.alpha is not None else None
            checks.append(faithfulness_check(embedder, cfg.alpha, cfg.attributes))
        return checks

    def _run(
        self, table: pa.Table, *, base: pa.Table, only: frozenset[str] | None
    ) -> tuple[pa.Table, pa.Table]:
        cfg = self.config
        per_parent = range(cfg.rewrites_per_caption)
        jobs = [_Job(p, k) for p in self._parents(table) for k in per_parent]
        slots = [self._slot(job) for job in jobs if only is None or job.source in only]
        generator = get_generator(cfg.engine, "text") if slots else None
        done = regenerate(
            slots,
            generator,
            stage=self.name,
            seed=self.seed,
            max_retries=cfg.max_retries,
            checks=self._checks(with_filter=bool(slots)),
            describe=_describe,
        )
        new_rows = [
            self._row(
                kept.draft.payload, kept.text, generator.generator_id, kept.draft.seed, kept.score
            )
            for kept in done.kept
        ]
        output = pa.concat_tables([base, pairs_table(new_rows)])
        output = with_requests(
            output,
            len(slots),
            prompt_tokens=done.prompt_tokens,
            completion_tokens=done.completion_tokens,
        )
        return output, rejects_table(done.rejects)

    def _row(
        self, job: _Job, caption: str, generator_id: str, seed: int, score: float | None
    ) -> dict[str, Any]:
        parent = job.parent
        return {
            "pair_id": stable_id(parent["pair_id"], "rewrite", job.k, caption),
            "image_id": parent["image_id"],
            "person_id": parent["person_id"],
            "split": parent["split"],
            "image": parent["image"],
            "width": parent["width"],
            "height": parent["height"],
            "caption": caption,
            "caption_source": "rewrite",
            "source": job.source,
            "parent_id": parent["pair_id"],
            "template_id": None,
            "generator": generator_id,
            "prompt_hash": self.prompt.hash,
            "seed": seed,
            "faithfulness": score,
            "fact_conflicts": [] if self.config.attributes else None,
            "edit": parent["edit"],
        }


def _describe(draft: Draft[_Job]) -> tuple[dict[str, Any], str]:
    """A reject row of a rewrite draft: the parent's ids, with the draft as its caption."""
    job, result = draft.payload, draft.result
    row = job.parent | {"caption": result.text if result.ok else None, "source": job.source}
    return row, f"parent {job.parent['pair_id']}"


def build_stage(config: RewriteConfig, seed: int) -> RewriteStage:
    return RewriteStage(config, seed)

"""The rewrite stage: an LLM rewrites captions K times each (LLM-DA), and the text faithfulness
filter runs inside its loop.

Each selected caption (``sources``, default the originals) gets K requests with the rewrite
instruction; the sampling seed comes from (seed, parent pair_id, k, attempt). A draft must pass
the generic checks (:func:`pedsynth.tasks.caption.check_generated`), differ from its parent, and,
when ``alpha`` is set, have a sentence-embedding cosine with its parent of at least ``alpha``.
A draft that fails any of these is asked again, up to ``max_retries`` (R) times: each discarded
draft is a reject row ``regenerated:<reason>`` and a slot that still fails a reject row
``<reason>`` (``unfaithful`` for the filter). Passing rows carry their score in
``faithfulness``. The filter lives here because regenerating needs the rewrite engine; the
separate ``faithfulness`` stage filters captions made elsewhere (edit re-annotations).

Rows: ``caption_source=rewrite``, ``parent_id`` = the parent's pair_id, image columns copied
from the parent, ``pair_id = stable_id(parent_id, "rewrite", k, caption)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.embedder import get_embedder
from pedsynth.engines.text import ChatRequest, derive_seed, get_generator
from pedsynth.prompts import load_prompt
from pedsynth.schemas.tables import PAIRS_SCHEMA, pairs_table, rejects_table, stable_id
from pedsynth.schemas.text import RewriteConfig
from pedsynth.tasks.caption import (
    CHECKS_VERSION,
    Rejected,
    check_generated,
    engine_failure,
    reject_row,
)

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


@dataclass
class _Job:
    parent: dict[str, Any]
    k: int
    attempt: int = 0

    @property
    def request_id(self) -> str:
        return f"{self.parent['pair_id']}#{self.k}"


def _same_text(a: str, b: str) -> bool:
    return " ".join(a.lower().split()).rstrip(".") == " ".join(b.lower().split()).rstrip(".")


class RewriteStage:
    name = "rewrite"

    def __init__(self, config: RewriteConfig, seed: int):
        if config.min_words > config.max_words:
            raise ValueError("rewrite: min_words must not exceed max_words")
        self.config, self.seed = config, seed
        self.prompt = load_prompt("rewrite")

    def fingerprint_parts(self) -> dict[str, Any]:
        return {
            "config": self.config.model_dump(mode="json"),
            "generator": self.config.engine.generator_id,
            "prompt": self.prompt.hash,
            "checks": CHECKS_VERSION,
            "seed": self.seed,
        }

    def _parents(self, table: pa.Table) -> list[dict[str, Any]]:
        wanted = pc.and_(
            pc.is_valid(table.column("caption")),
            pc.is_in(table.column("caption_source"), value_set=pa.array(self.config.sources)),
        )
        return table.filter(pc.fill_null(wanted, False)).select(_PARENT_COLUMNS).to_pylist()

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        table = table.cast(PAIRS_SCHEMA) if table.schema != PAIRS_SCHEMA else table
        cfg = self.config
        per_parent = range(cfg.rewrites_per_caption)
        pending = [_Job(p, k) for p in self._parents(table) for k in per_parent]
        generator = get_generator(cfg.engine, "text") if pending else None
        embedder = get_embedder(cfg.embedder) if pending and cfg.alpha is not None else None
        new_rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        while pending:
            seeds = [derive_seed(self.seed, j.parent["pair_id"], j.k, j.attempt) for j in pending]
            requests = [
                ChatRequest(
                    request_id=job.request_id,
                    prompt=self.prompt.render(caption=job.parent["caption"]),
                    seed=seed,
                )
                for job, seed in zip(pending, seeds, strict=True)
            ]
            results = generator.generate(requests)
            outcomes: list[str | Rejected] = []
            for job, result in zip(pending, results, strict=True):
                if not result.ok:
                    outcomes.append(engine_failure(result))
                    continue
                outcome = check_generated(
                    result.text,
                    min_words=cfg.min_words,
                    max_words=cfg.max_words,
                    truncated=cfg.reject_truncated and result.finish_reason == "length",
                )
                if isinstance(outcome, str) and _same_text(outcome, job.parent["caption"]):
                    outcome = Rejected("unchanged", "the rewrite repeats the caption")
                outcomes.append(outcome)
            scores: list[float | None] = [None] * len(pending)
            if embedder is not None:
                idx = [i for i, o in enumerate(outcomes) if isinstance(o, str)]
                sims = embedder.pair_similarity(
                    [outcomes[i] for i in idx], [pending[i].parent["caption"] for i in idx]
                )
                for i, sim in zip(idx, sims.tolist(), strict=True):
                    scores[i] = sim
                    if sim < cfg.alpha:
                        outcomes[i] = Rejected(
                            "unfaithful", f"cosine {sim:.3f} < alpha {cfg.alpha} to its parent"
                        )
            retry: list[_Job] = []
            for job, result, outcome, seed, score in zip(
                pending, results, outcomes, seeds, scores, strict=True
            ):
                if isinstance(outcome, str):
                    new_rows.append(self._row(job, outcome, generator.generator_id, seed, score))
                    continue
                base = job.parent | {"caption": result.text if result.ok else None}
                base["source"] = f"{job.parent['source']}/rewrite{job.k}"
                detail = f"{outcome.detail} (try {job.attempt + 1}, parent {job.parent['pair_id']})"
                if outcome.reason != "generation_failed" and job.attempt < cfg.max_retries:
                    reason = f"regenerated:{outcome.reason}"
                    rejects.append(reject_row(self.name, reason, detail, base))
                    job.attempt += 1
                    retry.append(job)
                else:
                    rejects.append(reject_row(self.name, outcome.reason, detail, base))
            pending = retry
        return pa.concat_tables([table, pairs_table(new_rows)]), rejects_table(rejects)

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
            "source": f"{parent['source']}/rewrite{job.k}",
            "parent_id": parent["pair_id"],
            "template_id": None,
            "generator": generator_id,
            "prompt_hash": self.prompt.hash,
            "seed": seed,
            "faithfulness": score,
            "edit": parent["edit"],
        }


def build_stage(config: RewriteConfig, seed: int) -> RewriteStage:
    return RewriteStage(config, seed)

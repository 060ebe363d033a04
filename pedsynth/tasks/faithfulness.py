"""The faithfulness stage: LLM-DA's Text Faithfulness Filter for derived captions.

For each row whose ``caption_source`` is in ``sources`` and that has a ``parent_id``: the cosine
similarity of its caption and its parent's caption under a sentence embedder (default the
packaged all-MiniLM-L6-v2) goes into ``faithfulness``; a row below ``alpha`` becomes a reject
row ``unfaithful``. A row that already has a score (the rewrite stage scores its own drafts and
regenerates the unfaithful ones) is not embedded again, only held to this stage's ``alpha``.
A row whose parent is not in the shard cannot be judged and is rejected as ``parent_missing``.
Every other row passes through unchanged.

Regeneration needs the model that wrote the text, so it happens in the stage that owns that
model (rewrite; the edit stage for its re-annotations); this stage is the filter.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pedsynth.engines.embedder import get_embedder
from pedsynth.schemas.base import shaping_dump
from pedsynth.schemas.tables import PAIRS_SCHEMA, REJECT_ROW_FIELDS, reject_row, rejects_table
from pedsynth.schemas.text import FaithfulnessConfig


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
        scores = table.column("faithfulness").to_numpy(zero_copy_only=False).astype(np.float32)
        scores = np.where(pc.is_null(table.column("faithfulness")).to_numpy(False), np.nan, scores)
        captions = table.column("caption").to_pylist()
        parents = table.column("parent_id").to_pylist()
        by_pair = dict(zip(table.column("pair_id").to_pylist(), captions, strict=True))

        missing = np.zeros(n, dtype=bool)
        to_score = []
        for i in np.flatnonzero(in_scope & np.isnan(scores)):
            if parents[i] in by_pair and by_pair[parents[i]] is not None:
                to_score.append(i)
            else:
                missing[i] = True
        if to_score:
            embedder = get_embedder(self.config.embedder)
            sims = embedder.pair_similarity(
                [captions[i] for i in to_score], [by_pair[parents[i]] for i in to_score]
            )
            scores[to_score] = sims
        unfaithful = in_scope & ~missing & (scores < self.config.alpha)

        rejects: list[dict[str, Any]] = []
        info = table.select(list(REJECT_ROW_FIELDS)).to_pylist()
        for i in np.flatnonzero(missing):
            detail = f"parent {parents[i]} is not in this shard"
            rejects.append(reject_row(self.name, "parent_missing", detail, info[i]))
        for i in np.flatnonzero(unfaithful):
            detail = f"cosine {scores[i]:.3f} < alpha {self.config.alpha} to parent {parents[i]}"
            rejects.append(reject_row(self.name, "unfaithful", detail, info[i]))

        keep = ~(missing | unfaithful)
        column = pa.array([None if np.isnan(s) else float(s) for s in scores], type=pa.float32())
        out = table.set_column(table.schema.get_field_index("faithfulness"), "faithfulness", column)
        return out.filter(pa.array(keep)), rejects_table(rejects)


def build_stage(config: FaithfulnessConfig, seed: int) -> FaithfulnessStage:
    return FaithfulnessStage(config, seed)

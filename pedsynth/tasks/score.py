"""The ``score`` stage: CLIP image–text score and per-token noise levels for every pair.

For each pair it fills ``clip_score`` (cosine of the pooled embeddings), ``tokens`` (the caption
as the CLIP tokenizer splits it, start/end/padding excluded, in the one stored form of
``pedsynth.engines.clip_tokens``) and ``token_noise`` (MLLM4Text-ReID:
r_i = 1 − max_j cos(t_i, v_j) over the image's patch tokens, CLS excluded, at the configured
block). The trainer turns r into per-token masking probabilities.

Each distinct image is decoded and encoded once per shard however many captions it has. An
image that cannot be decoded sends its rows to rejects (``image_decode_error``); with
``min_clip_score`` set, pairs below it go to rejects (``low_clip_score``, score in ``detail``).
Uncaptioned rows pass through unscored (the write stage rejects them). Captions longer than the
CLIP context are scored on the part that fits; ``tokens`` then stops where the model stopped.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa

from pedsynth.schemas.base import shaping_dump
from pedsynth.schemas.tables import PAIRS_SCHEMA, REJECT_ROW_FIELDS, reject_row, rejects_table
from pedsynth.schemas.vision import ScoreConfig

log = logging.getLogger(__name__)

STAGE = "score"


class ScoreStage:
    """Shard stage; the CLIP engine is loaded on first call and shared per process."""

    name = STAGE

    def __init__(self, cfg: ScoreConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def fingerprint_parts(self) -> dict[str, Any]:
        from pedsynth.engines.clip import weights_identity

        return {
            "config": shaping_dump(self.cfg),
            "weights": weights_identity(self.cfg.clip),
        }

    @property
    def engine(self):
        from pedsynth.engines.clip import load_clip

        return load_clip(self.cfg.clip)

    def __call__(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        return score_table(table, self.cfg, self.engine)


def build_stage(cfg: ScoreConfig, seed: int = 0) -> ScoreStage:
    return ScoreStage(cfg, seed)


def _reject_rows(table: pa.Table, rows: list[int], reason: str, details: list[str]) -> list[dict]:
    if not rows:
        return []
    picked = table.take(pa.array(rows, pa.int64())).select(list(REJECT_ROW_FIELDS)).to_pylist()
    return [
        reject_row(STAGE, reason, detail, row) for row, detail in zip(picked, details, strict=True)
    ]


def score_table(table: pa.Table, cfg: ScoreConfig, engine: Any) -> tuple[pa.Table, pa.Table]:
    """Score one pairs shard; returns (scored rows, rejects)."""
    from pedsynth.engines.clip import ImageDecodeError

    n = table.num_rows
    image_ids = table.column("image_id").to_pylist()
    captions = table.column("caption").to_pylist()
    first_row: dict[str, int] = {}
    for i, image_id in enumerate(image_ids):
        first_row.setdefault(image_id, i)

    clip_score: list[float | None] = [None] * n
    tokens: list[list[str] | None] = [None] * n
    noise: list[list[float] | None] = [None] * n
    bad_images: dict[str, str] = {}
    truncated = 0

    rows_of: dict[str, list[int]] = {}
    for i, (image_id, caption) in enumerate(zip(image_ids, captions, strict=True)):
        if caption is not None:
            rows_of.setdefault(image_id, []).append(i)
    images = table.column("image")
    order = sorted(rows_of, key=first_row.__getitem__)  # deterministic: first appearance
    bs = engine.cfg.batch_size
    for start in range(0, len(order), bs):
        chunk, pixels = [], []
        for image_id in order[start : start + bs]:
            data = images[first_row[image_id]]["bytes"].as_py()
            try:
                pixels.append(engine.prepare_image(data or b""))
                chunk.append(image_id)
            except ImageDecodeError as exc:
                bad_images[image_id] = str(exc)
        if not chunk:
            continue
        pair_rows = [i for k, image_id in enumerate(chunk) for i in rows_of[image_id]]
        index = [k for k, image_id in enumerate(chunk) for _ in rows_of[image_id]]
        scores = engine.score_pairs(np.stack(pixels), [captions[i] for i in pair_rows], index)
        for j, i in enumerate(pair_rows):
            clip_score[i] = float(scores.clip_score[j])
            tokens[i] = scores.tokens[j]
            noise[i] = scores.token_noise[j].tolist()
        truncated += sum(scores.truncated)
    if truncated:
        log.warning(
            "%d captions were longer than the CLIP context (%d tokens); scored the part that fits",
            truncated,
            engine.context_length,
        )

    reject_rows: list[dict] = []
    dropped = [i for i in range(n) if image_ids[i] in bad_images]
    undecodable = set(dropped)
    reject_rows += _reject_rows(
        table, dropped, "image_decode_error", [bad_images[image_ids[i]] for i in dropped]
    )
    threshold = cfg.min_clip_score
    if threshold is not None:
        low = [
            i
            for i in range(n)
            if clip_score[i] is not None and clip_score[i] < threshold and i not in undecodable
        ]
        reject_rows += _reject_rows(
            table,
            low,
            "low_clip_score",
            [f"clip_score={clip_score[i]:.4f} < min_clip_score={threshold}" for i in low],
        )
        dropped = sorted({*dropped, *low})

    out = _set_columns(table, clip_score, tokens, noise)
    if dropped:
        keep = np.ones(n, dtype=bool)
        keep[dropped] = False
        out = out.filter(pa.array(keep))
    return out, rejects_table(reject_rows)


def _set_columns(
    table: pa.Table,
    clip_score: list[float | None],
    tokens: list[list[str] | None],
    noise: list[list[float] | None],
) -> pa.Table:
    """Replace the three score columns; every other column is kept as it was."""
    values = {
        "clip_score": pa.array(clip_score, PAIRS_SCHEMA.field("clip_score").type),
        "tokens": pa.array(tokens, PAIRS_SCHEMA.field("tokens").type),
        "token_noise": pa.array(noise, PAIRS_SCHEMA.field("token_noise").type),
    }
    for name, column in values.items():
        table = table.set_column(table.schema.get_field_index(name), name, column)
    return table

"""RAR re-ranking through a real (tiny, random-weight) vision-language engine."""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image

from pedsynth.schemas.text import EngineConfig
from pedsynth.train.engine_ranker import LABEL_BAND, contact_sheet, engine_ranker
from pedsynth.train.metrics import rank_metrics, rerank_with_model


def _crop(colour: tuple[int, int, int], size=(40, 100)) -> Image.Image:
    return Image.new("RGB", size, colour)


def test_contact_sheet_places_numbered_crops_side_by_side():
    crops = [_crop((255, 0, 0)), _crop((0, 0, 255), (20, 50))]
    sheet = Image.open(io.BytesIO(contact_sheet(crops, tile_height=100)))
    assert sheet.size == (40 + 40, 100 + LABEL_BAND)  # the second crop scaled to height 100
    assert sheet.getpixel((20, 60))[0] > 200 and sheet.getpixel((60, 60))[2] > 200
    label_band = np.asarray(sheet.crop((0, 0, 80, LABEL_BAND)).convert("L"))
    assert label_band.min() < 128  # the numbers are drawn


def _usable_numbers(answer: str, n: int) -> set[int]:
    """Candidate numbers 1..n that appear in an answer (the test's own reading of it)."""
    return {int(t) for t in re.findall(r"\d+", answer) if 1 <= int(t) <= n}


def test_tiny_engine_reranks_only_within_top_k_and_reports_rates():
    torch.manual_seed(0)
    engine = engine_ranker(EngineConfig(model="tiny-random:llava", max_tokens=12, batch_size=4))
    answers: list[str] = []

    def recording_ranker(query: str, candidates: list) -> str:
        assert len(candidates) == 3  # the top 3, shown to the engine as one sheet
        answers.append(engine(query, candidates))
        return answers[-1]

    gallery = [_crop((40 * i, 200 - 30 * i, 90)) for i in range(6)]
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.1, 0.0, 0.05], [0.0, 0.1, 0.2, 0.8, 0.9, 0.85]])
    reranked, stats = rerank_with_model(
        similarity, ["a man in red", "a woman in blue"], gallery, recording_ranker, top_k=3
    )
    # One engine answer per query; the rates are the shares of those answers that named no
    # candidate (failure) or only some (partial), and no call raised.
    assert len(answers) == 2
    usable = [_usable_numbers(a, 3) for a in answers]
    assert stats["parse_failure_rate"] == sum(not u for u in usable) / 2
    assert stats["partial_rate"] == sum(0 < len(u) < 3 for u in usable) / 2
    assert stats["error_rate"] == 0.0
    for q in range(2):
        before = similarity[q].argsort(descending=True).tolist()
        after = reranked[q].argsort(descending=True).tolist()
        assert sorted(after[:3]) == sorted(before[:3]) and after[3:] == before[3:]
    # Each query's top 3 are all its own identity's images, so any order within the top 3
    # keeps every metric at 100; an item moved in from outside the top 3 would lower them.
    metrics = rank_metrics(reranked, np.array([1, 2]), np.array([1, 1, 1, 2, 2, 2]))
    assert metrics == {"R1": 100.0, "R5": 100.0, "R10": 100.0, "mAP": 100.0, "mINP": 100.0}

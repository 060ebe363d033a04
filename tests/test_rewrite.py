"""The rewrite stage: K rewrites per caption, checks, and the faithfulness filter in its loop."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pytest

from pedsynth.engines.text import GenerationResult
from pedsynth.schemas.tables import PAIRS_SCHEMA, pairs_table
from pedsynth.schemas.text import EngineConfig, RewriteConfig
from pedsynth.tasks import rewrite as rewrite_mod
from pedsynth.tasks.rewrite import RewriteStage
from tests.text_shards import ingest_procedural, torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


TINY_LLM = EngineConfig(model="tiny-random:llama", max_tokens=24, batch_size=32)

PARENT = "A man with short black hair wears a red coat, blue jeans and white sneakers."
FAITHFUL = (
    "The man has short black hair and is dressed in a red coat, blue jeans and white sneakers."
)
DRIFTED = "A woman in a green dress and brown boots carries a pink handbag."


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> pa.Table:
    return ingest_procedural(
        tmp_path_factory.mktemp("rewrite"), identities=4, images_per_identity=2
    )


def _one_parent(caption: str = PARENT) -> pa.Table:
    row = {
        "pair_id": "p1",
        "image_id": "img1",
        "person_id": "id1",
        "split": "train",
        "image": {"bytes": b"\xff\xd8\xff", "path": "a.jpg"},
        "width": 8,
        "height": 16,
        "caption": caption,
        "caption_source": "original",
        "source": "test#0/caption0",
        "generator": "dataset:test",
    }
    return pairs_table([row])


class ScriptedLLM:
    generator_id = "scripted:llm@1"

    def __init__(self, replies: list[str]):
        self.replies, self.calls = list(replies), []

    def generate(self, requests):
        self.calls.append(requests)
        return [
            GenerationResult(r.request_id, self.replies.pop(0), finish_reason="stop")
            for r in requests
        ]


def test_tiny_llm_noise_is_filtered_by_real_minilm(shard):
    cfg = RewriteConfig(
        engine=TINY_LLM, rewrites_per_caption=1, max_retries=1, reject_truncated=False
    )
    out, rejects = RewriteStage(cfg, seed=0)(shard)
    assert out.schema == PAIRS_SCHEMA
    assert out.slice(0, shard.num_rows).equals(shard.cast(PAIRS_SCHEMA))  # inputs pass through
    rewrites = out.filter(pc.equal(out["caption_source"], "rewrite")).to_pylist()
    finals = [r for r in rejects.to_pylist() if not r["reason"].startswith("regenerated:")]
    assert len(rewrites) + len(finals) == shard.num_rows  # every slot: one row or one reject
    # Random-weight text is noise: MiniLM rejects (nearly) all of it.
    unfaithful = [r for r in finals if r["reason"] == "unfaithful"]
    assert len(unfaithful) >= 0.5 * shard.num_rows
    assert all(r["faithfulness"] >= 0.6 for r in rewrites)
    parents = dict(zip(shard["pair_id"].to_pylist(), shard["caption"].to_pylist(), strict=True))
    for r in rewrites:
        assert (
            r["parent_id"] in parents and r["generator"] == "transformers:tiny-random:llama@default"
        )


def test_unfaithful_drafts_are_regenerated_then_kept_or_rejected(monkeypatch):
    table = _one_parent()
    # two slots: k=0: faithful at once; k=1: drifted, then faithful
    fake = ScriptedLLM([FAITHFUL, DRIFTED, FAITHFUL + " He walks."])
    monkeypatch.setattr(rewrite_mod, "get_generator", lambda cfg, kind: fake)
    cfg = RewriteConfig(engine=TINY_LLM, rewrites_per_caption=2, max_retries=2)
    out, rejects = RewriteStage(cfg, seed=0)(table)
    assert [len(c) for c in fake.calls] == [2, 1]
    rows = out.filter(pc.equal(out["caption_source"], "rewrite")).to_pylist()
    assert sorted(r["caption"] for r in rows) == sorted([FAITHFUL, FAITHFUL + " He walks."])
    assert all(r["faithfulness"] > 0.8 and r["parent_id"] == "p1" for r in rows)
    assert all(r["image"] == table["image"][0].as_py() for r in rows)
    (draft,) = rejects.to_pylist()
    assert draft["reason"] == "regenerated:unfaithful" and draft["caption"] == DRIFTED
    assert "< alpha 0.6" in draft["detail"]


def test_a_slot_that_stays_unfaithful_is_rejected_after_r_retries(monkeypatch):
    fake = ScriptedLLM([DRIFTED, PARENT, DRIFTED])  # drifted, unchanged copy, drifted
    monkeypatch.setattr(rewrite_mod, "get_generator", lambda cfg, kind: fake)
    cfg = RewriteConfig(engine=TINY_LLM, rewrites_per_caption=1, max_retries=2)
    out, rejects = RewriteStage(cfg, seed=0)(_one_parent())
    assert out.num_rows == 1
    assert rejects["reason"].to_pylist() == [
        "regenerated:unfaithful",
        "regenerated:unchanged",
        "unfaithful",
    ]
    assert len({c[0].seed for c in fake.calls}) == 3  # each try sampled with its own seed


def test_without_alpha_no_embedder_and_no_score(monkeypatch):
    fake = ScriptedLLM([DRIFTED])
    monkeypatch.setattr(rewrite_mod, "get_generator", lambda cfg, kind: fake)
    monkeypatch.setattr(rewrite_mod, "get_embedder", lambda cfg: pytest.fail("no embedder"))
    cfg = RewriteConfig(engine=TINY_LLM, alpha=None, attributes=False)
    out, rejects = RewriteStage(cfg, seed=0)(_one_parent())
    (row,) = out.filter(pc.equal(out["caption_source"], "rewrite")).to_pylist()
    assert row["caption"] == DRIFTED and row["faithfulness"] is None and rejects.num_rows == 0
    assert row["fact_conflicts"] is None


def test_only_configured_sources_are_rewritten(monkeypatch):
    fake = ScriptedLLM([])
    monkeypatch.setattr(rewrite_mod, "get_generator", lambda cfg, kind: fake)
    cfg = RewriteConfig(engine=TINY_LLM, sources=["mllm"])
    out, rejects = RewriteStage(cfg, seed=0)(_one_parent())
    assert out.num_rows == 1 and rejects.num_rows == 0 and fake.calls == []


def test_an_engine_failure_is_a_final_reject_not_regenerated(tmp_path):
    """A request the engine cannot answer (HTTP 500 after the client's own retries) ends as one
    ``generation_failed`` row; the stage does not ask again although it has retries left."""
    from pedsynth.schemas.text import OpenAIOptions
    from tests.fake_openai_server import FakeOpenAIServer, TinyChatModel

    shard = ingest_procedural(tmp_path, identities=2, images_per_identity=1)
    parents = shard["pair_id"].to_pylist()
    doomed = f"{parents[0]}#0"
    server = FakeOpenAIServer(TinyChatModel(max_new_tokens=6), faults_by_request={doomed: "500"})
    url = server.start()
    try:
        options = OpenAIOptions(base_url=url, api_key_env=None, retries=1, backoff_s=0.01)
        engine = EngineConfig(backend="openai", model="tiny", max_tokens=8, openai=options)
        cfg = RewriteConfig(engine=engine, min_words=1, max_retries=2, alpha=None)
        out, rejects = RewriteStage(cfg, seed=0)(shard)
    finally:
        server.stop()

    failed = [r for r in rejects.to_pylist() if r["pair_id"] == parents[0]]
    assert [r["reason"] for r in failed] == ["generation_failed"]
    assert failed[0]["detail"].startswith("server_error: HTTP 500 (after 2 attempts)")
    assert failed[0]["caption"] is None and failed[0]["stage"] == "rewrite"
    assert failed[0]["source"].endswith("/rewrite0")
    # One generate call for it: the client's two attempts, and no third from the stage.
    assert [r.attempt for r in server.by_request()[doomed]] == [0, 1]
    rewrites = out.filter(pc.equal(out["caption_source"], "rewrite"))
    assert parents[0] not in rewrites["parent_id"].to_pylist()
    finals = [r for r in rejects.to_pylist() if not r["reason"].startswith("regenerated:")]
    assert rewrites.num_rows + len(finals) == len(parents)  # every other slot ended once too

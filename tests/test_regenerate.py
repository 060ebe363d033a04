"""The shared regenerate loop: rounds, fresh seeds, per-draft and batch checks, reject rows."""

from __future__ import annotations

import pytest

from pedsynth.engines.text import ChatRequest, GenerationResult
from pedsynth.tasks.regenerate import (
    BatchCheck,
    Rejected,
    Scored,
    Slot,
    regenerate,
)


class Scripted:
    """Replies per request id, one per attempt; ``None`` is an engine failure."""

    generator_id = "scripted:llm@1"

    def __init__(self, script: dict[str, list[str | None]]):
        self.script = {k: list(v) for k, v in script.items()}
        self.rounds: list[list[ChatRequest]] = []

    def generate(self, requests):
        self.rounds.append(list(requests))
        out = []
        for r in requests:
            reply = self.script[r.request_id].pop(0)
            if reply is None:
                out.append(GenerationResult(r.request_id, None, error="timeout: no reply"))
            else:
                out.append(GenerationResult(r.request_id, reply, finish_reason="stop"))
        return out


def _slots(*names: str) -> list[Slot[str]]:
    return [Slot(name, ChatRequest(name, f"prompt {name}"), seed_parts=(name,)) for name in names]


def _describe(draft):
    return {"source": f"src/{draft.payload}", "pair_id": draft.payload}, f"slot {draft.payload}"


def _no_x(draft, text):
    return Rejected("has_x", f"{text!r} has an x") if "x" in text else text.upper()


def test_rounds_retry_only_failed_drafts_with_fresh_seeds_and_write_each_reason():
    engine = Scripted({"a": ["fine"], "b": ["x1", "x2", "good"], "c": ["x", "x", "x"]})
    done = regenerate(
        _slots("a", "b", "c"),
        engine,
        stage="st",
        seed=5,
        max_retries=2,
        checks=[_no_x],
        describe=_describe,
    )
    assert [[r.request_id for r in rnd] for rnd in engine.rounds] == [
        ["a", "b", "c"],
        ["b", "c"],
        ["b", "c"],
    ]
    seeds_of_b = [r.seed for rnd in engine.rounds for r in rnd if r.request_id == "b"]
    assert len(set(seeds_of_b)) == 3 and all(isinstance(s, int) for s in seeds_of_b)
    assert [(k.draft.payload, k.text, k.draft.attempt) for k in done.kept] == [
        ("a", "FINE", 0),
        ("b", "GOOD", 2),
    ]
    assert done.kept[1].draft.seed == seeds_of_b[2]  # the accepted draft's own seed
    assert [(r["pair_id"], r["reason"]) for r in done.rejects] == [
        ("b", "regenerated:has_x"),
        ("c", "regenerated:has_x"),
        ("b", "regenerated:has_x"),
        ("c", "regenerated:has_x"),
        ("c", "has_x"),
    ]
    assert done.rejects[-1]["detail"] == "'x' has an x (try 3, slot c)"
    assert {r["stage"] for r in done.rejects} == {"st"}
    assert done.rejects[0]["source"] == "src/b"


def test_the_same_slots_and_seed_ask_with_the_same_seeds():
    def run(seed: int) -> list[int]:
        engine = Scripted({"a": ["x", "ok"]})
        regenerate(
            _slots("a"),
            engine,
            stage="st",
            seed=seed,
            max_retries=1,
            checks=[_no_x],
            describe=_describe,
        )
        return [rnd[0].seed for rnd in engine.rounds]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_a_batch_check_sees_every_passing_draft_of_a_round_at_once_and_scores_them():
    calls: list[list[tuple[str, str]]] = []

    def longer_than_three(drafts, texts):
        calls.append([(d.payload, t) for d, t in zip(drafts, texts, strict=True)])
        return [
            Scored(t, float(len(t))) if len(t) > 3 else Rejected("short", f"{len(t)} letters")
            for t in texts
        ]

    engine = Scripted({"a": ["long one"], "b": ["x", "xx"], "c": ["ab", "abcd"], "d": ["good"]})
    done = regenerate(
        _slots("a", "b", "c", "d"),
        engine,
        stage="st",
        seed=0,
        max_retries=1,
        checks=[_no_x, BatchCheck(longer_than_three)],
        describe=_describe,
    )
    # "b" fails the per-draft check in both rounds, so the batch check never sees it.
    assert calls == [
        [("a", "LONG ONE"), ("c", "AB"), ("d", "GOOD")],
        [("c", "ABCD")],
    ]
    assert {k.draft.payload: (k.text, k.score) for k in done.kept} == {
        "a": ("LONG ONE", 8.0),
        "d": ("GOOD", 4.0),
        "c": ("ABCD", 4.0),
    }
    reasons = sorted((r["pair_id"], r["reason"]) for r in done.rejects)
    assert reasons == [("b", "has_x"), ("b", "regenerated:has_x"), ("c", "regenerated:short")]


def test_engine_failures_are_final_at_once():
    engine = Scripted({"a": [None], "b": ["x", "fine"]})
    done = regenerate(
        _slots("a", "b"),
        engine,
        stage="st",
        seed=0,
        max_retries=3,
        checks=[_no_x],
        describe=_describe,
    )
    assert [len(rnd) for rnd in engine.rounds] == [2, 1]
    by_slot = {r["pair_id"]: r for r in done.rejects}
    assert by_slot["a"]["reason"] == "generation_failed"
    assert by_slot["a"]["detail"] == "timeout: no reply (try 1, slot a)"
    assert by_slot["b"]["reason"] == "regenerated:has_x"


def test_a_batch_check_must_answer_every_draft():
    engine = Scripted({"a": ["one"], "b": ["two"]})
    with pytest.raises(ValueError, match="verdicts"):
        regenerate(
            _slots("a", "b"),
            engine,
            stage="st",
            seed=0,
            max_retries=0,
            checks=[BatchCheck(lambda drafts, texts: list(texts)[:1])],
            describe=_describe,
        )


class Refusing(Scripted):
    """An engine that refuses some requests for what they are (the prompt is too long)."""

    def generate(self, requests):
        self.rounds.append(list(requests))
        return [
            GenerationResult(r.request_id, None, error="prompt_too_long: 900 tokens > 512")
            if r.request_id == "long"
            else GenerationResult(r.request_id, None, error="server_error: HTTP 500")
            for r in requests
        ]


def test_a_request_the_engine_cannot_serve_is_a_final_reject_not_a_failure():
    engine = Refusing({})
    done = regenerate(
        _slots("long", "unlucky"),
        engine,
        stage="st",
        seed=0,
        max_retries=3,
        checks=[_no_x],
        describe=_describe,
    )
    assert len(engine.rounds) == 1  # neither is asked again in this run
    by_slot = {r["pair_id"]: r["reason"] for r in done.rejects}
    assert by_slot == {"long": "prompt_too_long", "unlucky": "generation_failed"}

"""The openai backend over real HTTP against a tiny-model server on 127.0.0.1, with faults."""

from __future__ import annotations

import io
from contextlib import contextmanager

import pytest
from PIL import Image

from pedsynth.engines.openai_backend import OpenAIGenerator
from pedsynth.engines.text import ChatRequest, EngineError
from pedsynth.schemas.text import EngineConfig, OpenAIOptions
from tests.fake_openai_server import FakeOpenAIServer, TinyChatModel
from tests.text_shards import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tiny_chat() -> TinyChatModel:
    return TinyChatModel(max_new_tokens=4)


@contextmanager
def running(model: TinyChatModel, **options):
    server = FakeOpenAIServer(model, **options)
    url = server.start()
    try:
        yield server, url
    finally:
        server.stop()


def engine(url: str, kind: str = "text", **opts) -> OpenAIGenerator:
    options = {"base_url": url, "api_key_env": None, "backoff_s": 0.02, "max_backoff_s": 0.3}
    cfg = EngineConfig(
        backend="openai", model="tiny", max_tokens=6, openai=OpenAIOptions(**options | opts)
    )
    return OpenAIGenerator(cfg, kind=kind)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 32), (200, 30, 30)).save(buf, format="JPEG")
    return buf.getvalue()


def test_every_request_ends_once_despite_faults(tiny_chat):
    faults = {2: "429", 5: "500", 7: "hang", 9: "malformed", 11: "empty"}
    with running(
        tiny_chat,
        faults_by_arrival=faults,
        faults_by_request={"r-poison": "500"},
        retry_after_s=0.2,
        hang_s=3.0,
    ) as (server, url):
        gen = engine(url, max_concurrency=4, timeout_s=1.5, retries=3)
        requests = [ChatRequest(f"r{i}", f"describe person {i}", seed=i) for i in range(30)]
        requests.append(ChatRequest("r-poison", "this one always fails"))
        results = gen.generate(requests)

    # One result per request, in order: none lost, none duplicated.
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    by_id = server.by_request()
    ok = [r for r in results if r.ok]
    assert len(ok) == 30
    for result in ok:
        # The text is a reply the server produced for this very request. (A reply can reach
        # the server's side twice only when the client timed out on the first one.)
        served = {rec.reply for rec in by_id[result.request_id] if rec.outcome == "ok"}
        assert result.text in served
    poison = results[-1]
    assert not poison.ok and poison.error.startswith("server_error: HTTP 500")
    assert "after 4 attempts" in poison.error
    assert [rec.attempt for rec in by_id["r-poison"]] == [0, 1, 2, 3]

    # Each planned fault hit one request, which was retried and then succeeded.
    outcomes = {rec.arrival: rec.outcome for rec in server.records}
    assert {n: outcomes[n] for n in faults} == faults
    for n in faults:
        rid = server.records[n - 1].request_id
        assert rid != "r-poison"
        assert [rec.outcome for rec in by_id[rid]][-1] == "ok"
    # The 429 was retried no sooner than its Retry-After.
    throttled = server.records[1]
    retry = next(r for r in by_id[throttled.request_id] if r.arrival > throttled.arrival)
    assert retry.started - throttled.started >= 0.2
    stats = gen.last_stats
    assert stats.requests == 31 and stats.failed == 1
    assert stats.attempts == len(server.records) and stats.peak_in_flight <= 4


def test_concurrency_backs_off_on_429_and_recovers(tiny_chat):
    # The server throttles (429) whenever more than 3 requests are in flight, for its first
    # 40 arrivals; after that it takes everything.
    with running(tiny_chat, capacity=3, capacity_until=40, latency_s=0.03, retry_after_s=0.05) as (
        server,
        url,
    ):
        gen = engine(url, max_concurrency=12, retries=10, timeout_s=5)
        requests = [ChatRequest(f"q{i}", f"caption {i}") for i in range(100)]
        results = gen.generate(requests)

    assert all(r.ok for r in results) and len({r.request_id for r in results}) == 100
    limits = [limit for _, limit in gen.last_stats.limit_history]
    assert limits[0] == 12
    low = min(limits)
    assert low <= 6, limits  # backed off at least by half
    assert limits[-1] > low, limits  # and recovered after successes
    throttled = [r for r in server.records if r.outcome == "throttled"]
    assert throttled and all(r.arrival <= 40 for r in throttled)
    late = [r.in_flight for r in server.records if r.arrival > 70]
    assert max(late) > 3  # concurrency above the old capacity once the server allows it


def test_images_travel_as_data_urls_and_bad_images_are_rejected(tiny_chat):
    with running(tiny_chat) as (server, url):
        gen = engine(url, kind="vision")
        results = gen.generate(
            [
                ChatRequest("good", "describe", image=_jpeg()),
                ChatRequest("junk", "describe", image=b"not an image at all"),
                ChatRequest("missing", "describe"),
            ]
        )
    assert results[0].ok and server.by_request()["good"][0].had_image
    assert results[1].error.startswith("bad_image:") and "junk" not in server.by_request()
    assert results[2].error.startswith("bad_request:")


def test_api_key_comes_from_the_named_variable_and_is_never_shown(tiny_chat, monkeypatch):
    secret = "sk-test-0123456789"
    monkeypatch.setenv("PEDSYNTH_TEST_KEY", secret)
    with running(tiny_chat, api_key=secret) as (server, url):
        gen = engine(url, api_key_env="PEDSYNTH_TEST_KEY")
        assert gen.generate([ChatRequest("a", "hello")])[0].ok
        assert server.records[0].authorization == f"Bearer {secret}"
        monkeypatch.setenv("PEDSYNTH_TEST_KEY", "wrong")
        denied = engine(url, api_key_env="PEDSYNTH_TEST_KEY").generate([ChatRequest("b", "x")])
    assert denied[0].error.startswith("http_error: HTTP 401")  # 4xx other than 429: no retry
    assert len(server.by_request()["b"]) == 1
    shown = repr(gen) + gen.generator_id + gen.config.model_dump_json() + str(denied)
    assert secret not in shown and "wrong" not in str(denied)
    monkeypatch.delenv("PEDSYNTH_TEST_KEY")
    with pytest.raises(EngineError, match="PEDSYNTH_TEST_KEY"):
        engine("http://127.0.0.1:9/v1", api_key_env="PEDSYNTH_TEST_KEY")


def test_request_body_carries_sampling_seed_and_schema():
    gen = engine("http://127.0.0.1:9/v1")
    body = gen.request_body(
        ChatRequest("x", "hi", system="be brief", seed=7, json_schema={"type": "object"})
    )
    assert body["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
    ]
    assert (body["temperature"], body["top_p"], body["max_tokens"], body["seed"]) == (
        0.7,
        0.9,
        6,
        7,
    )
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_unreachable_server_becomes_a_failed_result_not_an_exception():
    gen = engine("http://127.0.0.1:9/v1", retries=1, timeout_s=1)
    (result,) = gen.generate([ChatRequest("x", "hi")])
    assert result.error.startswith("connection_error") and "after 2 attempts" in result.error


def test_caption_stage_over_http_turns_a_failing_request_into_a_reject_row(
    tiny_chat, tmp_path, monkeypatch
):
    import pyarrow.compute as pc

    from pedsynth.schemas.text import CaptionConfig
    from pedsynth.tasks.caption import CaptionStage
    from tests.text_shards import ingest_procedural

    shard = ingest_procedural(tmp_path, identities=3, images_per_identity=1)
    image_ids = shard["image_id"].unique().to_pylist()
    with running(tiny_chat, faults_by_request={f"{image_ids[0]}#0": "500"}) as (server, url):
        options = {"base_url": url, "api_key_env": None, "retries": 1, "backoff_s": 0.01}
        engine_cfg = EngineConfig(backend="openai", model="tiny", openai=OpenAIOptions(**options))
        cfg = CaptionConfig(engine=engine_cfg, captions_per_image=1, min_words=1, max_retries=0)
        out, rejects = CaptionStage(cfg, seed=0)(shard)
    failed = rejects.filter(pc.equal(rejects["reason"], "generation_failed")).to_pylist()
    assert [r["image_id"] for r in failed] == [image_ids[0]]
    assert failed[0]["detail"].startswith("server_error: HTTP 500")
    assert {r.request_id for r in server.records} == {f"{i}#0" for i in image_ids}
    assert all(r.had_image for r in server.records if r.outcome == "ok")  # data URLs decoded
    mllm = out.filter(pc.equal(out["caption_source"], "mllm"))
    others = rejects.filter(pc.not_equal(rejects["reason"], "generation_failed"))
    assert mllm.num_rows + others.num_rows == len(image_ids) - 1
    assert all(g == "openai:tiny@default" for g in mllm["generator"].to_pylist())


def test_waits_follow_backoff_settings_not_the_sdk_defaults(tiny_chat):
    # Left to itself the SDK would wait about 0.5 s, 1 s and 2 s between p's attempts, and the
    # full 5 s Retry-After between q's; backoff_s and max_backoff_s set every wait instead.
    faults = {"p": "500", "q": "429"}
    with running(tiny_chat, faults_by_request=faults, retry_after_s=5) as (server, url):
        gen = engine(url, retries=3, backoff_s=0.01, max_backoff_s=0.25, timeout_s=5)
        p, q = gen.generate([ChatRequest("p", "x"), ChatRequest("q", "y")])
    assert p.error == "server_error: HTTP 500 (after 4 attempts)"
    assert q.error == "rate_limited: HTTP 429 (after 4 attempts)"
    by_id = server.by_request()
    assert [r.attempt for r in by_id["p"]] == [0, 1, 2, 3]
    assert by_id["p"][-1].started - by_id["p"][0].started < 1.0
    starts = [r.started for r in by_id["q"]]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert len(gaps) == 3 and all(0.25 <= g < 2.0 for g in gaps), gaps  # Retry-After, capped


def test_replies_without_content_are_retried_within_the_same_budget(tiny_chat):
    faults = {"m": "malformed", "e": "empty"}
    with running(tiny_chat, faults_by_request=faults) as (server, url):
        gen = engine(url, retries=2)
        malformed, empty, fine = gen.generate(
            [ChatRequest("m", "x"), ChatRequest("e", "y"), ChatRequest("f", "z")]
        )
    assert malformed.error.startswith("malformed_response:")
    assert malformed.error.endswith("(after 3 attempts)")
    assert empty.error == "empty_choice: the reply had no choice with content (after 3 attempts)"
    assert fine.ok
    by_id = server.by_request()
    assert [r.attempt for r in by_id["m"]] == [0, 1, 2] == [r.attempt for r in by_id["e"]]
    assert gen.last_stats.attempts == 7 and gen.last_stats.retried == 4


def test_adaptive_limit_halves_once_per_overload_and_grows_back():
    import asyncio

    from pedsynth.engines.openai_backend import AdaptiveLimit

    async def scenario() -> list[int]:
        limit = AdaptiveLimit(8, maximum=8)
        seen = [limit.limit]
        admitted = [await limit.acquire() for _ in range(8)]
        for epoch in admitted:  # eight 429s from one overload
            await limit.throttled(epoch)
        seen.append(limit.limit)
        for _ in admitted:
            await limit.release(ok=False)
        late = await limit.acquire()  # admitted under the halved limit: a new overload
        await limit.throttled(late)
        await limit.release(ok=False)
        seen.append(limit.limit)
        for _ in range(2):  # as many successes in a row as the limit: one more slot
            await limit.acquire()
            await limit.release(ok=True)
        seen.append(limit.limit)
        return seen

    assert asyncio.run(scenario()) == [8, 4, 2, 3]


def test_a_401_that_echoes_the_key_leaves_it_out_of_results_and_logs(
    tiny_chat, monkeypatch, caplog
):
    import json
    import logging
    import urllib.error
    import urllib.request

    secret = "sk-live-Echo0123456789abcdefXYZ"
    monkeypatch.setenv("PEDSYNTH_ECHO_KEY", secret)
    with running(tiny_chat, echo_authorization=True) as (server, url):
        gen = engine(url, api_key_env="PEDSYNTH_ECHO_KEY", retries=1)
        with caplog.at_level(logging.DEBUG):
            results = gen.generate([ChatRequest(f"e{i}", "hello") for i in range(3)])
            # What the proxy sends back, copied raw into a log line as any caller might.
            call = urllib.request.Request(
                f"{url}/chat/completions", data=b"{}", headers={"Authorization": f"Bearer {secret}"}
            )
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(call, timeout=5)
            raw = refused.value.read().decode()
            logging.getLogger("pedsynth.tests.echo").warning("proxy said %s", raw)
    # The key went out and came back in every body: redaction is what keeps it from the output.
    assert all(r.authorization == f"Bearer {secret}" for r in server.records)
    assert secret in json.loads(raw)["error"]["message"]
    for result in results:
        assert result.error.startswith("http_error: HTTP 401: ")
        assert "invalid credentials in header 'Authorization: [redacted]'" in result.error
        assert secret not in result.error and "[redacted]" in result.error
    assert len(server.records) == 4  # a 401 is final: one attempt per request, plus ours
    lines = [r.getMessage() for r in caplog.records] + caplog.text.splitlines()
    assert any("3 of 3 requests failed" in line and "HTTP 401" in line for line in lines)
    assert any(line.startswith("proxy said {") for line in lines)
    assert not [line for line in lines if secret in line]


def test_a_loopback_server_without_a_named_key_gets_none_or_openai_api_key(tiny_chat, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with running(tiny_chat) as (server, url):
        cfg = EngineConfig(backend="openai", model="tiny", max_tokens=4, openai={"base_url": url})
        assert OpenAIGenerator(cfg, kind="text").generate([ChatRequest("a", "hi")])[0].ok
        monkeypatch.setenv("OPENAI_API_KEY", "sk-local-0123456789")
        assert OpenAIGenerator(cfg, kind="text").generate([ChatRequest("b", "hi")])[0].ok
    assert [r.authorization for r in server.records] == [
        "Bearer none",
        "Bearer sk-local-0123456789",
    ]


def test_token_counts_are_what_the_server_reports_in_usage(tiny_chat):
    prompts = ["a", "a woman in a long red coat and black jeans walking", "man with a bag"]
    requests = [ChatRequest(f"u{i}", p, seed=i) for i, p in enumerate(prompts)]
    with running(tiny_chat, faults_by_request={"u-bad": "500"}) as (server, url):
        results = engine(url, retries=0).generate([*requests, ChatRequest("u-bad", "x")])
    served = {rec.request_id: rec.usage for rec in server.records if rec.outcome == "ok"}
    for request, result in zip(requests, results[:3], strict=True):
        # The server counted with its tokenizer; the templated prompt's length, counted here,
        # is the same number, and the generated tokens are within the server's cap.
        templated = tiny_chat.tokenizer.apply_chat_template(
            [{"role": "user", "content": request.prompt}], add_generation_prompt=True
        )
        templated = templated["input_ids"] if hasattr(templated, "keys") else templated
        assert result.prompt_tokens == served[request.request_id]["prompt_tokens"]
        assert result.prompt_tokens == len(templated)
        assert result.completion_tokens == served[request.request_id]["completion_tokens"]
        assert 1 <= result.completion_tokens <= 4
    assert len({r.prompt_tokens for r in results[:3]}) == 3
    failed = results[-1]
    assert not failed.ok and failed.prompt_tokens is None and failed.completion_tokens is None


def test_a_reply_without_usage_leaves_the_counts_unknown(tiny_chat):
    with running(tiny_chat, send_usage=False) as (_, url):
        (result,) = engine(url).generate([ChatRequest("n", "describe")])
    assert result.ok and result.prompt_tokens is None and result.completion_tokens is None

"""The vllm backend without a GPU: what it hands to ``vllm.LLM`` and ``SamplingParams``.

vLLM itself needs a GPU here, so a stand-in ``vllm`` module records the calls. What is checked
is our side of the contract: engine kwargs from the config, one ``SamplingParams`` per request
with its seed, the whole batch in a single ``LLM.chat`` call, images as data URLs, results in
request order, bad requests answered without reaching vLLM; and per-row failure: prompts over
the engine's limit, requests that make ``LLM.chat`` raise, and an engine that dies.

The stand-in behaves like vLLM where it matters here: its tokenizer counts one token per word
plus one per message, images cost ``IMAGE_TOKENS`` more, ``chat`` refuses a whole call when one
prompt is over ``max_model_len`` (vLLM's message) or contains ``POISON``, and an engine told to
die raises ``EngineDeadError`` on every call from its first one on.
"""

from __future__ import annotations

import base64
import io
import math
import sys
import types
from dataclasses import dataclass

import pytest
from PIL import Image
from pydantic import ValidationError

from pedsynth.engines import vllm_backend
from pedsynth.engines.cache import load_counts
from pedsynth.engines.text import (
    ChatRequest,
    EngineError,
    _engine_key,
    clear_generators,
    get_generator,
)
from pedsynth.schemas.text import RESERVED_ENGINE_ARGS, EngineConfig, VLLMOptions


@dataclass
class _Completion:
    text: str
    finish_reason: str = "stop"
    token_ids: tuple = ()  # one per word of the text, as the stand-in's tokenizer counts


@dataclass
class _Output:
    outputs: list
    prompt_token_ids: list | None = None


IMAGE_TOKENS = 40  # what one image costs in the stand-in, unknown to the backend
DEFAULT_LIMIT = 4096  # the stand-in's max_model_len when the config sets none


def _words(content) -> int:
    if isinstance(content, str):
        return len(content.split())
    return sum(len(p["text"].split()) if p["type"] == "text" else IMAGE_TOKENS for p in content)


def _fake_vllm(calls: dict) -> types.ModuleType:
    """A ``vllm`` module; ``calls["die"]`` lists, per engine built, whether it dies."""
    mod = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")
    exceptions = types.ModuleType("vllm.v1.engine.exceptions")

    class EngineDeadError(Exception):
        def __init__(self, *args):
            super().__init__("EngineCore encountered an issue. See stack trace (above).", *args)

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            assert tokenize and add_generation_prompt
            return list(range(sum(_words(m["content"]) + 1 for m in messages)))

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            calls["built"] = calls.get("built", 0) + 1
            plan = calls.setdefault("die", [])
            self.dies = plan.pop(0) if plan else False
            limit = kwargs.get("max_model_len", DEFAULT_LIMIT)
            self.llm_engine = types.SimpleNamespace(
                model_config=types.SimpleNamespace(max_model_len=limit)
            )

        def get_tokenizer(self):
            return Tokenizer()

        def chat(self, conversations, sampling_params=None, use_tqdm=True):
            calls.setdefault("chat", []).append((conversations, sampling_params))
            if self.dies:
                raise EngineDeadError()
            limit = self.llm_engine.model_config.max_model_len
            for conv in conversations:
                n = sum(_words(m["content"]) + 1 for m in conv)
                if n > limit:
                    raise ValueError(
                        f"The decoder prompt (length {n}) is longer than the maximum model "
                        f"length of {limit}. Make sure that `max_model_len` is no smaller "
                        "than the number of text tokens plus multimodal tokens."
                    )
                if "POISON" in str(conv[-1]["content"]):
                    raise RuntimeError("poisoned\nprompt")
            outputs = []
            for i, conv in enumerate(conversations):
                text = f"reply {i}: {_text(conv)}"
                prompt_ids = list(range(sum(_words(m["content"]) + 1 for m in conv)))
                completion = _Completion(text, token_ids=tuple(range(len(text.split()))))
                outputs.append(_Output([completion], prompt_token_ids=prompt_ids))
            return outputs

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    sampling.StructuredOutputsParams = StructuredOutputsParams
    exceptions.EngineDeadError = EngineDeadError
    mod.sampling_params, mod.EngineDeadError = sampling, EngineDeadError
    return mod


def _text(conv) -> str:
    content = conv[-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


@pytest.fixture
def calls(monkeypatch) -> dict:
    recorded: dict = {}
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(recorded))
    return recorded


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), "blue").save(buf, format="JPEG")
    return buf.getvalue()


def _config(**kw) -> EngineConfig:
    base = {
        "backend": "vllm",
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "revision": "abc123",
        "temperature": 0.8,
        "top_p": 0.95,
        "max_tokens": 120,
        "vllm": VLLMOptions(
            tensor_parallel_size=2, max_model_len=4096, limit_mm_per_prompt={"image": 1}
        ),
    }
    return EngineConfig(**base | kw)


def test_engine_kwargs_pass_through(calls):
    vllm_backend.VLLMGenerator(_config(), kind="vision")
    assert calls["llm"] == {
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "revision": "abc123",
        "trust_remote_code": False,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.9,
        "dtype": "auto",
        "enforce_eager": False,
        "max_model_len": 4096,
        "limit_mm_per_prompt": {"image": 1},
    }
    vllm_backend.VLLMGenerator(_config(vllm=VLLMOptions()), kind="text")
    assert "max_model_len" not in calls["llm"] and "limit_mm_per_prompt" not in calls["llm"]


def test_whole_batch_in_one_chat_call_with_per_request_seeds(calls):
    gen = vllm_backend.VLLMGenerator(_config(), kind="vision")
    image = _jpeg()
    requests = [
        ChatRequest("a", "describe", image=image, seed=11),
        ChatRequest("bad", "describe", image=b"\xff\xd8\xff broken jpeg"),
        ChatRequest("b", "describe", image=image, seed=12, json_schema={"type": "object"}),
        ChatRequest("none", "describe"),
    ]
    results = gen.generate(requests)
    assert len(calls["chat"]) == 1
    conversations, params = calls["chat"][0]
    assert len(conversations) == 2 and len(params) == 2  # the two bad requests never went in
    assert [p.kwargs["seed"] for p in params] == [11, 12]
    assert {k: params[0].kwargs[k] for k in ("temperature", "top_p", "max_tokens")} == {
        "temperature": 0.8,
        "top_p": 0.95,
        "max_tokens": 120,
    }
    assert "structured_outputs" not in params[0].kwargs
    assert params[1].kwargs["structured_outputs"].json == {"type": "object"}
    image_part, text_part = conversations[0][0]["content"]
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/jpeg;base64,") and base64.b64decode(url[23:]) == image
    assert text_part == {"type": "text", "text": "describe"}
    assert [r.request_id for r in results] == ["a", "bad", "b", "none"]
    assert (results[0].text, results[2].text) == ("reply 0: describe", "reply 1: describe")
    assert results[1].error.startswith("bad_image") and results[3].error.startswith("bad_request")


def test_missing_vllm_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(EngineError, match=r"pedsynth\[gpu\]"):
        vllm_backend.VLLMGenerator(_config(), kind="text")


def test_images_a_data_url_cannot_carry_are_refused_before_vllm(calls):
    buf = io.BytesIO()
    Image.new("RGB", (8, 16), "green").save(buf, format="BMP")
    gen = vllm_backend.VLLMGenerator(_config(), kind="vision")
    bmp, jpeg = gen.generate(
        [ChatRequest("bmp", "describe", image=buf.getvalue()), ChatRequest("j", "d", image=_jpeg())]
    )
    assert bmp.error == "bad_image: BMP image; send JPEG, PNG, WebP, GIF" and jpeg.ok
    ((conversations, _),) = calls["chat"]
    assert len(conversations) == 1  # only the JPEG went in


def _words_prompt(n: int) -> str:
    return " ".join(["word"] * n)


def test_overlong_prompt_is_a_failed_result_and_never_reaches_vllm(calls):
    gen = vllm_backend.VLLMGenerator(_config(vllm=VLLMOptions(max_model_len=32)), kind="text")
    requests = [
        ChatRequest("short", "a red coat"),
        ChatRequest("long", _words_prompt(40)),  # 40 words + 1 message = 41 tokens
        ChatRequest("edge", _words_prompt(30), system="be brief"),  # 30+1 + 2+1 = 34
        ChatRequest("fits", _words_prompt(31)),  # 32 tokens: exactly the limit
    ]
    short, long, edge, fits = gen.generate(requests)
    assert (short.text, fits.text) == ("reply 0: a red coat", f"reply 1: {_words_prompt(31)}")
    assert long.error == "prompt_too_long: 41 tokens > 32"
    assert edge.error == "prompt_too_long: 34 tokens > 32"
    ((conversations, _),) = calls["chat"]  # one call, without the two long prompts
    assert len(conversations) == 2


def test_the_limit_is_the_running_engines_when_the_config_sets_none(calls):
    gen = vllm_backend.VLLMGenerator(_config(vllm=VLLMOptions()), kind="text")
    ok, too_long = gen.generate(
        [ChatRequest("ok", _words_prompt(4095)), ChatRequest("x", _words_prompt(4096))]
    )
    assert ok.ok and too_long.error == f"prompt_too_long: 4097 tokens > {DEFAULT_LIMIT}"


def test_a_vision_prompt_the_image_pushes_over_is_isolated_as_too_long(calls):
    # The text (20 + 1 tokens) fits 48, the image's 40 tokens do not: only vLLM can tell.
    gen = vllm_backend.VLLMGenerator(_config(vllm=VLLMOptions(max_model_len=48)), kind="vision")
    image = _jpeg()
    small, big = gen.generate(
        [
            ChatRequest("s", "describe", image=image),
            ChatRequest("b", _words_prompt(20), image=image),
        ]
    )
    assert small.text == "reply 0: describe"
    assert big.error.startswith("prompt_too_long: ValueError: The decoder prompt (length 61)")
    assert len(calls["chat"]) == 3  # the pair, then each alone


def test_one_poisoned_request_in_nine_fails_alone(calls):
    gen = vllm_backend.VLLMGenerator(_config(), kind="text")
    requests = [ChatRequest(f"r{i}", f"person {i}", seed=i) for i in range(9)]
    requests[5] = ChatRequest("r5", "person 5 POISON", seed=5)
    results = gen.generate(requests)
    assert [r.request_id for r in results] == [f"r{i}" for i in range(9)]
    for i, result in enumerate(results):
        if i == 5:
            assert result.error == "request_failed: RuntimeError: poisoned prompt"
        else:
            assert result.ok and result.text.endswith(f": person {i}")
    # Each call holding r5 fails and is halved, depth first: 9 -> 4 (answered) | 5 -> 2 | 3
    # (answered), and the 2 -> r4 (answered) | r5 (fails alone).
    sizes = [len(conv) for conv, _ in calls["chat"]]
    assert sizes == [9, 4, 5, 2, 1, 1, 3]
    assert len(sizes) <= 1 + 2 * math.ceil(math.log2(9))
    # Each request's own seed went with it in every call that carried it.
    for conv, params in calls["chat"]:
        for messages, param in zip(conv, params, strict=True):
            assert messages[-1]["content"].startswith(f"person {param.kwargs['seed']}")


def test_two_poisoned_requests_fail_and_seven_are_answered(calls):
    gen = vllm_backend.VLLMGenerator(_config(), kind="text")
    prompts = [f"person {i}" + (" POISON" if i in (0, 8) else "") for i in range(9)]
    results = gen.generate([ChatRequest(f"r{i}", p) for i, p in enumerate(prompts)])
    assert [r.ok for r in results] == [False] + [True] * 7 + [False]
    assert len(calls["chat"]) <= 1 + 2 * 2 * math.ceil(math.log2(9))


@pytest.fixture
def no_cached_engines():
    clear_generators()
    yield
    clear_generators()


def test_a_dead_engine_is_rebuilt_once_and_the_batch_answered(calls, no_cached_engines):
    config = _config()
    key = _engine_key(config, "text")
    loads_before = load_counts().get(key, 0)
    gen = get_generator(config, "text")
    assert gen._cache_key() == key
    assert gen.generate([ChatRequest("warm", "first shard")])[0].ok
    gen.llm.dies = True  # the engine core crashes between two shards
    results = gen.generate([ChatRequest(f"r{i}", f"person {i}") for i in range(4)])
    assert [r.text for r in results] == [f"reply {i}: person {i}" for i in range(4)]
    assert calls["built"] == 2 and gen.rebuilds == 1
    assert [len(conv) for conv, _ in calls["chat"]] == [1, 4, 4]  # dead call, then again
    assert get_generator(config, "text") is gen  # the rebuilt engine is the cached one
    assert calls["built"] == 2
    assert load_counts()[gen._cache_key()] == loads_before + 2  # the reload is counted


def test_an_engine_that_dies_again_fails_its_rows_and_stops(calls, no_cached_engines):
    calls["die"] = [True, True]
    config = _config()
    gen = get_generator(config, "text")
    requests = [ChatRequest(f"r{i}", f"person {i}") for i in range(3)]
    requests.append(ChatRequest("long", _words_prompt(5000)))
    with pytest.raises(EngineError) as raised:
        gen.generate(requests)
    message = str(raised.value)
    assert "\n" not in message and "Qwen/Qwen2.5-VL-7B-Instruct" in message
    assert "died again" in message and "3 of 4 requests failed" in message
    assert calls["built"] == 2  # rebuilt once, not more
    by_id = {r.request_id: r.error for r in raised.value.results}
    assert by_id["long"] == "prompt_too_long: 5001 tokens > 4096"
    for i in range(3):
        assert by_id[f"r{i}"] == (
            "engine_failed: EngineDeadError: EngineCore encountered an issue. "
            "See stack trace (above)."
        )
    # Evicted: the next stage run gets a fresh engine, not the dead one.
    fresh = get_generator(config, "text")
    assert fresh is not gen and calls["built"] == 3
    assert fresh.generate([ChatRequest("again", "person 9")])[0].text == "reply 0: person 9"


def test_a_death_while_isolating_keeps_the_answers_and_resends_only_the_rest(calls):
    gen = vllm_backend.VLLMGenerator(_config(), kind="text")
    first = gen.llm
    real_chat = first.chat

    def chat(conversations, **kw):  # the first engine dies on its third call
        if len(calls.get("chat", [])) == 2:
            first.dies = True
        return real_chat(conversations, **kw)

    first.chat = chat
    prompts = ["person 0", "person 1", "person 2 POISON", "person 3"]
    results = gen.generate([ChatRequest(f"r{i}", p) for i, p in enumerate(prompts)])
    assert [r.ok for r in results] == [True, True, False, True]
    assert results[2].error == "request_failed: RuntimeError: poisoned prompt"
    assert results[3].text == "reply 0: person 3"  # answered alone
    assert calls["built"] == 2 and gen.rebuilds == 1 and gen.llm is not first
    sent = [[c[-1]["content"] for c in conv] for conv, _ in calls["chat"]]
    # all four; the first half, answered; the second half, engine dead; then on the rebuilt
    # engine only that half again, split around the poisoned prompt.
    assert sent == [
        prompts,
        prompts[:2],
        prompts[2:],
        prompts[2:],
        prompts[2:3],
        prompts[3:],
    ]


def test_engine_args_reach_llm(calls):
    args = {
        "max_num_batched_tokens": 16384,
        "enable_prefix_caching": True,
        "mm_processor_kwargs": {"max_pixels": 262144},
    }
    vllm_backend.VLLMGenerator(_config(vllm=VLLMOptions(engine_args=args)), kind="text")
    assert {k: calls["llm"][k] for k in args} == args
    assert calls["llm"]["model"] == "Qwen/Qwen2.5-VL-7B-Instruct"


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("max_model_len", "set it as vllm.max_model_len"),
        ("gpu_memory_utilization", "set it as vllm.gpu_memory_utilization"),
        ("model", "set it as model"),
        ("trust_remote_code", "set it as trust_remote_code"),
    ],
)
def test_an_engine_arg_the_config_sets_is_refused(key, hint):
    with pytest.raises(ValidationError, match=rf"{key} \({hint}"):
        EngineConfig(backend="vllm", model="m", vllm={"engine_args": {key: 1, "seed": 3}})
    # From a config mapping too, where users write it.
    EngineConfig(backend="vllm", model="m", vllm={"engine_args": {"seed": 3}})


def test_every_key_llm_kwargs_sets_is_reserved(calls):
    opts = VLLMOptions(max_model_len=64, limit_mm_per_prompt={"image": 2})
    kwargs = vllm_backend.llm_kwargs(_config(vllm=opts), "vision")
    assert set(kwargs) <= RESERVED_ENGINE_ARGS


def test_seed_per_request_off_sends_no_seed(calls, monkeypatch):
    gen = vllm_backend.VLLMGenerator(_config(seed_per_request=False), kind="text")
    gen.generate([ChatRequest("a", "hi", seed=11), ChatRequest("b", "ho", seed=12)])
    ((_, params),) = calls["chat"]
    assert [("seed" in p.kwargs) for p in params] == [False, False]
    assert params[0].kwargs["temperature"] == 0.8  # the rest of sampling is unchanged

    from pedsynth.engines.openai_backend import OpenAIGenerator

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    for on in (True, False):
        config = EngineConfig(
            backend="openai", model="m", seed_per_request=on, openai={"base_url": "http://x/v1"}
        )
        body = OpenAIGenerator(config, kind="text").request_body(ChatRequest("x", "hi", seed=7))
        assert body.get("seed") == (7 if on else None) and ("seed" in body) is on


def test_an_engine_that_cannot_be_rebuilt_fails_its_rows_and_stops(calls, monkeypatch):
    gen = vllm_backend.VLLMGenerator(_config(), kind="text")
    gen.llm.dies = True
    real_llm = sys.modules["vllm"].LLM

    def no_memory(**kwargs):
        real_llm(**kwargs)  # counted, then out of memory
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(sys.modules["vllm"], "LLM", no_memory)
    with pytest.raises(EngineError, match="could not be rebuilt; 2 of 2 requests failed"):
        gen.generate([ChatRequest("a", "hi"), ChatRequest("b", "ho")])
    assert calls["built"] == 2 and gen.llm is None


def test_token_counts_come_from_the_request_outputs(calls):
    (text,) = vllm_backend.VLLMGenerator(_config(), kind="text").generate(
        [ChatRequest("t", "a woman in a red coat", system="Be brief.", seed=1)]
    )
    image, bad = vllm_backend.VLLMGenerator(_config(), kind="vision").generate(
        [
            ChatRequest("i", "describe", image=_jpeg(), seed=2),
            ChatRequest("bad", "describe", image=b"not an image"),
        ]
    )
    # The stand-in's ids: one per word plus one per message; images cost IMAGE_TOKENS.
    assert (text.prompt_tokens, text.completion_tokens) == (2 + 1 + 6 + 1, 2 + 6)
    assert (image.prompt_tokens, image.completion_tokens) == (1 + IMAGE_TOKENS + 1, 2 + 1)
    assert bad.prompt_tokens is None and bad.completion_tokens is None


def test_outputs_without_token_ids_leave_the_counts_unknown(calls, monkeypatch):
    gen = vllm_backend.VLLMGenerator(_config(), kind="text")
    monkeypatch.setattr(
        gen, "_chat", lambda requests: [_Output([_Completion("x", token_ids=None)])]
    )
    (result,) = gen.generate([ChatRequest("a", "describe")])
    assert result.ok and result.prompt_tokens is None and result.completion_tokens is None

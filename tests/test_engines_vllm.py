"""The vllm backend without a GPU: what it hands to ``vllm.LLM`` and ``SamplingParams``.

vLLM itself needs a GPU here, so a stand-in ``vllm`` module records the calls. What is checked
is our side of the contract: engine kwargs from the config, one ``SamplingParams`` per request
with its seed, the whole batch in a single ``LLM.chat`` call, images as data URLs, results in
request order, bad requests answered without reaching vLLM.
"""

from __future__ import annotations

import base64
import io
import sys
import types
from dataclasses import dataclass

import pytest
from PIL import Image

from pedsynth.engines import vllm_backend
from pedsynth.engines.text import ChatRequest, EngineError
from pedsynth.schemas.text import EngineConfig, VLLMOptions


@dataclass
class _Completion:
    text: str
    finish_reason: str = "stop"


@dataclass
class _Output:
    outputs: list


def _fake_vllm(calls: dict) -> types.ModuleType:
    mod = types.ModuleType("vllm")
    sampling = types.ModuleType("vllm.sampling_params")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class StructuredOutputsParams:
        def __init__(self, json=None):
            self.json = json

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs

        def chat(self, conversations, sampling_params=None, use_tqdm=True):
            calls.setdefault("chat", []).append((conversations, sampling_params))
            return [_Output([_Completion(f"reply {i}")]) for i in range(len(conversations))]

    mod.LLM, mod.SamplingParams = LLM, SamplingParams
    sampling.StructuredOutputsParams = StructuredOutputsParams
    mod.sampling_params = sampling
    return mod


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
    assert (results[0].text, results[2].text) == ("reply 0", "reply 1")
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

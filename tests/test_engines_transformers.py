"""The transformers backend with tiny random models built in code, and the engine cache."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pedsynth.engines import text as engines
from pedsynth.engines.text import ChatRequest, EngineError
from pedsynth.engines.tiny_models import tiny_model_dir
from pedsynth.schemas.text import EngineConfig
from tests.text_shards import torch_threads


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with torch_threads(1):
        yield


LLAMA = EngineConfig(model="tiny-random:llama", max_tokens=12, batch_size=4)
LLAVA = EngineConfig(model="tiny-random:llava", max_tokens=12, batch_size=4)


def _jpeg(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 48), colour).save(buf, format="JPEG")
    return buf.getvalue()


def test_tiny_models_are_built_once_and_load_through_auto_classes():
    from transformers import AutoConfig

    folder = tiny_model_dir("tiny-random:llava")
    assert tiny_model_dir("tiny-random:llava") == folder  # reused, not rebuilt
    assert AutoConfig.from_pretrained(folder).model_type == "llava"
    assert AutoConfig.from_pretrained(tiny_model_dir("tiny-random:llama")).model_type == "llama"
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny_model_dir("tiny-random:gpt5")


def test_engines_are_cached_per_config_and_kind():
    first = engines.get_generator(LLAMA, "text")
    assert engines.get_generator(LLAMA.model_copy(), "text") is first
    assert engines.get_generator(LLAMA.model_copy(update={"max_tokens": 5}), "text") is not first
    assert first.generator_id == "transformers:tiny-random:llama@default"


def test_text_generation_is_batched_ordered_and_seeded():
    gen = engines.get_generator(LLAMA, "text")
    requests = [ChatRequest(f"r{i}", f"Rewrite caption {i}", seed=i) for i in range(6)]
    first = gen.generate(requests)
    assert [r.request_id for r in first] == [f"r{i}" for i in range(6)]
    assert all(r.ok and r.text for r in first)
    # The tiny model's generation config keeps its noise to printable ASCII.
    assert all(32 <= ord(ch) < 127 for r in first for ch in r.text)
    assert [r.text for r in gen.generate(requests)] == [r.text for r in first]
    reseeded = [ChatRequest(r.request_id, r.prompt, seed=100 + i) for i, r in enumerate(requests)]
    assert [r.text for r in gen.generate(reseeded)] != [r.text for r in first]


def test_vision_generation_answers_bad_requests_per_request():
    gen = engines.get_generator(LLAVA, "vision")
    results = gen.generate(
        [
            ChatRequest("red", "Describe the person.", image=_jpeg("red"), seed=1),
            ChatRequest("junk", "Describe the person.", image=b"definitely not a jpeg"),
            ChatRequest("text-only", "Describe the person."),
            ChatRequest("blue", "Describe the person.", image=_jpeg("blue"), seed=2),
            ChatRequest("json", "x", image=_jpeg("red"), json_schema={"type": "object"}),
        ]
    )
    assert [r.request_id for r in results] == ["red", "junk", "text-only", "blue", "json"]
    assert results[0].ok and results[3].ok
    assert results[1].error.startswith("bad_image:")
    assert results[2].error.startswith("bad_request:")
    assert results[4].error.startswith("unsupported:")
    text = engines.get_generator(LLAMA, "text").generate(
        [ChatRequest("img", "x", image=_jpeg("red"))]
    )
    assert text[0].error.startswith("unsupported:")


def test_unknown_model_is_a_clear_engine_error():
    cfg = EngineConfig(model="/nonexistent/model/folder")
    with pytest.raises(EngineError, match="cannot load"):
        engines.create_generator(cfg, "text")


def test_duplicate_request_ids_are_refused():
    gen = engines.get_generator(LLAMA, "text")
    with pytest.raises(ValueError, match="unique"):
        gen.generate([ChatRequest("a", "x"), ChatRequest("a", "y")])


def test_engines_live_in_the_shared_model_cache_and_clear_forgets_them():
    from pedsynth.engines import cache

    config = LLAMA.model_copy(update={"max_tokens": 3})
    before = cache.load_counts()
    first = engines.get_generator(config, "text")
    assert engines.get_generator(config, "text") is first
    built = {k: n for k, n in cache.load_counts().items() if n != before.get(k, 0)}
    (key,) = built  # exactly one new load, under the generator kind
    assert key.startswith('["generator","text"') and built[key] == before.get(key, 0) + 1
    engines.clear_generators()
    assert engines.get_generator(config, "text") is not first
    assert cache.load_counts()[key] == built[key] + 1


def test_cuda_without_a_cuda_device_is_refused_by_name():
    import torch

    from pedsynth.engines.device import DeviceError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(DeviceError, match="cuda"):
        engines.create_generator(LLAMA.model_copy(update={"device": "cuda"}), "text")


def test_tiny_tokenizer_trains_without_the_procedural_package():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pedsynth.engines import text, tiny_models, transformers_backend\n"
        "tok = tiny_models.build_tokenizer()\n"
        "assert len(tok('a woman in a red coat and black jeans')['input_ids']) <= 12\n"
        "print(sorted(m for m in sys.modules if m.startswith('pedsynth.procedural')))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "[]"


def test_a_local_model_takes_any_image_pil_decodes():
    buf = io.BytesIO()
    Image.new("RGB", (24, 48), "green").save(buf, format="BMP")
    (result,) = engines.get_generator(LLAVA, "vision").generate(
        [ChatRequest("bmp", "Describe the person.", image=buf.getvalue(), seed=3)]
    )
    assert result.ok and result.text


def _templated(tokenizer, prompt: str, system: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": system}] if system else []
    ids = tokenizer.apply_chat_template(
        [*messages, {"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def test_token_counts_are_the_tokenizers_own_lengths():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tiny_model_dir("tiny-random:llama")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    greedy = LLAMA.model_copy(update={"temperature": 0.0, "max_tokens": 40})
    # Prompts of different lengths in one batch: left padding must not count.
    prompts = ["a", "a woman in a long red coat and black jeans walking", "man with a bag"]
    requests = [
        ChatRequest(f"p{i}", p, system="Be brief." if i == 1 else None, seed=i)
        for i, p in enumerate(prompts)
    ]
    batched = engines.get_generator(greedy, "text").generate(requests)
    expected = [len(_templated(tokenizer, r.prompt, r.system)) for r in requests]
    assert len(set(expected)) == 3
    assert [r.prompt_tokens for r in batched] == expected

    # One request alone (no padding): the model's own generate, run here, says how many
    # tokens it produced, EOS included, and stops there.
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    alone = engines.get_generator(greedy.model_copy(update={"batch_size": 1}), "text")
    results = alone.generate(requests)
    for request, result in zip(requests, results, strict=True):
        ids = _templated(tokenizer, request.prompt, request.system)
        import torch

        with torch.inference_mode():
            out = model.generate(
                torch.tensor([ids]),
                max_new_tokens=40,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
        generated = out[0, len(ids) :].tolist()
        assert result.prompt_tokens == len(ids)
        assert result.completion_tokens == len(generated)
        assert 0 < result.completion_tokens <= 40
        if result.finish_reason == "stop":
            assert generated[-1] == tokenizer.eos_token_id  # EOS counted once, nothing after

"""Engine preflight: one line naming the stage and the setting, before any model loads."""

from __future__ import annotations

import sys

import pytest

from pedsynth.engines.openai_backend import OpenAIGenerator
from pedsynth.engines.preflight import check_build_engines, check_engine
from pedsynth.engines.text import EngineError
from pedsynth.errors import PreflightError
from pedsynth.redact import redact
from pedsynth.schemas.base import StrictModel
from pedsynth.schemas.config import BuildConfig
from pedsynth.schemas.text import (
    CaptionConfig,
    EngineConfig,
    OpenAIOptions,
    RewriteConfig,
    VLLMOptions,
)


@pytest.fixture(autouse=True)
def _no_ambient_openai_env(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)


def openai_engine(base_url: str | None = None, **opts) -> EngineConfig:
    options = OpenAIOptions(base_url=base_url, **opts)
    return EngineConfig(backend="openai", model="served-model", openai=options)


def failure(stage: str, engine: EngineConfig) -> str:
    with pytest.raises(PreflightError) as info:
        check_engine(stage, engine)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{stage}.engine.")
    return message


# ------------------------------------------------------------------ API keys


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:8000/v1",
        "http://localhost:8000/v1",
        "http://[::1]:8000/v1",
        "http://127.0.0.2:9/v1",
        "http://LOCALHOST./v1",
    ],
)
def test_a_loopback_server_needs_no_key_unless_one_is_named(url):
    check_engine("rewrite", openai_engine(url))
    message = failure("rewrite", openai_engine(url, api_key_env="MY_LOCAL_KEY"))
    assert message == (
        "rewrite.engine.openai.api_key_env: the environment variable MY_LOCAL_KEY is not set; "
        "export it with the API key, or set openai.api_key_env: none for a server without auth"
    )


@pytest.mark.parametrize(
    "url",
    ["https://llm.example.com/v1", "http://10.0.0.5:8000/v1", "http://localhost.example.com/v1"],
)
def test_any_other_endpoint_needs_openai_api_key(url, monkeypatch):
    message = failure("caption", openai_engine(url))
    assert message == (
        "caption.engine.openai.api_key_env: the environment variable OPENAI_API_KEY (the default "
        f"for {url}) is not set; export it with the API key, or set openai.api_key_env: none "
        "for a server without auth"
    )
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-the-environment-123456")
    check_engine("caption", openai_engine(url))
    check_engine("caption", openai_engine(url, api_key_env="none"))  # no auth, said so


def test_the_default_endpoint_is_openai_unless_openai_base_url_says_otherwise(monkeypatch):
    assert "(the default for https://api.openai.com/v1)" in failure("rewrite", openai_engine())
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")  # the SDK reads it too
    check_engine("rewrite", openai_engine())


def test_the_backend_builds_exactly_when_the_preflight_passes(monkeypatch):
    cases = [
        openai_engine("http://127.0.0.1:9/v1"),
        openai_engine("http://127.0.0.1:9/v1", api_key_env="PEDSYNTH_NAMED_KEY"),
        openai_engine("https://llm.example.com/v1"),
        openai_engine("https://llm.example.com/v1", api_key_env="none"),
    ]
    verdicts = []
    for cfg in cases:
        try:
            check_engine("rewrite", cfg)
            passed = True
        except PreflightError:
            passed = False
        try:
            OpenAIGenerator(cfg, kind="text")
            built = True
        except EngineError:
            built = False
        verdicts.append((passed, built))
    assert verdicts == [(True, True), (False, False), (False, False), (True, True)]


def test_an_api_key_variable_must_be_a_variable_name():
    with pytest.raises(ValueError, match="name an environment variable"):
        OpenAIOptions(api_key_env="sk-this-is-the-key-itself")


# ------------------------------------------------------------------ packages and paths


@pytest.mark.parametrize(
    ("backend", "package", "advice"),
    [
        ("vllm", "vllm", "pip install 'pedsynth[gpu]', or run a vLLM server (vllm serve MODEL)"),
        ("transformers", "transformers", "pip install transformers"),
        ("openai", "openai", "pip install openai"),
    ],
)
def test_a_backend_whose_package_is_missing(backend, package, advice, monkeypatch):
    monkeypatch.setitem(sys.modules, package, None)  # how Python marks a module not importable
    cfg = EngineConfig(backend=backend, model="tiny-random:llama")
    if backend == "openai":
        cfg = openai_engine("http://127.0.0.1:8000/v1")
    message = failure("caption", cfg)
    assert message.startswith(
        f"caption.engine.backend: {backend} needs the {package} package, which is not installed; "
    )
    assert advice in message


def test_a_local_model_path_must_exist(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-model"
    message = failure("rewrite", EngineConfig(model=str(missing)))
    assert message == (
        f"rewrite.engine.model: {missing} does not exist; give a local model folder or a hub id"
    )
    monkeypatch.chdir(tmp_path)
    assert "no-such-model does not exist" in failure(
        "rewrite", EngineConfig(model="./no-such-model")
    )
    monkeypatch.setenv("HOME", str(tmp_path))
    home_cfg = EngineConfig(model="~/no-such-model")
    assert f"{missing} does not exist" in failure("rewrite", home_cfg)
    missing.mkdir()
    check_engine("rewrite", home_cfg)  # ~ expanded, as the loaders will see it
    check_engine("rewrite", EngineConfig(model=str(missing)))
    check_engine("rewrite", EngineConfig(model="Qwen/Qwen2.5-0.5B-Instruct"))  # a hub id
    check_engine("rewrite", EngineConfig(model="tiny-random:llama"))
    # The openai backend's model is a name the server knows, wherever its files are.
    check_engine(
        "rewrite",
        openai_engine("http://127.0.0.1:8000/v1").model_copy(
            update={"model": "/models/on-the-server"}
        ),
    )


# ------------------------------------------------------------------ settings of another backend


@pytest.mark.parametrize(
    ("setting", "value", "expected"),
    [
        ("device", "cpu", "rewrite.engine.device: set to 'cpu', but only the transformers"),
        ("cpu_threads", 2, "rewrite.engine.cpu_threads: set to 2, but only the transformers"),
        ("batch_size", 64, "rewrite.engine.batch_size: set to 64, but only the transformers"),
        ("dtype", "bfloat16", "rewrite.engine.dtype: set to 'bfloat16', but only"),
        ("trust_remote_code", True, "rewrite.engine.trust_remote_code: set to True, but only"),
    ],
)
def test_settings_of_another_backend_are_refused_under_openai(setting, value, expected):
    cfg = openai_engine("http://127.0.0.1:8000/v1").model_copy(update={setting: value})
    cfg = EngineConfig.model_validate(cfg.model_dump())
    message = failure("rewrite", cfg)
    assert message.startswith(expected) and message.endswith("remove it under backend: openai")


def test_a_setting_left_at_its_default_is_fine_even_when_written_out():
    cfg = EngineConfig.model_validate(
        {
            "backend": "openai",
            "model": "m",
            "device": "auto",
            "batch_size": 16,
            "openai": {"base_url": "http://127.0.0.1:8000/v1"},
        }
    )
    assert {"device", "batch_size"} <= cfg.model_fields_set
    check_engine("caption", cfg)


def test_sections_of_another_backend_are_refused():
    cfg = EngineConfig(model="tiny-random:llama", openai=OpenAIOptions(max_concurrency=4))
    assert failure("caption", cfg) == (
        "caption.engine.openai.max_concurrency: only the openai backend reads the openai: "
        "section; remove it under backend: transformers"
    )
    cfg = EngineConfig(model="tiny-random:llama", vllm=VLLMOptions(gpu_memory_utilization=0.5))
    assert failure("caption", cfg).startswith(
        "caption.engine.vllm.gpu_memory_utilization: only the vllm backend reads the vllm: "
    )
    vllm_cfg = EngineConfig(backend="vllm", model="tiny-random:llama", dtype="float16")
    assert "(vllm reads vllm.dtype)" in failure("caption", vllm_cfg)


# ------------------------------------------------------------------ a whole build


def test_every_stage_with_an_engine_is_checked(monkeypatch):
    good = EngineConfig(model="tiny-random:llama")
    remote = openai_engine("https://llm.example.com/v1")
    cfg = BuildConfig(caption=CaptionConfig(engine=good), rewrite=RewriteConfig(engine=remote))
    with pytest.raises(PreflightError, match=r"^rewrite\.engine\.openai\.api_key_env: .*"):
        check_build_engines(cfg)
    secret = "sk-remote-0123456789abcdef"
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    check_build_engines(cfg)
    assert redact(f"echo {secret}") == "echo [redacted]"  # its value is now masked in output
    check_build_engines(BuildConfig())  # no model stages: nothing to check


def test_stages_are_found_by_attribute_not_by_name():
    class EditConfig(StrictModel):
        judge: EngineConfig
        steps: int = 4

    class FutureBuild(StrictModel):
        edit: EditConfig | None = None
        name: str = "x"

    bad = EngineConfig(model="tiny-random:llama", device="cuda").model_copy(
        update={"backend": "openai"}
    )
    with pytest.raises(PreflightError, match=r"^edit\.judge\.device: "):
        check_build_engines(FutureBuild(edit=EditConfig(judge=bad)))

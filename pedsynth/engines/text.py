"""Text and vision-language generation behind one small protocol, with three backends.

A generator takes a batch of :class:`ChatRequest` and returns one :class:`GenerationResult` per
request, in the same order. A request that fails (a bad image, an HTTP error after all retries)
comes back as a result with ``error`` set; a generator raises only for problems of the whole
engine (a model that cannot be loaded, a missing API key), never for one request. Vision
requests are the same type with ``image`` set; a text-only model refuses them per request.

Backends (``EngineConfig.backend``): ``transformers`` (local HF model, batched ``generate``),
``vllm`` (in-process ``vllm.LLM.chat`` over the whole batch) and ``openai`` (any
OpenAI-compatible endpoint, many requests in flight). :func:`get_generator` keeps one engine per
config in each worker process: Prefect tasks are short-lived, models are not.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pedsynth.schemas.text import EngineConfig

Kind = Literal["text", "vision"]

_BACKENDS: dict[str, str] = {
    "transformers": "pedsynth.engines.transformers_backend:TransformersGenerator",
    "vllm": "pedsynth.engines.vllm_backend:VLLMGenerator",
    "openai": "pedsynth.engines.openai_backend:OpenAIGenerator",
}


@dataclass(frozen=True)
class ChatRequest:
    """One single-turn chat: an optional system message, a user prompt, an optional image."""

    request_id: str
    prompt: str
    system: str | None = None
    image: bytes | None = None  # encoded JPEG/PNG/WebP; set for vision requests
    seed: int | None = None  # sampling seed of this request
    json_schema: dict[str, Any] | None = None  # structured output, where the backend can


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str | None
    error: str | None = None  # "reason: detail" when the request failed
    finish_reason: str | None = None  # "stop" | "length" | backend-specific

    @property
    def ok(self) -> bool:
        return self.error is None and self.text is not None


class Generator(Protocol):
    """Batch of chat requests -> batch of results (same length, same order)."""

    config: EngineConfig
    kind: Kind

    @property
    def generator_id(self) -> str: ...

    def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]: ...


class EngineError(RuntimeError):
    """An engine that cannot run at all (load failure, missing credentials, missing package)."""


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from ``parts``: the same parts give the same seed on every machine."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def image_mime(data: bytes) -> str:
    """The MIME type of an encoded image from its magic bytes (for data URLs)."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    raise ValueError("not a JPEG, PNG, WebP or GIF image")


def data_url(data: bytes) -> str:
    return f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"


def openai_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The OpenAI chat format of a request; the image travels as a base64 data URL.

    Used as-is by the openai backend and by vLLM's ``LLM.chat``, which accepts the same format.
    """
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    if request.image is None:
        messages.append({"role": "user", "content": request.prompt})
    else:
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url(request.image)}},
                    {"type": "text", "text": request.prompt},
                ],
            }
        )
    return messages


def check_unique_ids(requests: Sequence[ChatRequest]) -> None:
    ids = [r.request_id for r in requests]
    if len(set(ids)) != len(ids):
        raise ValueError("request ids must be unique within a batch")


def failure(request: ChatRequest, reason: str, detail: str) -> GenerationResult:
    return GenerationResult(request.request_id, None, error=f"{reason}: {detail}")


_engines: dict[str, Generator] = {}
_engines_lock = threading.Lock()
_build_locks: dict[str, threading.Lock] = {}


def _engine_key(config: EngineConfig, kind: Kind) -> str:
    return json.dumps([kind, config.model_dump(mode="json")], sort_keys=True)


def create_generator(config: EngineConfig, kind: Kind) -> Generator:
    """A new engine for ``config`` (loads the model now); prefer :func:`get_generator`."""
    module, _, attr = _BACKENDS[config.backend].partition(":")
    return getattr(importlib.import_module(module), attr)(config, kind=kind)


def get_generator(config: EngineConfig, kind: Kind) -> Generator:
    """The process-wide engine for (config, kind), built on first use and then reused.

    Two threads asking for the same engine at once build it once; different engines build
    in parallel.
    """
    key = _engine_key(config, kind)
    with _engines_lock:
        if key in _engines:
            return _engines[key]
        build_lock = _build_locks.setdefault(key, threading.Lock())
    with build_lock:
        with _engines_lock:
            if key in _engines:
                return _engines[key]
        engine = create_generator(config, kind)
        with _engines_lock:
            _engines[key] = engine
        return engine


def clear_generators() -> None:
    """Forget every cached engine (tests; freeing GPU memory between builds)."""
    with _engines_lock:
        _engines.clear()
        _build_locks.clear()

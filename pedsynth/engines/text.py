"""Text and vision-language generation behind one small protocol, with three backends.

A generator takes a batch of :class:`ChatRequest` and returns one :class:`GenerationResult` per
request, in the same order. A request that fails (a bad image, an HTTP error after all retries)
comes back as a result with ``error`` set; a generator raises only for problems of the whole
engine (a model that cannot be loaded, a missing API key), never for one request. Vision
requests are the same type with ``image`` set; a text-only model refuses them per request.

Backends (``EngineConfig.backend``): ``transformers`` (local HF model, batched ``generate``),
``vllm`` (in-process ``vllm.LLM.chat`` over the whole batch) and ``openai`` (any
OpenAI-compatible endpoint, many requests in flight). Each is a :class:`GeneratorBase`, which
owns what they share (unique ids, text/vision checks, bad images, result order), so a backend
holds only its own I/O. :func:`get_generator` keeps one engine per config in each worker
process through the project's model cache: Prefect tasks are short-lived, models are not.
"""

from __future__ import annotations

import base64
import hashlib
import importlib
import io
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pedsynth.engines.cache import cache_key, cached, clear_kind
from pedsynth.redact import redact
from pedsynth.schemas.text import EngineConfig

Kind = Literal["text", "vision"]

_BACKENDS: dict[str, str] = {
    "transformers": "pedsynth.engines.transformers_backend:TransformersGenerator",
    "vllm": "pedsynth.engines.vllm_backend:VLLMGenerator",
    "openai": "pedsynth.engines.openai_backend:OpenAIGenerator",
}
_CACHE_KIND = "generator"


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
    # Token usage where the backend reports it (None: unknown): the prompt as the model saw
    # it (chat template included) and the tokens it generated.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None

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
    """A failed result; the detail is redacted, as server text may echo a credential."""
    return GenerationResult(request.request_id, None, error=f"{reason}: {redact(detail)}")


# Formats a data URL can name (``image_mime``); PIL calls multi-picture JPEGs "MPO".
DATA_URL_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF"})
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)


def open_image(data: bytes) -> Any:
    """The decoded RGB ``PIL.Image`` of encoded bytes (raises what PIL raises)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


class GeneratorBase(ABC):
    """What every backend shares; a backend implements only :meth:`_generate`, its own I/O.

    :meth:`generate` refuses duplicate request ids, answers the requests no backend can serve
    (an image for a text model, a vision request without one, an image that does not decode,
    structured output where the backend has none) without calling the backend, and puts the
    backend's results back in request order.
    """

    structured_output = True  # whether the backend honours ``ChatRequest.json_schema``
    image_formats: frozenset[str] | None = None  # PIL formats it can send; None: any it decodes

    def __init__(self, config: EngineConfig, kind: Kind):
        self.config, self.kind = config, kind

    @property
    def generator_id(self) -> str:
        return self.config.generator_id

    def generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        check_unique_ids(requests)
        results: dict[str, GenerationResult] = {}
        accepted: list[ChatRequest] = []
        for request in requests:
            refusal = self._refusal(request)
            if refusal is None:
                accepted.append(request)
            else:
                results[request.request_id] = refusal
        if accepted:
            answered = self._generate(accepted)
            if sorted(r.request_id for r in answered) != sorted(r.request_id for r in accepted):
                raise EngineError(f"{self.generator_id}: the backend lost or invented results")
            results.update((r.request_id, r) for r in answered)
        return [results[r.request_id] for r in requests]

    @abstractmethod
    def _generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        """One result per request (any order) for requests that passed the shared checks."""

    def _refusal(self, request: ChatRequest) -> GenerationResult | None:
        if request.json_schema is not None and not self.structured_output:
            detail = f"the {self.config.backend} backend has no structured output"
            return failure(request, "unsupported", detail)
        if self.kind == "text" and request.image is not None:
            return failure(request, "unsupported", "a text model got an image")
        if self.kind == "vision" and request.image is None:
            return failure(request, "bad_request", "a vision request needs an image")
        if request.image is not None:
            return self._image_problem(request)
        return None

    def _image_problem(self, request: ChatRequest) -> GenerationResult | None:
        """A ``bad_image`` result when the image cannot be decoded or sent; one undecodable
        image must not fail the batch."""
        from PIL import Image

        try:
            with Image.open(io.BytesIO(request.image)) as im:
                im.load()
                image_format = im.format
        except (*_DECODE_ERRORS, Image.DecompressionBombError) as exc:
            return failure(request, "bad_image", f"{type(exc).__name__}: {exc}")
        if self.image_formats is not None and image_format not in self.image_formats:
            return failure(request, "bad_image", f"{image_format} image; send JPEG, PNG, WebP, GIF")
        return None


def _engine_key(config: EngineConfig, kind: Kind) -> str:
    return cache_key(_CACHE_KIND, kind, config.model_dump(mode="json"))


def create_generator(config: EngineConfig, kind: Kind) -> Generator:
    """A new engine for ``config`` (loads the model now); prefer :func:`get_generator`."""
    module, _, attr = _BACKENDS[config.backend].partition(":")
    return getattr(importlib.import_module(module), attr)(config, kind=kind)


def get_generator(config: EngineConfig, kind: Kind) -> Generator:
    """The process-wide engine for (config, kind), built on first use and then reused."""
    return cached(_engine_key(config, kind), lambda: create_generator(config, kind))


def clear_generators() -> None:
    """Forget every cached engine (tests; freeing GPU memory between builds)."""
    clear_kind(_CACHE_KIND)

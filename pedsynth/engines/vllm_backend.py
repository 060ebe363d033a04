"""In-process vLLM: one ``vllm.LLM`` per engine config, fed whole batches through ``LLM.chat``.

vLLM batches continuously inside, so the whole shard goes in one call with one
``SamplingParams`` per request (the per-request seed lives there, unless
``seed_per_request`` is off). Engine settings (``tensor_parallel_size``, ``max_model_len``,
``limit_mm_per_prompt``, ...) are passed through from ``EngineConfig.vllm``, and
``vllm.engine_args`` adds any other ``vllm.LLM`` keyword. Images are sent as base64 data URLs
in OpenAI-format messages, which ``LLM.chat`` accepts. ``vllm`` is imported only when an
engine is built; the ``gpu`` extra installs it.

One bad request never fails the batch. Before sending, each prompt's token count is checked
against the running engine's ``max_model_len`` (``prompt_too_long``). When ``LLM.chat`` still
raises for a batch, the batch is split in halves until the requests that raise are alone; each
becomes a failed result and the rest are answered (k bad requests among n cost about
``2 k log2 n`` extra calls). A dead engine (vLLM's ``EngineDeadError``) is different: nothing
more can be sent to it. It is dropped and rebuilt in place, once per batch; if the rebuilt
engine dies too, the requests not yet answered become ``engine_failed`` results, the generator
is evicted from the process cache (the next ``get_generator`` builds a new one) and
:class:`EngineFailedError` stops the stage.
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Sequence
from typing import Any

from pedsynth.engines.cache import cached, clear
from pedsynth.engines.text import (
    DATA_URL_FORMATS,
    ChatRequest,
    EngineError,
    GenerationResult,
    GeneratorBase,
    Kind,
    _engine_key,
    failure,
    openai_messages,
)
from pedsynth.engines.tiny_models import is_tiny, tiny_model_dir
from pedsynth.schemas.text import EngineConfig

# vLLM's exceptions for an engine whose core process is gone (``vllm.v1.engine.exceptions``;
# ``AsyncEngineDeadError`` in older releases). Matched by class name: the module moved between
# releases, and importing it would tie this file to one layout.
DEAD_ENGINE_ERRORS = frozenset({"EngineDeadError", "AsyncEngineDeadError"})
# What vLLM says when a prompt (text plus image tokens) does not fit ``max_model_len``.
_TOO_LONG_MESSAGE = "longer than the maximum model length"


class EngineFailedError(EngineError):
    """The engine died and died again after one rebuild. ``results`` holds one result per
    request the backend was given: the answers it got before, failures for the rest."""

    def __init__(self, message: str, results: list[GenerationResult]):
        super().__init__(message)
        self.results = results


class _EngineDied(Exception):
    """Internal: the engine died during a call; carries vLLM's exception."""

    def __init__(self, cause: BaseException):
        super().__init__(str(cause))
        self.cause = cause


def llm_kwargs(config: EngineConfig, kind: Kind) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for an engine config."""
    opts = config.vllm
    model = str(tiny_model_dir(config.model)) if is_tiny(config.model) else config.model
    kwargs: dict[str, Any] = {
        "model": model,
        "revision": config.revision,
        "trust_remote_code": config.trust_remote_code,
        "tensor_parallel_size": opts.tensor_parallel_size,
        "gpu_memory_utilization": opts.gpu_memory_utilization,
        "dtype": opts.dtype,
        "enforce_eager": opts.enforce_eager,
    }
    if opts.max_model_len is not None:
        kwargs["max_model_len"] = opts.max_model_len
    if kind == "vision":
        kwargs["limit_mm_per_prompt"] = dict(opts.limit_mm_per_prompt)
    # The config refuses engine_args that repeat a key above (RESERVED_ENGINE_ARGS).
    kwargs.update(opts.engine_args)
    return kwargs


def sampling_kwargs(config: EngineConfig, request: ChatRequest) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request (structured output aside)."""
    kwargs: dict[str, Any] = {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_tokens,
    }
    if config.seed_per_request and request.seed is not None:
        kwargs["seed"] = request.seed
    return kwargs


def make_sampling_params(vllm: Any, config: EngineConfig, request: ChatRequest) -> Any:
    """``SamplingParams`` of one request; a JSON schema becomes structured output."""
    kwargs = sampling_kwargs(config, request)
    if request.json_schema is not None:
        params_mod = vllm.sampling_params
        if hasattr(params_mod, "StructuredOutputsParams"):  # vLLM >= 0.11
            kwargs["structured_outputs"] = params_mod.StructuredOutputsParams(
                json=request.json_schema
            )
        else:
            kwargs["guided_decoding"] = params_mod.GuidedDecodingParams(json=request.json_schema)
    return vllm.SamplingParams(**kwargs)


def is_dead_engine(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) says the vLLM engine is dead."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if any(cls.__name__ in DEAD_ENGINE_ERRORS for cls in type(current).__mro__):
            return True
        current, seen = current.__cause__ or current.__context__, seen + 1
    return False


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _length(token_ids: Any) -> int | None:
    """How many token ids vLLM reports (a list, a tuple or an array); None without any."""
    try:
        return None if token_ids is None else len(token_ids)
    except TypeError:
        return None


def max_model_len(llm: Any) -> int | None:
    """The running engine's context limit (derived from the model when the config sets none)."""
    model_config = getattr(llm, "model_config", None)  # vLLM >= 0.10 keeps it on the LLM
    if model_config is None:
        model_config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    limit = getattr(model_config, "max_model_len", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def prompt_tokens(tokenizer: Any, request: ChatRequest) -> int | None:
    """Tokens of the request's rendered chat prompt; None if the tokenizer cannot say.

    Only the text is counted. For a vision request the image becomes a number of placeholder
    tokens that depends on the model's processor and the image size, unknown before vLLM
    processes it, so the count here is a lower bound; a prompt that the image pushes over the
    limit is still caught when ``LLM.chat`` refuses it (see ``_chat_isolating``).
    """
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    try:
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # a BatchEncoding where return_dict is the default
            ids = ids["input_ids"]
        return len(ids)
    except Exception:  # no chat template, or a tokenizer without one: count the raw text
        pass
    try:
        return len(tokenizer.encode("\n".join(m["content"] for m in messages)))
    except Exception:
        return None


class VLLMGenerator(GeneratorBase):
    image_formats = DATA_URL_FORMATS  # images travel as data URLs

    def __init__(self, config: EngineConfig, kind: Kind):
        try:
            import vllm
        except ImportError as exc:
            raise EngineError(
                "backend vllm needs the vllm package: pip install 'pedsynth[gpu]'"
            ) from exc
        super().__init__(config, kind)
        self._vllm = vllm
        self.llm: Any = self._build_llm()
        self._lock = threading.Lock()  # one batch at a time; vLLM batches inside it
        self.rebuilds = 0  # engines built after a death, over this generator's life

    def _build_llm(self) -> Any:
        try:
            return self._vllm.LLM(**llm_kwargs(self.config, self.kind))
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineError(f"cannot start vLLM for {self.generator_id}: {exc}") from exc

    def _generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        with self._lock:
            results: dict[str, GenerationResult] = {}
            rebuilt = False
            if self.llm is None:  # gave up in an earlier batch: this batch gets one fresh try
                self._rebuild(requests, results)
                rebuilt = True
            pending = self._check_lengths(requests, results)
            while pending:
                try:
                    self._chat_isolating(pending, results)
                    pending = []
                except _EngineDied as died:
                    pending = [r for r in pending if r.request_id not in results]
                    if rebuilt:
                        self._give_up(requests, results, died.cause)
                    self._rebuild(requests, results)
                    rebuilt = True
            return [results[r.request_id] for r in requests]

    def _check_lengths(
        self, requests: Sequence[ChatRequest], results: dict[str, GenerationResult]
    ) -> list[ChatRequest]:
        """The requests that fit the engine's context; the others get ``prompt_too_long``."""
        limit = max_model_len(self.llm)
        if limit is None:
            return list(requests)
        try:
            tokenizer = self.llm.get_tokenizer()
        except Exception:  # skip_tokenizer_init, or no tokenizer to ask: vLLM will judge
            return list(requests)
        fitting = []
        for request in requests:
            n = prompt_tokens(tokenizer, request)
            if n is not None and n > limit:
                results[request.request_id] = failure(
                    request, "prompt_too_long", f"{n} tokens > {limit}"
                )
            else:
                fitting.append(request)
        return fitting

    def _chat_isolating(
        self, requests: Sequence[ChatRequest], results: dict[str, GenerationResult]
    ) -> None:
        """Answer ``requests`` into ``results``; a call that raises is split in halves until
        each request that raises is alone. Raises :class:`_EngineDied` when the engine dies
        (the answers got before are kept in ``results``)."""
        try:
            outputs = self._chat(requests)
        except Exception as exc:
            if is_dead_engine(exc):
                raise _EngineDied(exc) from exc
            if len(requests) == 1:
                (request,) = requests
                reason = "prompt_too_long" if _TOO_LONG_MESSAGE in str(exc) else "request_failed"
                results[request.request_id] = failure(request, reason, _one_line(exc))
                return
            half = len(requests) // 2
            self._chat_isolating(requests[:half], results)
            self._chat_isolating(requests[half:], results)
            return
        for request, out in zip(requests, outputs, strict=True):
            completion = out.outputs[0] if out.outputs else None
            if completion is None:
                results[request.request_id] = failure(request, "empty_choice", "no output")
            else:
                results[request.request_id] = GenerationResult(
                    request.request_id,
                    completion.text,
                    finish_reason=completion.finish_reason,
                    prompt_tokens=_length(getattr(out, "prompt_token_ids", None)),
                    completion_tokens=_length(getattr(completion, "token_ids", None)),
                )

    def _chat(self, requests: Sequence[ChatRequest]) -> list[Any]:
        conversations = [openai_messages(req) for req in requests]
        params = [make_sampling_params(self._vllm, self.config, req) for req in requests]
        outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise EngineError(
                f"{self.generator_id}: vLLM returned {len(outputs)} outputs "
                f"for {len(requests)} requests"
            )
        return outputs

    def _cache_key(self) -> str:
        return _engine_key(self.config, self.kind)

    def _drop_llm(self) -> None:
        """Forget the current engine and free what it holds (best effort)."""
        llm, self.llm = self.llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if callable(shutdown):
            with contextlib.suppress(Exception):  # already gone: that is why it is dropped
                shutdown()
        del llm
        gc.collect()

    def _rebuild(
        self, requests: Sequence[ChatRequest], results: dict[str, GenerationResult]
    ) -> None:
        """Replace a dead ``vllm.LLM`` with a new one, in place.

        The dead engine is dropped at once; the generator object stays the one the process
        cache hands out, so a caller that fetches it meanwhile waits on the lock and then uses
        the new engine instead of building a second one beside it. Once the new engine runs,
        the cache entry is evicted and stored again, so ``cache.load_counts`` shows the reload.
        """
        self._drop_llm()
        try:
            self.llm = self._build_llm()
        except EngineError as exc:
            self._give_up(requests, results, exc, what="could not be rebuilt")
        self.rebuilds += 1
        clear(self._cache_key())
        cached(self._cache_key(), lambda: self)

    def _give_up(
        self,
        requests: Sequence[ChatRequest],
        results: dict[str, GenerationResult],
        cause: BaseException,
        what: str = "died again after a rebuild",
    ) -> None:
        """Fail every request not answered yet with ``engine_failed``, leave the engine out of
        the cache, and stop the stage."""
        clear(self._cache_key())
        self._drop_llm()
        detail = _one_line(cause)
        failed = 0
        for request in requests:
            if request.request_id not in results:
                results[request.request_id] = failure(request, "engine_failed", detail)
                failed += 1
        raise EngineFailedError(
            f"vLLM engine for {self.config.model} {what}; "
            f"{failed} of {len(requests)} requests failed ({detail})",
            [results[r.request_id] for r in requests],
        )

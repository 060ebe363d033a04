"""In-process vLLM: one ``vllm.LLM`` per engine config, fed whole batches through ``LLM.chat``.

vLLM batches continuously inside, so the whole shard goes in one call with one
``SamplingParams`` per request (the per-request seed lives there). Engine settings
(``tensor_parallel_size``, ``max_model_len``, ``limit_mm_per_prompt``, ...) are passed through
from ``EngineConfig.vllm``. Images are sent as base64 data URLs in OpenAI-format messages,
which ``LLM.chat`` accepts. ``vllm`` is imported only when an engine is built; the ``gpu``
extra installs it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

from pedsynth.engines.text import (
    DATA_URL_FORMATS,
    ChatRequest,
    EngineError,
    GenerationResult,
    GeneratorBase,
    Kind,
    failure,
    openai_messages,
)
from pedsynth.engines.tiny_models import is_tiny, tiny_model_dir
from pedsynth.schemas.text import EngineConfig


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
    return kwargs


def sampling_kwargs(config: EngineConfig, request: ChatRequest) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request (structured output aside)."""
    kwargs: dict[str, Any] = {
        "temperature": config.temperature,
        "top_p": config.top_p,
        "max_tokens": config.max_tokens,
    }
    if request.seed is not None:
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
        try:
            self.llm = vllm.LLM(**llm_kwargs(config, kind))
        except (OSError, ValueError, RuntimeError) as exc:
            raise EngineError(f"cannot start vLLM for {config.generator_id}: {exc}") from exc
        self._lock = threading.Lock()  # one batch at a time; vLLM batches inside it

    def _generate(self, requests: Sequence[ChatRequest]) -> list[GenerationResult]:
        conversations = [openai_messages(req) for req in requests]
        params = [make_sampling_params(self._vllm, self.config, req) for req in requests]
        with self._lock:
            outputs = self.llm.chat(conversations, sampling_params=params, use_tqdm=False)
        results = []
        for req, out in zip(requests, outputs, strict=True):
            completion = out.outputs[0] if out.outputs else None
            if completion is None:
                results.append(failure(req, "empty_choice", "no output"))
            else:
                results.append(
                    GenerationResult(
                        req.request_id, completion.text, finish_reason=completion.finish_reason
                    )
                )
        return results

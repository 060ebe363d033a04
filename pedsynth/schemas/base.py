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

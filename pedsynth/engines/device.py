"""Where a model runs: one rule for every engine and the trainer.

``auto`` means the first CUDA device when there is one, else the CPU; naming ``cuda`` without
a CUDA device is an error the user can act on, not a silent fall-back. ``auto`` precision is
bf16 on CUDA and fp32 elsewhere.
"""

from __future__ import annotations

from typing import Any


class DeviceError(RuntimeError):
    """A configured device that this machine does not have."""


_DTYPES = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}


def resolve_device(name: str) -> Any:
    """A ``torch.device`` for ``auto | cpu | cuda | cuda:N``."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {name!r}: no CUDA device is available on this machine")
    return device


def resolve_dtype(precision: str, device: Any) -> Any:
    """A ``torch.dtype`` for ``auto | fp32 | bf16 | fp16`` (or the torch spellings)."""
    import torch

    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if precision not in _DTYPES:
        raise ValueError(f"precision {precision!r}: one of auto, {', '.join(sorted(_DTYPES))}")
    return getattr(torch, _DTYPES[precision])

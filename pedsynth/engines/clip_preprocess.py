"""The one evaluation preprocessing of person crops, shared by the CLIP engine and the trainer.

Person crops are tall; stretching them to a square (or to 384×128) distorts the body. So the
image is resized with its aspect ratio kept, to fit inside (``pad``) or to cover (``crop``) the
model's (height, width), bicubic; converted to float in [0, 1]; normalised with the model's
mean/std; then padded with zeros (which, after normalisation, is the mean colour) or
centre-cropped to exactly (height, width). Built from ``torchvision.transforms.v2`` so the
trainer can put its augmentations in the same pipeline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

# open_clip.constants.OPENAI_DATASET_MEAN / _STD, the defaults of every OpenAI-style CLIP.
CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

RESIZE_MODES = ("pad", "crop")


class AspectResize(v2.Transform):
    """Resize keeping the aspect ratio so the image fits in (``pad``) or covers (``crop``)
    ``(height, width)``; each side is rounded to the nearest pixel, at least 1."""

    def __init__(self, size: tuple[int, int], mode: str = "pad") -> None:
        super().__init__()
        if mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode {mode!r}: one of {', '.join(RESIZE_MODES)}")
        self.height, self.width = int(size[0]), int(size[1])
        self.mode = mode

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        fit = min if self.mode == "pad" else max
        scale = fit(self.height / h, self.width / w)
        return {"size": [max(1, round(h * scale)), max(1, round(w * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(
            TF.resize,
            inpt,
            params["size"],
            interpolation=v2.InterpolationMode.BICUBIC,
            antialias=True,
        )


class CentreFit(v2.Transform):
    """Pad with zeros or crop to exactly ``(height, width)``, centred.

    The offset is ``(target − size) // 2`` on each axis (floor), so an odd margin puts the
    extra pixel at the bottom/right when padding and skips it at the top/left when cropping.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.height, self.width = int(size[0]), int(size[1])

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        h, w = v2.query_size(flat_inputs)
        return {"top": -((self.height - h) // 2), "left": -((self.width - w) // 2)}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        # ``crop`` pads with zeros where the window leaves the image.
        return self._call_kernel(
            TF.crop, inpt, params["top"], params["left"], self.height, self.width
        )


def person_transform(
    image_size: tuple[int, int],
    resize_mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB image -> float32 tensor (3, H, W) for ``image_size = (H, W)``; see the module."""
    return v2.Compose(
        [
            AspectResize(image_size, resize_mode),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(mean), std=list(std)),
            CentreFit(image_size),
            v2.ToPureTensor(),
        ]
    )


def mean_std_of(model: torch.nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The normalisation an open_clip model was trained with (its preprocess config)."""
    from open_clip.model import get_model_preprocess_cfg

    pre = get_model_preprocess_cfg(model)
    return tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD))

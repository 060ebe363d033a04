"""Image transforms of the trainer: the shared evaluation preprocessing, plus IRRA's
augmentations on top of it for training.

Evaluation uses :func:`pedsynth.engines.clip_preprocess.person_transform` — the one definition
the score and memory stages use too (aspect ratio kept, padded or centre-cropped, normalised) —
so a trained model sees at evaluation, and later in those stages, exactly the geometry it was
trained on. Training applies IRRA's train transform to that normalised tensor with
``torchvision.transforms.v2``:

- ``RandomHorizontalFlip(p=0.5)``;
- ``Pad(pad)`` + ``RandomCrop(size)`` as one ``RandomCrop(size, padding=pad)``; the border is 0,
  which after normalisation is the mean colour (IRRA pads black before normalising; either is a
  neutral border, and the mean matches the padding of the shared preprocessing);
- ``RandomErasing(p=erasing, scale=(0.02, 0.4), ratio=(0.3, 3.3), value=0)`` — IRRA's area and
  aspect range, filled with 0 = the mean colour.

v2 draws from torch's global generator; :func:`seeded` runs a transform under a forked one so a
sample's augmentation depends only on its seed and leaves the training RNG untouched.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

from pedsynth.engines.clip_preprocess import CLIP_MEAN, CLIP_STD, person_transform
from pedsynth.schemas.train import AugmentConfig

ImageTransform = Callable[[Image.Image], torch.Tensor]

ERASE_SCALE = (0.02, 0.4)
ERASE_RATIO = (0.3, 3.3)


def eval_transform(
    image_size: tuple[int, int],
    *,
    resize_mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> ImageTransform:
    """PIL image -> normalised (3, H, W) float32 tensor, the shared person-crop preprocessing."""
    return person_transform(tuple(image_size), resize_mode, mean=mean, std=std)


def train_transform(
    image_size: tuple[int, int],
    augment: AugmentConfig,
    *,
    resize_mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> ImageTransform:
    """:func:`eval_transform` followed by the enabled augmentations of ``augment``."""
    height, width = image_size
    steps: list[Callable] = [
        eval_transform(image_size, resize_mode=resize_mode, mean=mean, std=std)
    ]
    if augment.flip:
        steps.append(v2.RandomHorizontalFlip(p=0.5))
    if augment.crop and augment.pad > 0:
        steps.append(v2.RandomCrop((height, width), padding=augment.pad, fill=0))
    if augment.erasing > 0:
        steps.append(
            v2.RandomErasing(p=augment.erasing, scale=ERASE_SCALE, ratio=ERASE_RATIO, value=0)
        )
    return v2.Compose(steps)


def seeded(transform: ImageTransform, image: Image.Image, seed: int) -> torch.Tensor:
    """``transform(image)`` with torch's CPU generator seeded by ``seed`` and restored after.

    Only the CPU generator: ``torch.manual_seed`` would also visit every accelerator backend,
    which costs more than the augmentation itself.
    """
    generator = torch.default_generator
    state = generator.get_state()
    generator.manual_seed(seed)
    try:
        return transform(image)
    finally:
        generator.set_state(state)

"""The run config of the ``train-retriever`` flow (``configs/train-*.yaml``), validated by pydantic.

Defaults are the papers' (IRRA for the model, optimiser and SDM; TextReID for CM-MoCo and
re-ranking; LLM-DA for BSS; MLLM4Text-ReID for NAM). Errors name the key and its value, as the
build config's do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from pedsynth.schemas.base import StrictModel
from pedsynth.schemas.config import load_model_config
from pedsynth.schemas.text import EngineConfig


class ModelConfig(StrictModel):
    """Which open_clip dual encoder to train.

    ``name``: an open_clip architecture (``ViT-B-16``, ``pedsynth-tiny-clip-small``), an
    ``hf-hub:org/repo`` id or ``local-dir:/path``. ``pretrained``: an open_clip tag
    (``openai``), a local ``.safetensors`` file (an open_clip state dict or a train-retriever
    checkpoint; pickles are never loaded), or null for random initialisation. Images keep
    their aspect ratio, padded (``resize_mode: pad``) or centre-cropped (``crop``) to
    ``image_size``, as in the score and memory stages.

    ``text_stream``: ``clip`` (the CLIP text transformer, fine-tuned) or ``bigru``
    (TextReID's: a BiGRU of ``gru_hidden`` units per direction over frozen CLIP word vectors
    looked up in a dictionary built once from the training captions, max-pooled, projected;
    see :mod:`pedsynth.train.text_stream`). The image tower is the same for both.
    """

    name: str = "pedsynth-tiny-clip-small"
    pretrained: str | None = None
    image_size: tuple[int, int] | None = None  # (height, width); default: the architecture's
    resize_mode: Literal["pad", "crop"] = "pad"
    context_length: int = Field(77, ge=8, le=512)
    text_stream: Literal["clip", "bigru"] = "clip"
    gru_hidden: int = Field(512, ge=1)
    gru_layers: int = Field(1, ge=1)


class AugmentConfig(StrictModel):
    """IRRA's image augmentation (torchvision v2, on top of the evaluation preprocessing):
    horizontal flip (p 0.5), ``pad`` pixels + random crop back to size, random erasing."""

    flip: bool = True
    pad: int = Field(10, ge=0)
    crop: bool = True
    erasing: float = Field(0.5, ge=0.0, le=1.0)  # probability of one erased box per image


class LossConfig(StrictModel):
    sdm: bool = True
    sdm_tau: float = Field(0.02, gt=0)
    id: bool = True
    id_weight: float = Field(1.0, ge=0)
    cm_moco: bool = False
    moco_momentum: float = Field(0.999, ge=0, le=1)
    moco_queue: int = Field(2048, ge=1)
    moco_tau: float = Field(0.07, gt=0)
    moco_weight: float = Field(1.0, ge=0)
    # MLLMReID-style re-identification losses on the image features alone: identity
    # cross-entropy (the shared classifier) and batch-hard triplet (Hermans et al.).
    image_id: bool = False
    image_id_weight: float = Field(1.0, ge=0)
    image_triplet: bool = False
    triplet_margin: float = Field(0.3, ge=0)
    triplet_weight: float = Field(1.0, ge=0)

    @model_validator(mode="after")
    def _some_loss(self) -> LossConfig:
        if not (self.sdm or self.id or self.cm_moco or self.image_id or self.image_triplet):
            raise ValueError(
                "no loss is on: enable at least one of sdm, id, cm_moco, image_id, image_triplet"
            )
        return self


class TextConfig(StrictModel):
    """Text-side methods: BSS caption sampling, NAM masking, hard-negative batches."""

    bss: bool = False
    bss_beta: float = Field(0.2, ge=0, le=1)
    nam: bool = False
    nam_p: float = Field(0.15, ge=0, le=1)
    hard_negatives: bool = True  # used only when the data has a hard_negatives column
    hard_negative_fraction: float = Field(0.25, ge=0, lt=1)  # share of each batch


class OptimConfig(StrictModel):
    """IRRA's optimiser: Adam, new heads at ×5 the rate, linear warm-up then cosine decay."""

    lr: float = Field(1e-5, gt=0)
    head_lr_factor: float = Field(5.0, gt=0)
    weight_decay: float = Field(4e-5, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-3, gt=0)
    warmup_epochs: float = Field(5.0, ge=0)
    warmup_factor: float = Field(0.1, gt=0, le=1)
    min_lr: float = Field(0.0, ge=0)
    grad_clip: float | None = Field(None, gt=0)


class EvalConfig(StrictModel):
    batch_size: int = Field(256, ge=1)
    every_epochs: int = Field(1, ge=1)
    rerank: bool = False  # also report k-reciprocal re-ranked metrics
    rerank_k: int = Field(5, ge=1)
    rerank_weight: float = Field(0.05, ge=0)
    # Image→image re-identification (each image a query against the split's other images):
    # i2i_* metrics beside the text→image ones.
    i2i: bool = True
    # RAR: a vision-language engine re-ranks each test query's top 10 (index order kept where
    # its answer cannot be parsed); adds rar_* metrics and the parse-failure rate.
    rerank_model: EngineConfig | None = None


class TrainConfig(StrictModel):
    name: str = "retriever"
    data: str | None = None  # a pedsynth build folder, or FORMAT:PATH of a raw dataset
    out: str = "runs/retriever"
    seed: int = 0
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=2)
    grad_accum: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early (quick runs, benchmarks)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # mixed precision on CUDA; ignored on CPU
    num_workers: int = Field(2, ge=0)
    threads: int | None = Field(None, ge=1)  # torch CPU threads
    shuffle_blocks: int = Field(8, ge=1)  # row groups shuffled together (streaming locality)
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    text: TextConfig = TextConfig()
    optim: OptimConfig = OptimConfig()
    eval: EvalConfig = EvalConfig()


def load_train_config(
    path: str | Path | None = None,
    *,
    data: str | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
) -> TrainConfig:
    """Read a YAML train config, apply ``--set key=value`` and command-line values, validate."""
    return load_model_config(TrainConfig, path, overrides, {"data": data, "out": out})

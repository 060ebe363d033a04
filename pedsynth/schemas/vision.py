"""Run-config sections of the CLIP-based stages: the model, ``score`` and ``memory``.

Kept apart from ``config.py`` so a build without vision stages reads no CLIP settings; the
sections are plain pydantic models (``extra="forbid"``), hashable, and JSON-dumpable into the
stage fingerprints.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pedsynth.schemas.base import StrictModel


class ClipModelConfig(StrictModel):
    """Which CLIP to run and how.

    ``pretrained``: an open_clip tag (``openai``, ``laion2b_s34b_b88k``), an ``hf-hub:org/repo``
    id, a local ``.safetensors`` file, or ``random`` (seeded random init; for the tiny
    architectures of ``engines/tiny_clip.py`` and tests). ``feature_layer`` is the 1-based block
    whose output gives per-token/per-patch features (MLLM4Text-ReID: block 10 of 12); ``None``
    means the third-to-last block output, i.e. ``depth - 2`` in each tower.
    """

    model: str = "ViT-B-16"
    pretrained: str = "openai"
    image_size: tuple[int, int] = (384, 128)  # (height, width): person crops are tall
    resize_mode: Literal["pad", "crop"] = "pad"  # keep the aspect ratio, then pad or crop
    feature_layer: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPU, else fp32
    batch_size: int = Field(64, gt=0)
    seed: int = 0  # random init only

    @model_validator(mode="after")
    def _sizes_positive(self) -> ClipModelConfig:
        if min(self.image_size) < 1:
            raise ValueError(f"image_size must be positive (height, width), got {self.image_size}")
        return self


class ScoreConfig(StrictModel):
    """The ``score`` stage: CLIP image–text score and per-token noise levels for every pair."""

    clip: ClipModelConfig = ClipModelConfig()
    min_clip_score: float | None = Field(None, ge=-1.0, le=1.0)  # below → rejected


class MemoryConfig(StrictModel):
    """The ``memory`` stage (RAR): faiss HNSW indexes, near-duplicates and hard negatives."""

    clip: ClipModelConfig = ClipModelConfig()
    hnsw_m: int = Field(64, ge=4, le=512)
    ef_construction: int = Field(200, ge=8)
    ef_search: int = Field(128, ge=8)
    duplicate_threshold: float = Field(0.97, gt=0.0, le=1.0)  # image–image cosine
    duplicate_neighbours: int = Field(16, ge=1)  # neighbours checked per image
    dedupe: bool = True  # False: report duplicates only, remove nothing
    hard_negatives_k: int = Field(10, ge=0)
    recall_queries: int = Field(1_000, ge=1)  # captions sampled to measure HNSW recall@10

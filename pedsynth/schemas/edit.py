"""The config section of the edit stage (Diverse Person): what to edit, how, and how the
caption is re-annotated.

``diffusion`` addresses the diffusion model like every other engine (a model id, a local folder
or ``tiny-random:NAME``, see :mod:`pedsynth.engines.diffusion`); ``masks`` chooses where the
region mask comes from; ``reannotate`` chooses the re-annotator: ``substitute`` (replace the
attribute phrase in the original caption, no model; the offline default) or ``llm`` (a text
engine rewrites the caption through the shared regenerate loop).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pedsynth.schemas.base import StrictModel
from pedsynth.schemas.text import EmbedderConfig, EngineConfig
from pedsynth.schemas.vision import ClipModelConfig

DiffusionMethod = Literal["inpaint", "paint-by-example", "instruct-pix2pix"]
MaskBackend = Literal["procedural", "segformer", "box"]


class DiffusionConfig(StrictModel):
    """One diffusers pipeline. ``method`` picks the pipeline class: ``inpaint``
    (``StableDiffusionInpaintPipeline``), ``paint-by-example`` (``PaintByExamplePipeline``:
    inpainting conditioned on a reference garment image, no prompt), ``instruct-pix2pix``
    (``StableDiffusionInstructPix2PixPipeline``)."""

    method: DiffusionMethod = "inpaint"
    model: str = "tiny-random:sd-inpaint"
    revision: str | None = None
    device: str = "auto"
    precision: str = "auto"  # fp16/bf16 on a GPU, fp32 on the CPU
    steps: int = Field(20, ge=1, le=200)
    guidance_scale: float = Field(7.5, ge=0)
    strength: float = Field(1.0, gt=0, le=1)  # inpaint: how far from the original
    image_guidance_scale: float = Field(1.5, ge=0)  # instruct-pix2pix
    height: int = Field(512, ge=8)  # the size the crop is padded and resized to (multiple of 8)
    width: int = Field(256, ge=8)
    batch_size: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _multiple_of_eight(self) -> DiffusionConfig:
        if self.height % 8 or self.width % 8:
            raise ValueError(
                f"height and width must be multiples of 8, got {self.height}x{self.width}"
            )
        return self

    @property
    def model_id(self) -> str:
        return f"diffusers:{self.model}@{self.revision or 'main'}"


class MaskConfig(StrictModel):
    """``procedural``: the benchmark's exact label maps (``labels/`` beside ``imgs/``), with the
    proportional body box for images that have none (``fallback: box``) or a reject
    (``fallback: none``); ``segformer``: a human-parsing SegFormer (``model``: a hub id or a
    local folder, e.g. ``mattmdjaga/segformer_b2_clothes``); ``box``: the proportional body box
    only."""

    backend: MaskBackend = "procedural"
    root: str | None = None  # the procedural benchmark folder (holds labels.json and labels/)
    fallback: Literal["box", "none"] = "box"
    model: str | None = None  # segformer: the clothes-parsing checkpoint
    revision: str | None = None
    device: str = "auto"
    dilate_px: int = Field(2, ge=0, le=32)  # grown this much before editing and compositing
    min_pixels: int = Field(12, ge=1)  # a smaller mask is empty: the region is not visible

    @model_validator(mode="after")
    def _segformer_needs_model(self) -> MaskConfig:
        if self.backend == "segformer" and self.model is None:
            raise ValueError("masks.backend = 'segformer' needs masks.model")
        return self


class ReannotateConfig(StrictModel):
    method: Literal["substitute", "llm"] = "substitute"
    engine: EngineConfig | None = None  # the text engine of ``llm``
    max_retries: int = Field(2, ge=0, le=10)
    alpha: float | None = Field(None, ge=0, le=1)  # embedding faithfulness to the edited parent
    embedder: EmbedderConfig = EmbedderConfig()

    @model_validator(mode="after")
    def _llm_needs_engine(self) -> ReannotateConfig:
        if self.method == "llm" and self.engine is None:
            raise ValueError("reannotate.method = 'llm' needs reannotate.engine")
        return self


class EditSpecConfig(StrictModel):
    region: str
    kind: Literal["colour", "type"] = "colour"
    to: str


class EditConfig(StrictModel):
    """The edit stage: ``share`` of the images (of ``splits``) get ``edits_per_image`` edits
    each, sampled per (seed, image_id) from the attribute bank over ``regions`` and ``kinds``.
    ``identity: new`` gives every edited image a new person id (clothing is how a person is
    described), ``keep`` keeps the parent's."""

    share: float = Field(0.5, ge=0, le=1)
    edits_per_image: int = Field(1, ge=1, le=8)
    regions: list[Literal["hair", "upper", "lower", "shoes", "bag"]] = Field(
        default_factory=lambda: ["upper", "lower", "shoes", "bag", "hair"]
    )
    kinds: list[Literal["colour", "type"]] = Field(default_factory=lambda: ["colour"])
    splits: list[Literal["train", "val", "test"]] = Field(default_factory=lambda: ["train"])
    identity: Literal["new", "keep"] = "new"
    sources: list[str] = Field(default_factory=lambda: ["original"])  # parent caption sources
    jpeg_quality: int = Field(95, ge=50, le=100)
    # Explicit edits to draw from instead of the bank: {region, kind, to}; a value the bank does
    # not know is a reject (unknown_attribute) of each row it is drawn for.
    specs: list[EditSpecConfig] | None = None
    diffusion: DiffusionConfig = DiffusionConfig()
    masks: MaskConfig = MaskConfig()
    reannotate: ReannotateConfig = ReannotateConfig()
    # The CLIP check of the re-annotation (the score stage's engine config): a new caption must
    # score higher with the edited image than with the original by more than ``clip_margin``,
    # else it is regenerated and finally rejected (clip_prefers_original). None: no check.
    clip: ClipModelConfig | None = None
    clip_margin: float = Field(0.0, ge=0, le=2)
    # The reference bank of ``paint-by-example`` (a folder with references.json, as
    # ``pedsynth sample-data`` writes under BENCH/references).
    references: str | None = None

    @model_validator(mode="after")
    def _references_for_paint_by_example(self) -> EditConfig:
        if self.diffusion.method == "paint-by-example" and self.references is None:
            raise ValueError("diffusion.method = 'paint-by-example' needs edit.references")
        return self

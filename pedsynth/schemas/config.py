"""Run configs: YAML files in ``configs/`` validated by pydantic.

Errors name the bad key and the value it had, e.g.
``configs/x.yaml: ingest.max_pixels = 'lots': Input should be a valid integer``.
Stage sections that are absent (``None``) are skipped by the flow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pedsynth.schemas.base import StrictModel
from pedsynth.schemas.edit import EditConfig
from pedsynth.schemas.text import CaptionConfig, FaithfulnessConfig, RewriteConfig
from pedsynth.schemas.vision import MemoryConfig, ScoreConfig

SourceFormat = Literal["cuhk-pedes", "icfg-pedes", "rstpreid", "folder", "shards", "procedural"]
SOURCE_FORMATS: tuple[str, ...] = SourceFormat.__args__  # type: ignore[attr-defined]


M = TypeVar("M", bound=BaseModel)


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the key and the value."""


class SourceConfig(StrictModel):
    """One input dataset.

    ``folder``: ``layout: per-identity`` takes each sub-folder as one identity;
    ``per-image`` makes every image its own identity (LUPerson-style, unlabelled).
    ``procedural``: the built-in synthetic benchmark, generated into ``path`` when absent.
    """

    format: SourceFormat
    path: str
    name: str | None = None  # prefix of image and person ids; defaults to the format
    split: Literal["train", "val", "test"] = "train"  # folder sources only
    layout: Literal["per-identity", "per-image"] = "per-identity"  # folder sources only
    identities: int = Field(200, ge=3)  # procedural only
    images_per_identity: int = Field(4, ge=1)  # procedural only
    seed: int = 0  # procedural only

    @property
    def label(self) -> str:
        return self.name or self.format

    @classmethod
    def parse(cls, spec: str) -> SourceConfig:
        """Parse the command-line form ``FORMAT:PATH``."""
        fmt, sep, path = spec.partition(":")
        if not sep or not path:
            raise ConfigError(f"--source {spec!r}: expected FORMAT:PATH, e.g. cuhk-pedes:data/CUHK")
        if fmt not in SOURCE_FORMATS:
            raise ConfigError(
                f"--source {spec!r}: unknown format {fmt!r}; one of {', '.join(SOURCE_FORMATS)}"
            )
        return cls(format=fmt, path=path)


class IngestConfig(StrictModel):
    """Limits that decide which images and captions are rejected, and what is kept of them."""

    max_image_bytes: int = Field(50_000_000, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)
    min_side: int = Field(8, ge=1)
    max_caption_chars: int = Field(2_000, gt=0)
    convert_format: Literal["jpeg", "png"] = "jpeg"  # for inputs that are not JPEG already
    jpeg_quality: int = Field(95, ge=50, le=100)
    # Remove EXIF (GPS included), XMP, comments and thumbnails from stored images, losslessly
    # for JPEGs; false stores RGB/grey JPEG bytes as read. See pedsynth.tasks.image_metadata.
    strip_metadata: bool = True


class WriteConfig(StrictModel):
    card_examples: int = Field(4, ge=0)
    card_plots: bool = True  # False: no histograms, and matplotlib is never imported
    # Versions kept under OUT/versions/ (latest's included); not part of the fingerprint.
    keep_versions: int = Field(3, ge=1)


_MEMORY_UNITS = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _bytes(value: Any) -> Any:
    """``8GiB``, ``512 MiB`` or a plain number of bytes."""
    if not isinstance(value, str):
        return value
    text = value.strip().lower().replace(" ", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number) :]
    if unit not in _MEMORY_UNITS or not number.replace(".", "", 1).isdigit():
        raise ValueError(f"expected bytes, e.g. 8GiB or 512MiB, got {value!r}")
    return int(float(number) * _MEMORY_UNITS[unit])


class RayStageResources(StrictModel):
    """What one task of a stage asks of Ray; Ray starts it only where these are free."""

    num_cpus: float = Field(1, ge=0)
    # None: what the stage's engines need (vLLM: tensor_parallel_size GPUs, transformers on
    # cuda: 1, anything else: 0), so CPU stages never hold a GPU.
    num_gpus: float | None = Field(None, ge=0)
    memory: Annotated[int | None, BeforeValidator(_bytes), Field(gt=0)] = None  # bytes or 8GiB


class RayConfig(StrictModel):
    """``runner: ray``: where the Ray cluster is and what each stage's tasks ask of it.

    ``address`` None starts a local Ray instance for the build (``num_cpus``, default the
    build's ``workers``, and ``num_gpus``); ``auto`` joins the cluster this machine is part of;
    ``ray://HOST:10001`` connects through Ray Client. ``stages`` keys are stage names (and
    ``catalog``); a stage not named asks for one CPU and the GPUs of its engines.
    """

    address: str | None = None
    num_cpus: int | None = Field(None, ge=1)  # local instance only
    num_gpus: int | None = Field(None, ge=0)  # local instance only
    max_retries: int = Field(3, ge=0)  # Ray reruns of a task whose worker process died
    stages: dict[str, RayStageResources] = Field(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: dict[str, RayStageResources]) -> dict[str, RayStageResources]:
        from pedsynth.tasks.stages import STAGES

        known = ["catalog", *(s.name for s in STAGES)]
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise ValueError(f"no stage named {unknown[0]!r}; known: {', '.join(known)}")
        return value


class StorageConfig(StrictModel):
    """How a build reaches an ``out`` or a source given as a URL (``s3://bucket/x``): stages
    work in a local copy under ``cache_dir`` (default ``$PEDSYNTH_CACHE_DIR`` or
    ``~/.cache/pedsynth/stores``) that is kept in step with the store (``pedsynth/storage.py``).
    Credentials come from the environment (``AWS_*``) or the Prefect block named here, never
    from this file."""

    cache_dir: str | None = None
    credentials_block: str | None = None  # e.g. "aws-credentials/datasets"


class BuildConfig(StrictModel):
    """A build: its sources, where it goes, how it runs, and one section per stage.

    A stage with an optional section (caption, rewrite, ...) runs when its section is present;
    ingest and write always run. ``runner`` chooses the Prefect task runner (``thread``: a
    bounded thread pool of ``workers`` threads; ``ray``: prefect-ray's RayTaskRunner, set up
    by the ``ray`` section).
    """

    name: str = "pedsynth"
    sources: list[SourceConfig] = Field(default_factory=list)
    out: str = "out/pedsynth"  # a local folder or an fsspec URL (s3://, gs://, memory://)
    storage: StorageConfig = StorageConfig()
    shard_rows: Annotated[int, Field(gt=0)] = 1_000
    runner: Literal["thread", "ray"] = "thread"
    workers: Annotated[int, Field(ge=1, le=256)] = 4
    ray: RayConfig = RayConfig()  # read by runner: ray only
    seed: int = 0
    # A model stage whose share of failed requests (engine or transport failures, not quality
    # rejects) exceeds this fails the build; below it, the build warns.
    max_failure_rate: float = Field(0.05, ge=0, le=1)
    ingest: IngestConfig = IngestConfig()
    caption: CaptionConfig | None = None
    rewrite: RewriteConfig | None = None
    edit: EditConfig | None = None
    faithfulness: FaithfulnessConfig | None = None
    score: ScoreConfig | None = None
    memory: MemoryConfig | None = None
    write: WriteConfig = WriteConfig()

    @model_validator(mode="after")
    def _unique_source_labels(self) -> BuildConfig:
        labels = [s.label for s in self.sources]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"two sources share the name {dupes[0]!r}; give one a distinct `name`")
        return self


def _format_validation_error(err: ValidationError, data: dict, origin: str) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        value = e.get("input")
        shown = "" if isinstance(value, dict) or key == "<root>" else f" = {value!r}"
        lines.append(f"{origin}: {key}{shown}: {e['msg']}")
    return "\n".join(lines)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested mappings; a number indexes a list (``sources.0.path``)."""
    keys = dotted.split(".")
    node: Any = data
    for depth, k in enumerate(keys):
        last = depth == len(keys) - 1
        if isinstance(node, list):
            if not k.isdigit() or int(k) >= len(node):
                raise ConfigError(f"--set {dotted}: no item {k!r} in a list of {len(node)}")
            if last:
                node[int(k)] = value
            else:
                node = node[int(k)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {keys[depth - 1]!r} is not a section")
        if last:
            node[k] = value
        else:
            if node.get(k) is None:
                node[k] = {}
            node = node[k]


def optional_sections() -> list[str]:
    """The config sections whose presence turns a stage on (absent: the stage is skipped)."""
    return [name for name, info in BuildConfig.model_fields.items() if info.default is None]


def apply_overrides(
    data: dict, overrides: list[str], switch_sections: tuple[str, ...] | list[str] = ()
) -> dict:
    """Apply ``key.sub=value`` strings; values are parsed as YAML scalars (``3``, ``true``).

    A key inside one of ``switch_sections`` (sections whose presence turns a stage on) that the
    config does not have is refused rather than turning the stage on by the side door;
    ``--set 'memory={}'`` turns it on with its defaults.
    """
    sections = tuple(switch_sections)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        top, dot, _ = key.partition(".")
        if dot and top in sections and data.get(top) is None:
            raise ConfigError(
                f"--set {key}: the {top} stage is off in this config (no `{top}:` section); "
                f"add a `{top}:` section to the config file, or pass --set '{top}={{}}' first "
                "to turn it on with its defaults"
            )
        _set_dotted(data, key, yaml.safe_load(raw) if raw.strip() else None)
    return data


def read_config_file(path: str | Path | None) -> dict[str, Any]:
    """The mapping in a YAML config file (empty for ``None``), or a ConfigError saying why not."""
    if path is None:
        return {}
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(loaded).__name__}")
    return loaded or {}


def load_model_config(
    model: type[M],
    path: str | Path | None,
    overrides: list[str] | None,
    values: dict[str, Any],
    switch_sections: tuple[str, ...] | list[str] = (),
) -> M:
    """Read a YAML file, apply ``--set`` overrides, then command-line ``values`` (those not
    None), and validate into ``model``; a ConfigError names every bad key and its value."""
    data = read_config_file(path)
    origin = "config" if path is None else str(path)
    apply_overrides(data, list(overrides or []), switch_sections)
    data.update({k: v for k, v in values.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data, origin)) from None


def load_config(
    path: str | Path | None = None,
    *,
    sources: list[str] | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
) -> BuildConfig:
    """Read a YAML config, apply command-line values on top, and validate the result."""
    parsed = [SourceConfig.parse(s).model_dump(exclude_defaults=True) for s in sources or []]
    values = {"sources": parsed or None, "out": out}
    return load_model_config(BuildConfig, path, overrides, values, optional_sections())

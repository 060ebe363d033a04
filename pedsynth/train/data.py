"""Training and evaluation data, the text side: pedsynth shards (or a raw CUHK-PEDES/ICFG/RSTP
folder) indexed into a :class:`SplitIndex`, and image bytes read on demand.

Only the text side is held in memory (captions, identities, stored tokens and noise levels,
hard negatives: a few hundred bytes a caption). Images stay in the Parquet files and are read
one row group at a time, on demand, by the DataLoader workers (:class:`ImageReader`, a small
per-worker cache of the row groups in use). The PyTorch datasets and the batch sampler built on
this index are in :mod:`pedsynth.train.datasets`.
"""

from __future__ import annotations

import io
from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, UnidentifiedImageError

from pedsynth.schemas.manifest import resolve_build

TEXT_COLUMNS = [
    "image_id",
    "person_id",
    "split",
    "caption",
    "caption_source",
    "pair_id",
    "parent_id",
    "tokens",
    "token_noise",
    "hard_negatives",
]
FILE_BLOCK_ROWS = 1_000  # raw datasets: images per "block" for the shuffling windows
ROW_GROUP_CACHE = 16
BASE_SOURCES = ("original", "edit")  # a training sample's own caption; the rest feed BSS


class DataError(ValueError):
    """The data cannot be used for training; the message says which file or split and why."""


@dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a Parquet row (file, row group, row) or a file on disk."""

    file: str
    row_group: int = -1  # -1: ``file`` is the image itself
    row: int = -1

    @property
    def block(self) -> tuple[str, int]:
        return (self.file, self.row_group)


@dataclass
class SplitIndex:
    """The text side of one split, plus where each of its images is.

    ``samples`` are training units: one per base caption (or per caption of an image that
    has none). ``augmented[image]`` lists the other captions of an image (rewrite / mllm rows
    of the same image), BSS's pool. Base captions are :data:`BASE_SOURCES`: the originals, and
    the re-annotated captions of an edited image (an edit row has a new ``image_id``: a new
    image whose own caption it is, and a rewrite of it is that image's augmented caption).
    """

    name: str
    image_ids: list[str] = field(default_factory=list)
    image_refs: list[ImageRef] = field(default_factory=list)
    image_person: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    caption_pair: list[str | None] = field(default_factory=list)  # pair_id (shards only)
    caption_noise: list[np.ndarray | None] = field(default_factory=list)  # stored token_noise
    caption_tokens: list[list[str] | None] = field(default_factory=list)  # stored tokens
    caption_source: list[str] = field(default_factory=list)
    caption_original: list[bool] = field(default_factory=list)
    hard_negatives: list[list[int]] = field(default_factory=list)  # per caption: image indices
    samples: list[int] = field(default_factory=list)  # caption indices
    augmented: dict[int, list[int]] = field(default_factory=dict)  # image → caption indices

    @property
    def persons(self) -> list[str]:
        return sorted(set(self.image_person))

    def query_captions(self) -> list[int]:
        """Evaluation queries: the original captions (all captions when there are none)."""
        originals = [i for i, o in enumerate(self.caption_original) if o]
        return originals or list(range(len(self.captions)))


def _finish(index: SplitIndex) -> SplitIndex:
    """Derive samples and BSS pools from the caption table."""
    by_image: dict[int, list[int]] = defaultdict(list)
    for c, image in enumerate(index.caption_image):
        by_image[image].append(c)
    for image, captions in by_image.items():
        base = [c for c in captions if index.caption_source[c] in BASE_SOURCES]
        augmented = [c for c in captions if index.caption_source[c] not in BASE_SOURCES]
        index.samples.extend(base or augmented)
        if base and augmented:
            index.augmented[image] = augmented
    index.samples.sort()
    return index


def shard_files(data_dir: str | Path, split: str) -> list[Path]:
    """``OUT/data/{split}-*.parquet`` of a pedsynth build (``data_dir`` may be OUT or OUT/data)."""
    root = resolve_build(data_dir)  # OUT: the version `latest` names
    folder = root / "data" if (root / "data").is_dir() else root
    return sorted(folder.glob(f"{split}-*.parquet"))


def index_shards(data_dir: str | Path, split: str) -> SplitIndex:
    """Read the text columns of one split's shards (not the images) into a :class:`SplitIndex`."""
    files = shard_files(data_dir, split)
    index = SplitIndex(name=split)
    if not files:
        return index
    image_slot: dict[str, int] = {}
    pending_negatives: list[list[str] | None] = []
    for path in files:
        parquet = pq.ParquetFile(path)
        names = set(parquet.schema_arrow.names)
        missing = {"image", "image_id", "person_id", "caption"} - names
        if missing:
            raise DataError(f"{path}: not a pedsynth pairs shard (no {', '.join(sorted(missing))})")
        columns = [c for c in TEXT_COLUMNS if c in names]
        for group in range(parquet.num_row_groups):
            rows = parquet.read_row_group(group, columns=columns).to_pylist()
            for row_number, row in enumerate(rows):
                caption = row.get("caption")
                if not isinstance(caption, str) or not caption.strip():
                    continue  # uncaptioned rows (written only by partial builds) teach nothing
                image = image_slot.get(row["image_id"])
                if image is None:
                    image = image_slot[row["image_id"]] = len(index.image_ids)
                    index.image_ids.append(row["image_id"])
                    index.image_refs.append(ImageRef(str(path), group, row_number))
                    index.image_person.append(row["person_id"])
                index.captions.append(caption)
                index.caption_image.append(image)
                index.caption_pair.append(row.get("pair_id"))
                noise = row.get("token_noise")
                index.caption_noise.append(
                    None if noise is None else np.asarray(noise, dtype=np.float32)
                )
                index.caption_tokens.append(row.get("tokens"))
                source = row.get("caption_source") or "original"
                index.caption_source.append(source)
                index.caption_original.append(source == "original")
                pending_negatives.append(row.get("hard_negatives"))
    index.hard_negatives = [
        [image_slot[i] for i in (negs or []) if i in image_slot] for negs in pending_negatives
    ]
    return _finish(index)


def index_raw(source: Any, split: str) -> tuple[SplitIndex, int]:
    """Index one split of a raw dataset through the ingest catalogue readers.

    ``source`` is a :class:`~pedsynth.schemas.config.SourceConfig`. Returns the index and the
    number of catalogue rejects (bad records, non-text captions), which the caller reports.
    """
    from pedsynth.tasks import ingest

    catalog, rejects = ingest.read_catalog(source)
    index = SplitIndex(name=split)
    for entry in catalog.to_pylist():
        if entry["split"] != split:
            continue
        captions = [c for c in entry["captions"] or [] if isinstance(c, str) and c.strip()]
        if not captions:
            continue
        image = len(index.image_ids)
        index.image_ids.append(entry["image_id"])
        index.image_refs.append(ImageRef(entry["image_path"]))
        index.image_person.append(entry["person_id"])
        for caption in captions:
            index.captions.append(ingest.normalize_caption(caption))
            index.caption_image.append(image)
            index.caption_pair.append(None)
            index.caption_noise.append(None)
            index.caption_tokens.append(None)
            index.caption_source.append("original")
            index.caption_original.append(True)
            index.hard_negatives.append([])
    return _finish(index), rejects.num_rows


def load_split(data: str, split: str) -> tuple[SplitIndex, int]:
    """Index ``split`` of ``data``: a pedsynth build folder, or ``FORMAT:PATH`` of a raw set."""
    from pedsynth.schemas.config import SOURCE_FORMATS, SourceConfig

    fmt, sep, _ = data.partition(":")
    if sep and fmt in SOURCE_FORMATS:
        return index_raw(SourceConfig.parse(data), split)
    if not Path(data).exists():
        raise DataError(f"data {data!r} does not exist (a pedsynth build folder or FORMAT:PATH)")
    if not shard_files(data, "train") and not any(shard_files(data, s) for s in ("val", "test")):
        raise DataError(f"{data}: no data/{{split}}-*.parquet shards (is it a pedsynth build?)")
    return index_shards(data, split), 0


# --------------------------------------------------------------------------------------------
# images


class ImageReader:
    """Reads image bytes by :class:`ImageRef`, caching a few Parquet row groups per process."""

    def __init__(self, cache_groups: int = ROW_GROUP_CACHE) -> None:
        self.cache_groups = cache_groups
        self._groups: OrderedDict[tuple[str, int], list[dict | None]] = OrderedDict()

    def __getstate__(self) -> dict:  # workers start with an empty cache
        return {"cache_groups": self.cache_groups}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["cache_groups"])

    def read(self, ref: ImageRef) -> bytes:
        if ref.row_group < 0:
            try:
                return Path(ref.file).read_bytes()
            except OSError as exc:
                raise DataError(f"{ref.file}: cannot read image: {exc}") from None
        group = self._groups.get(ref.block)
        if group is None:
            table = pq.ParquetFile(ref.file).read_row_group(ref.row_group, columns=["image"])
            group = table.column("image").to_pylist()
            self._groups[ref.block] = group
            if len(self._groups) > self.cache_groups:
                self._groups.popitem(last=False)
        else:
            self._groups.move_to_end(ref.block)
        cell = group[ref.row]
        if not cell or not cell.get("bytes"):
            raise DataError(f"{ref.file} row group {ref.row_group} row {ref.row}: no image bytes")
        return cell["bytes"]


def decode_image(data: bytes, where: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot decode image: {exc}") from None

"""Training and evaluation data: pedsynth shards (or a raw CUHK-PEDES/ICFG/RSTP folder) as
PyTorch datasets.

Only the text side is held in memory (captions, identities, token noise, hard negatives: a few
hundred bytes a caption). Images stay in the Parquet files and are read one row group at a
time, on demand, by the DataLoader workers, which also decode and augment them; a small
per-worker cache keeps the row groups in use. The training order shuffles row groups in
windows of ``shuffle_blocks`` so each worker touches few row groups at a time.

Every random choice for a sample (augmentation, BSS caption, NAM mask) comes from a generator
seeded by (seed, epoch, sample): batches do not depend on the worker count, and a resumed run
sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from pedsynth.train.text_aug import choose_caption, nam_mask, nam_probabilities

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
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

    ``samples`` are training units: one per original caption (or per caption of an image
    that has no original). ``augmented[image]`` lists the non-original captions of an image
    (rewrite / mllm / edit rows of the same image), BSS's pool.
    """

    name: str
    image_ids: list[str] = field(default_factory=list)
    image_refs: list[ImageRef] = field(default_factory=list)
    image_person: list[str] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    caption_image: list[int] = field(default_factory=list)
    caption_noise: list[np.ndarray | None] = field(default_factory=list)
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
        originals = [c for c in captions if index.caption_original[c]]
        augmented = [c for c in captions if not index.caption_original[c]]
        index.samples.extend(originals or augmented)
        if originals and augmented:
            index.augmented[image] = augmented
    index.samples.sort()
    return index


def shard_files(data_dir: str | Path, split: str) -> list[Path]:
    """``OUT/data/{split}-*.parquet`` of a pedsynth build (``data_dir`` may be OUT or OUT/data)."""
    root = Path(data_dir)
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
                noise = row.get("token_noise")
                index.caption_noise.append(
                    None if noise is None else np.asarray(noise, dtype=np.float32)
                )
                index.caption_original.append(row.get("caption_source") in (None, "original"))
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
            index.caption_noise.append(None)
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


def to_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """Resize to (height, width) bicubic, scale to [0, 1], CLIP-normalise: (3, H, W)."""
    height, width = size
    resized = img.resize((width, height), Image.Resampling.BICUBIC)
    array = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (array - mean) / std


def augment(
    image: torch.Tensor,
    rng: np.random.Generator,
    *,
    flip: bool = True,
    pad: int = 10,
    crop: bool = True,
    erasing: float = 0.5,
) -> torch.Tensor:
    """IRRA's train transform on a normalised tensor: flip, zero-pad + random crop back to
    size, random erasing (area 2–40 %, aspect 0.3–3.3, filled with 0 = the mean colour)."""
    _, height, width = image.shape
    if flip and rng.random() < 0.5:
        image = image.flip(-1)
    if crop and pad > 0:
        # Padding with 0 after normalisation pads with the mean colour; IRRA pads black
        # before normalising. Either is a neutral border; the mean keeps batch statistics.
        padded = torch.nn.functional.pad(image, (pad, pad, pad, pad))
        top = int(rng.integers(0, 2 * pad + 1))
        left = int(rng.integers(0, 2 * pad + 1))
        image = padded[:, top : top + height, left : left + width]
    if erasing > 0 and rng.random() < erasing:
        for _ in range(10):
            area = height * width * rng.uniform(0.02, 0.4)
            aspect = math.exp(rng.uniform(math.log(0.3), math.log(1 / 0.3)))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < height and w < width:
                top = int(rng.integers(0, height - h + 1))
                left = int(rng.integers(0, width - w + 1))
                image = image.clone()
                image[:, top : top + h, left : left + w] = 0.0
                break
    return image


# --------------------------------------------------------------------------------------------
# datasets


def _token_body(tokens: torch.Tensor, eot_token: int) -> tuple[int, int]:
    """(first, last) positions of the text tokens between SOT and EOT in a tokenised row."""
    positions = torch.nonzero(tokens == eot_token).flatten()
    end = int(positions[0]) if len(positions) else len(tokens)
    return 1, end


class TrainDataset(Dataset):
    """Training items: an augmented image, its (BSS-chosen, NAM-masked) caption, identity.

    Indexed by ``(epoch, sample)`` tuples produced by :class:`BlockShuffleBatchSampler`.
    Returns a dict: ``image`` (3, H, W), ``text`` (L,) clean tokens, ``masked_text`` (L,)
    the NAM-corrupted tokens (equal to ``text`` when NAM is off), ``label`` (identity index),
    ``augmented`` (whether BSS picked an augmented caption).
    """

    def __init__(
        self,
        index: SplitIndex,
        tokenizer: Any,
        *,
        image_size: tuple[int, int],
        seed: int,
        labels: dict[str, int],
        augment_cfg: Any,
        text_cfg: Any,
    ) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.image_size = tuple(image_size)
        self.seed = seed
        self.labels = labels
        self.augment_cfg = augment_cfg
        self.text_cfg = text_cfg
        self.reader = ImageReader()
        self.eot_token = int(tokenizer("")[0].max())  # SOT/EOT are the largest ids

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, caption = key
        rng = np.random.default_rng([self.seed, epoch, caption])
        image_index = self.index.caption_image[caption]
        ref = self.index.image_refs[image_index]
        img = decode_image(self.reader.read(ref), self.index.image_ids[image_index])
        image = to_tensor(img, self.image_size)
        a = self.augment_cfg
        image = augment(image, rng, flip=a.flip, pad=a.pad, crop=a.crop, erasing=a.erasing)

        chosen, used_augmented = caption, False
        augmented = self.index.augmented.get(image_index, [])
        if self.text_cfg.bss and augmented:
            chosen, used_augmented = choose_caption(
                [caption], augmented, self.text_cfg.bss_beta, rng
            )
        text = self.tokenizer([self.index.captions[chosen]])[0]
        masked = text
        if self.text_cfg.nam:
            first, end = _token_body(text, self.eot_token)
            body = text[first:end].numpy()
            probabilities = nam_probabilities(
                self.index.caption_noise[chosen], len(body), self.text_cfg.nam_p
            )
            new_body, _ = nam_mask(body, probabilities, rng)
            masked = text.clone()
            masked[first:end] = torch.from_numpy(new_body)
        return {
            "image": image,
            "text": text,
            "masked_text": masked,
            "label": self.labels[self.index.image_person[image_index]],
            "augmented": used_augmented,
        }


class BlockShuffleBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of ``(epoch, caption)`` keys for :class:`TrainDataset`.

    Shuffles the storage blocks (row groups), then samples within windows of
    ``shuffle_blocks`` blocks, so a worker reads few row groups at a time. When
    ``hard_negative_fraction`` > 0, that share of each batch is filled with captions of the
    hard-negative images (other identities' look-alikes) of the batch's samples. The last
    incomplete batch is dropped (SDM needs full batches; it changes between epochs).
    """

    def __init__(
        self,
        index: SplitIndex,
        batch_size: int,
        *,
        seed: int,
        shuffle_blocks: int = 8,
        hard_negative_fraction: float = 0.0,
    ) -> None:
        if len(index.samples) < batch_size:
            raise DataError(
                f"split {index.name!r} has {len(index.samples)} training samples, fewer than "
                f"one batch ({batch_size}); lower batch_size"
            )
        self.index = index
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle_blocks = shuffle_blocks
        self.epoch = 0
        self.hard_slots = int(round(batch_size * hard_negative_fraction))
        if not any(index.hard_negatives[c] for c in index.samples):
            self.hard_slots = 0
        self.captions_of_image: dict[int, list[int]] = defaultdict(list)
        for c in index.samples:
            self.captions_of_image[index.caption_image[c]].append(c)
        blocks: dict[tuple[str, int], list[int]] = defaultdict(list)
        for position, c in enumerate(index.samples):
            ref = index.image_refs[index.caption_image[c]]
            block = ref.block if ref.row_group >= 0 else ("", position // FILE_BLOCK_ROWS)
            blocks[block].append(c)
        self.blocks = [blocks[k] for k in sorted(blocks)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> list[int]:
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        blocks = [self.blocks[i] for i in rng.permutation(len(self.blocks))]
        order: list[int] = []
        for start in range(0, len(blocks), self.shuffle_blocks):
            window = [c for block in blocks[start : start + self.shuffle_blocks] for c in block]
            order.extend(window[i] for i in rng.permutation(len(window)))
        return order

    def __len__(self) -> int:
        return len(self.index.samples) // (self.batch_size - self.hard_slots)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        rng = np.random.default_rng([self.seed, self.epoch, 11])
        per_batch = self.batch_size - self.hard_slots
        for start in range(0, len(order) - per_batch + 1, per_batch):
            batch = order[start : start + per_batch]
            batch += self._hard_negatives(batch, rng)
            yield [(self.epoch, c) for c in batch]

    def _hard_negatives(self, batch: list[int], rng: np.random.Generator) -> list[int]:
        extra: list[int] = []
        candidates = [c for c in batch if self.index.hard_negatives[c]]
        for c in candidates:
            if len(extra) == self.hard_slots:
                break
            negatives = [i for i in self.index.hard_negatives[c] if i in self.captions_of_image]
            if negatives:
                image = negatives[int(rng.integers(len(negatives)))]
                pool = self.captions_of_image[image]
                extra.append(pool[int(rng.integers(len(pool)))])
        while len(extra) < self.hard_slots:  # too few hard negatives: random samples instead
            extra.append(self.index.samples[int(rng.integers(len(self.index.samples)))])
        return extra


class GalleryDataset(Dataset):
    """Evaluation images (no augmentation), one per distinct image of the split."""

    def __init__(self, index: SplitIndex, image_size: tuple[int, int]) -> None:
        self.index = index
        self.image_size = tuple(image_size)
        self.reader = ImageReader()

    def __len__(self) -> int:
        return len(self.index.image_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = decode_image(self.reader.read(self.index.image_refs[i]), self.index.image_ids[i])
        return to_tensor(img, self.image_size)


def tokenize_all(tokenizer: Any, texts: Sequence[str], batch: int = 1024) -> torch.Tensor:
    return torch.cat([tokenizer(list(texts[i : i + batch])) for i in range(0, len(texts), batch)])

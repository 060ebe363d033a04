"""PyTorch datasets and the batch sampler over a :class:`~pedsynth.train.data.SplitIndex`, and
the count of what training drew from the shards.

Every random choice for a sample (image augmentation, BSS caption, NAM mask) comes from a
generator seeded by (seed, epoch, sample): batches do not depend on the worker count, and a
resumed run sees exactly the batches an uninterrupted one would. The training order shuffles
row groups in windows of ``shuffle_blocks`` so each worker touches few row groups at a time.

Each training item says what it drew — which caption BSS chose, whether NAM used the stored
``token_noise`` (aligned with this tokenizer's tokens) or fell back to the constant rate, and
for which caption a hard-negative slot was filled — and :class:`DrawCounts` adds those up from
the batches the loop actually trained on, for ``metrics.json``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from pedsynth.engines.clip_tokens import clip_token_strings, is_clip_bpe
from pedsynth.train.data import FILE_BLOCK_ROWS, DataError, ImageReader, SplitIndex, decode_image
from pedsynth.train.text_aug import choose_caption, nam_mask, nam_probabilities
from pedsynth.train.text_stream import WordTokenizer
from pedsynth.train.transforms import ImageTransform, eval_transform, seeded, train_transform

# What NAM used for an item's masking rates (the ``noise`` field of an item).
NOISE_OFF = -1  # NAM is off
NOISE_NONE = 0  # the caption has no stored levels: constant rate p
NOISE_STORED = 1  # the stored levels, aligned with the trainer's tokens
NOISE_MISALIGNED = 2  # stored levels whose tokens differ from the trainer's: constant rate p

_IMAGE_STREAM, _TEXT_STREAM = 0, 1


class SampleKey(NamedTuple):
    """One training item: ``caption`` at ``epoch``; ``anchor`` is the caption whose stored hard
    negative this item is (-1: an ordinary sample, or a random fill of a hard-negative slot)."""

    epoch: int
    caption: int
    anchor: int = -1


def aligned_noise(
    noise: np.ndarray | None, stored_tokens: Sequence[str] | None, mine: list[str] | None
) -> tuple[np.ndarray | None, int]:
    """The stored noise levels for the trainer's tokens ``mine`` (in the ``tokens`` column's
    format, :func:`~pedsynth.engines.clip_tokens.clip_token_strings`; None when the trainer's
    tokenizer is not CLIP BPE), and which :data:`NOISE_*` case.

    Levels are used when the stored tokens equal the trainer's (one of the two may stop earlier
    where a context was cut: the common prefix must agree and the rest keeps the constant rate);
    without stored tokens, only when there is exactly one level per trainer token.
    """
    if noise is None or len(noise) == 0:
        return None, NOISE_NONE
    if stored_tokens is None:
        if mine is not None and len(noise) == len(mine):
            return noise, NOISE_STORED
        return None, NOISE_MISALIGNED
    if mine is None or len(stored_tokens) != len(noise):
        return None, NOISE_MISALIGNED
    n = min(len(mine), len(stored_tokens))
    if n == 0 or list(stored_tokens[:n]) != mine[:n]:
        return None, NOISE_MISALIGNED
    return noise[:n], NOISE_STORED


def _token_body(tokens: torch.Tensor, eot_token: int) -> tuple[int, int]:
    """(first, end) positions of the text tokens between SOT and EOT in a tokenised row."""
    positions = torch.nonzero(tokens == eot_token).flatten()
    end = int(positions[0]) if len(positions) else len(tokens)
    return 1, end


def _torch_seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0])


class TrainDataset(Dataset):
    """Training items: an augmented image, its (BSS-chosen, NAM-masked) caption, identity.

    Indexed by :class:`SampleKey` (or ``(epoch, caption)``) as produced by
    :class:`BlockShuffleBatchSampler`. An item is a dict: ``image`` (3, H, W), ``text`` (L,)
    clean tokens, ``masked_text`` (L,) the NAM-corrupted tokens (equal to ``text`` when NAM is
    off), ``label`` (identity index), ``caption`` (the caption used, after BSS),
    ``augmented`` (BSS picked an augmented caption), ``noise`` (a :data:`NOISE_*` code) and
    ``hard_negative_of`` (the anchor caption of a hard-negative slot, else -1).
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
        resize_mode: str = "pad",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.image_size = tuple(image_size)
        self.seed = seed
        self.labels = labels
        self.text_cfg = text_cfg
        norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        self.transform: ImageTransform = train_transform(
            self.image_size, augment_cfg, resize_mode=resize_mode, **norm
        )
        self.reader = ImageReader()
        self.eot_token = int(tokenizer("")[0].max())  # SOT/EOT are the largest ids
        self.clip_bpe = is_clip_bpe(tokenizer)  # only its tokens compare with stored ones
        # A word tokenizer (the BiGRU text stream) names its own mask id and ordinary ids.
        self.mask_ids: dict[str, Any] = {}
        if isinstance(tokenizer, WordTokenizer):
            self.mask_ids = {
                "mask_token": tokenizer.mask_token,
                "random_ids": (tokenizer.first_word, tokenizer.vocab_size),
            }

    def __len__(self) -> int:
        return len(self.index.samples)

    def __getitem__(self, key: SampleKey | tuple[int, int]) -> dict[str, Any]:
        key = SampleKey(*key)
        image_index = self.index.caption_image[key.caption]
        return {
            "image": self.image(key.epoch, key.caption),
            **self.text(key.epoch, key.caption),
            "label": self.labels[self.index.image_person[image_index]],
            "hard_negative_of": key.anchor,
        }

    def image(self, epoch: int, caption: int) -> torch.Tensor:
        """The sample's image, decoded and augmented (seeded by seed, epoch, sample)."""
        image_index = self.index.caption_image[caption]
        ref = self.index.image_refs[image_index]
        img = decode_image(self.reader.read(ref), self.index.image_ids[image_index])
        return seeded(self.transform, img, _torch_seed(self.seed, epoch, caption, _IMAGE_STREAM))

    def text(self, epoch: int, caption: int) -> dict[str, Any]:
        """The sample's text fields of an item (see the class), without the image."""
        rng = np.random.default_rng([self.seed, epoch, caption, _TEXT_STREAM])
        chosen, used_augmented = caption, False
        augmented = self.index.augmented.get(self.index.caption_image[caption], [])
        if self.text_cfg.bss and augmented:
            chosen, used_augmented = choose_caption(
                [caption], augmented, self.text_cfg.bss_beta, rng
            )
        text = self.tokenizer([self.index.captions[chosen]])[0]
        masked, noise_case = text, NOISE_OFF
        if self.text_cfg.nam:
            first, end = _token_body(text, self.eot_token)
            body = text[first:end].numpy()
            noise, noise_case = aligned_noise(
                self.index.caption_noise[chosen],
                self.index.caption_tokens[chosen],
                clip_token_strings(self.tokenizer, body) if self.clip_bpe else None,
            )
            probabilities = nam_probabilities(noise, len(body), self.text_cfg.nam_p)
            new_body, _ = nam_mask(body, probabilities, rng, **self.mask_ids)
            masked = text.clone()
            masked[first:end] = torch.from_numpy(new_body)
        return {
            "text": text,
            "masked_text": masked,
            "caption": chosen,
            "augmented": used_augmented,
            "noise": noise_case,
        }


class BlockShuffleBatchSampler(Sampler[list[SampleKey]]):
    """Batches of :class:`SampleKey` for :class:`TrainDataset`.

    Shuffles the storage blocks (row groups), then samples within windows of
    ``shuffle_blocks`` blocks, so a worker reads few row groups at a time. When
    ``hard_negative_fraction`` > 0, that share of each batch is filled with captions of the
    stored hard-negative images (other identities' look-alikes) of the batch's samples, each
    keyed with the caption it was drawn for. The last incomplete batch is dropped (SDM needs
    full batches; it changes between epochs).
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

    def __iter__(self) -> Iterator[list[SampleKey]]:
        order = self.order()
        rng = np.random.default_rng([self.seed, self.epoch, 11])
        per_batch = self.batch_size - self.hard_slots
        for start in range(0, len(order) - per_batch + 1, per_batch):
            batch = [SampleKey(self.epoch, c) for c in order[start : start + per_batch]]
            yield batch + self._hard_negatives([k.caption for k in batch], rng)

    def _hard_negatives(self, batch: list[int], rng: np.random.Generator) -> list[SampleKey]:
        extra: list[SampleKey] = []
        for c in batch:
            if len(extra) == self.hard_slots:
                break
            negatives = [i for i in self.index.hard_negatives[c] if i in self.captions_of_image]
            if negatives:
                image = negatives[int(rng.integers(len(negatives)))]
                pool = self.captions_of_image[image]
                extra.append(SampleKey(self.epoch, pool[int(rng.integers(len(pool)))], c))
        while len(extra) < self.hard_slots:  # too few hard negatives: random samples instead
            sample = self.index.samples[int(rng.integers(len(self.index.samples)))]
            extra.append(SampleKey(self.epoch, sample))
        return extra


class GalleryDataset(Dataset):
    """Evaluation images (no augmentation), one per distinct image of the split."""

    def __init__(
        self,
        index: SplitIndex,
        image_size: tuple[int, int],
        *,
        resize_mode: str = "pad",
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        self.index = index
        norm = {k: v for k, v in (("mean", mean), ("std", std)) if v is not None}
        self.transform: ImageTransform = eval_transform(
            tuple(image_size), resize_mode=resize_mode, **norm
        )
        self.reader = ImageReader()

    def __len__(self) -> int:
        return len(self.index.image_ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = decode_image(self.reader.read(self.index.image_refs[i]), self.index.image_ids[i])
        return self.transform(img)


def tokenize_all(tokenizer: Any, texts: Sequence[str], batch: int = 1024) -> torch.Tensor:
    return torch.cat([tokenizer(list(texts[i : i + batch])) for i in range(0, len(texts), batch)])


class DrawCounts:
    """What training drew from the shards, counted from the collated batches it trained on.

    Counts are flat integers (``counts``), so epochs add up and a resumed run carries them in
    its checkpoint. :meth:`summary` reads them per switch that is on: NAM — items whose masking
    rates came from the stored ``token_noise`` and those that fell back to the constant rate (no
    levels stored, or levels whose tokens disagree with the trainer's); hard negatives — batch
    slots filled with a stored hard negative of a batch caption, and random fills; BSS — items
    that used an augmented caption, by ``caption_source``. ``edited`` (reported when there are
    any) counts items of edited images (the edit stage's rows: new images, not BSS captions).
    """

    def __init__(self, index: SplitIndex, counts: dict[str, int] | None = None) -> None:
        self.index = index
        self.counts: dict[str, int] = defaultdict(int, counts or {})
        self.edited = {
            index.caption_image[c] for c, s in enumerate(index.caption_source) if s == "edit"
        }

    def add(self, batch: dict[str, Any], hard_slots: int) -> None:
        """Count one collated batch of :class:`TrainDataset` items (``hard_slots`` of them the
        sampler's hard-negative slots)."""
        c = self.counts
        c["items"] += len(batch["caption"])
        for case in batch["noise"].tolist():
            c[_NOISE_KEYS[case]] += 1
        c["hard_negative_slots"] += hard_slots
        c["hard_negatives_stored"] += int((batch["hard_negative_of"] >= 0).sum())
        for caption, used in zip(
            batch["caption"].tolist(), batch["augmented"].tolist(), strict=True
        ):
            if used:
                c[f"augmented_{self.index.caption_source[caption]}"] += 1
            if self.index.caption_image[caption] in self.edited:
                c["edited"] += 1

    @staticmethod
    def summary(
        counts: dict[str, int], *, nam: bool, hard_negatives: bool, bss: bool
    ) -> dict[str, Any]:
        c = defaultdict(int, counts)
        items = c["items"]
        out: dict[str, Any] = {"items": items}
        if c["edited"]:
            out["edited"] = c["edited"]
        if nam:
            uniform = c["noise_none"] + c["noise_misaligned"]
            out["nam"] = {
                "stored_noise": c["noise_stored"],
                "uniform": uniform,
                "no_stored_noise": c["noise_none"],
                "misaligned_noise": c["noise_misaligned"],
                "stored_noise_share": c["noise_stored"] / max(1, items),
            }
        if hard_negatives:
            out["hard_negatives"] = {
                "slots": c["hard_negative_slots"],
                "stored": c["hard_negatives_stored"],
                "random_fill": c["hard_negative_slots"] - c["hard_negatives_stored"],
            }
        if bss:
            by_source = {
                k.removeprefix("augmented_"): v
                for k, v in sorted(c.items())
                if k.startswith("augmented_")
            }
            used = sum(by_source.values())
            out["bss"] = {
                "augmented": used,
                "augmented_share": used / max(1, items),
                "by_source": by_source,
            }
        return out


_NOISE_KEYS = {
    NOISE_OFF: "noise_off",
    NOISE_NONE: "noise_none",
    NOISE_STORED: "noise_stored",
    NOISE_MISALIGNED: "noise_misaligned",
}

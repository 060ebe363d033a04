"""Training data: shard indexing, BSS pools, streaming image reads, transforms, raw datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pedsynth.engines.clip_preprocess import person_transform
from pedsynth.engines.clip_tokens import clip_token_strings
from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.train import AugmentConfig, TrainConfig
from pedsynth.tasks import ingest
from pedsynth.train.data import DataError, ImageReader, decode_image, index_shards, load_split
from pedsynth.train.datasets import (
    NOISE_MISALIGNED,
    NOISE_NONE,
    NOISE_STORED,
    BlockShuffleBatchSampler,
    TrainDataset,
    aligned_noise,
)
from pedsynth.train.model import create_clip
from pedsynth.train.transforms import eval_transform, seeded, train_transform


def write_shards(
    benchmark: Path,
    out: Path,
    *,
    rewrites: bool = False,
    hard_negatives: bool = False,
    row_group_size: int = 40,
) -> Path:
    """Ingest a CUHK-layout benchmark and write ``OUT/data/{split}-00000-of-00001.parquet``.

    ``rewrites`` adds one ``rewrite`` row per train image (its caption upper-cased, a stand-in
    for an LLM rewrite) with token noise; ``hard_negatives`` gives every train row the image
    of the next identity as its hard negative.
    """
    catalog, _ = ingest.read_catalog(SourceConfig(format="cuhk-pedes", path=str(benchmark)))
    pairs, _ = ingest.load_images(catalog, IngestConfig())
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        table = pairs.filter(pc.equal(pairs["split"], split))
        if split == "train" and (rewrites or hard_negatives):
            table = _enrich(table, rewrites, hard_negatives)
        pq.write_table(
            table, out / "data" / f"{split}-00000-of-00001.parquet", row_group_size=row_group_size
        )
    return out


def _enrich(table: pa.Table, rewrites: bool, hard_negatives: bool) -> pa.Table:
    rows = table.to_pylist()
    if hard_negatives:
        images_by_person: dict[str, str] = {}
        for r in rows:
            images_by_person.setdefault(r["person_id"], r["image_id"])
        persons = sorted(images_by_person)
        for r in rows:
            nxt = persons[(persons.index(r["person_id"]) + 1) % len(persons)]
            r["hard_negatives"] = [images_by_person[nxt]]
    if rewrites:
        seen: set[str] = set()
        for r in list(rows):
            if r["image_id"] in seen:
                continue
            seen.add(r["image_id"])
            rows.append(
                r
                | {
                    "pair_id": r["pair_id"] + "-rw",
                    "caption": "REWRITE " + r["caption"],
                    "caption_source": "rewrite",
                    "parent_id": r["pair_id"],
                    "token_noise": [0.9, 0.1, 0.1, 0.1],
                }
            )
    return pa.Table.from_pylist(rows, schema=table.schema)


@pytest.fixture(scope="module")
def shards(procedural_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-data")
    return write_shards(procedural_small, out, rewrites=True, hard_negatives=True)


@pytest.fixture(scope="module")
def clip_and_tokenizer():
    return create_clip(TrainConfig().model)


def test_index_reads_text_only_and_builds_bss_pools(shards):
    index = index_shards(shards, "train")
    n_images = len(index.image_ids)
    assert n_images == len(set(index.image_ids)) > 0
    originals = sum(index.caption_original)
    assert len(index.samples) == originals  # samples are the original captions
    assert len(index.augmented) == n_images  # one rewrite per image
    for image, pool in index.augmented.items():
        assert all(index.captions[c].startswith("REWRITE") for c in pool)
        assert all(index.caption_image[c] == image for c in pool)
    assert all(ref.row_group >= 0 for ref in index.image_refs)
    assert any(index.hard_negatives[c] for c in index.samples)
    # Queries of an evaluation split are its original captions.
    test = index_shards(shards, "test")
    assert len(test.query_captions()) == len(test.captions)


def test_image_reader_keeps_a_bounded_row_group_cache(shards):
    index = index_shards(shards, "train")
    reader = ImageReader(cache_groups=2)
    for ref in index.image_refs:
        assert reader.read(ref)[:2] == b"\xff\xd8"  # JPEG
    assert len(reader._groups) <= 2


def test_items_are_deterministic_and_bss_rate_follows_beta(shards, clip_and_tokenizer):
    _, tokenizer = clip_and_tokenizer
    index = index_shards(shards, "train")
    cfg = TrainConfig(text={"bss": True, "bss_beta": 0.5, "nam": True})
    labels = {p: i for i, p in enumerate(index.persons)}
    ds = TrainDataset(
        index,
        tokenizer,
        image_size=(128, 64),
        seed=3,
        labels=labels,
        augment_cfg=cfg.augment,
        text_cfg=cfg.text,
    )
    a, b = ds[(0, index.samples[0])], ds[(0, index.samples[0])]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["masked_text"], b["masked_text"])
    assert a["image"].shape == (3, 128, 64)
    c = ds[(1, index.samples[0])]
    assert not torch.equal(a["image"], c["image"])  # another epoch, another augmentation
    used = [ds[(e, s)]["augmented"] for e in range(4) for s in index.samples]
    assert abs(np.mean(used) - 0.5) < 0.08


def test_sampler_mixes_hard_negatives_and_is_seeded(shards):
    index = index_shards(shards, "train")
    sampler = BlockShuffleBatchSampler(
        index, 8, seed=1, shuffle_blocks=2, hard_negative_fraction=0.25
    )
    batches = list(sampler)
    assert all(len(b) == 8 for b in batches) and len(batches) == len(sampler)
    for batch in batches:
        base, extra = batch[:6], batch[6:]
        assert all(k.anchor == -1 for k in base)
        base_captions = {k.caption for k in base}
        for key in extra:
            # Each hard-negative slot names the batch caption it was drawn for, and holds a
            # caption of one of that caption's stored hard-negative images.
            assert key.anchor in base_captions
            assert index.caption_image[key.caption] in index.hard_negatives[key.anchor]
    again = BlockShuffleBatchSampler(
        index, 8, seed=1, shuffle_blocks=2, hard_negative_fraction=0.25
    )
    assert list(again) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(DataError, match="fewer than one batch"):
        BlockShuffleBatchSampler(index, 10_000, seed=0)


def _person(height: int = 90, width: int = 40) -> Image.Image:
    """A tall crop with a left-right asymmetry, so flips and crops are visible."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    pixels[:, : width // 4] = (250, 10, 10)
    return Image.fromarray(pixels)


NO_AUGMENT = AugmentConfig(flip=False, pad=0, crop=False, erasing=0.0)


def test_training_geometry_is_the_shared_evaluation_preprocessing():
    img = _person()
    shared = person_transform((128, 64), "pad")(img)
    assert torch.equal(eval_transform((128, 64))(img), shared)
    # With every augmentation off, training sees exactly the evaluation tensor.
    assert torch.equal(seeded(train_transform((128, 64), NO_AUGMENT), img, 3), shared)
    # Aspect ratio kept: the 90×40 crop scales by 128/90 to 128×57 and is padded left and
    # right (with 0 after normalisation), not stretched to 64 columns.
    assert shared.shape == (3, 128, 64)
    assert (shared[:, :, :3] == 0).all() and (shared[:, :, -3:] == 0).all()
    assert (shared[:, :, 4:-4] != 0).any(dim=0).float().mean() > 0.95


def test_flip_follows_its_probability():
    img = _person()
    plain = eval_transform((128, 64))(img)
    flip = train_transform((128, 64), NO_AUGMENT.model_copy(update={"flip": True}))
    outs = [seeded(flip, img, s) for s in range(200)]
    flipped = [torch.equal(o, plain.flip(-1)) for o in outs]
    assert all(f or torch.equal(o, plain) for f, o in zip(flipped, outs, strict=True))
    assert 0.4 < np.mean(flipped) < 0.6  # p = 0.5


def test_pad_and_random_crop_shift_the_image_within_the_padding():
    img = _person()
    plain = eval_transform((128, 64))(img)
    crop = train_transform((128, 64), NO_AUGMENT.model_copy(update={"crop": True, "pad": 4}))
    padded = torch.nn.functional.pad(plain, (4, 4, 4, 4))
    shifts = set()
    for s in range(60):
        out = seeded(crop, img, s)
        found = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out, padded[:, dy : dy + 128, dx : dx + 64])
        ]
        assert found, "the output is not a 128×64 window of the zero-padded image"
        shifts.add(found[0])
    assert len(shifts) > 20  # offsets are drawn, not fixed


def test_random_erasing_blanks_one_box_of_the_configured_area():
    img = _person()
    plain = eval_transform((128, 64))(img)
    erase = train_transform((128, 64), NO_AUGMENT.model_copy(update={"erasing": 0.5}))
    erased = 0
    for s in range(100):
        out = seeded(erase, img, s)
        changed = (out != plain).any(dim=0)
        if not changed.any():
            continue
        erased += 1
        rows = torch.nonzero(changed.any(dim=1)).flatten()
        cols = torch.nonzero(changed.any(dim=0)).flatten()
        box = out[:, rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
        assert (box == 0).all()  # one rectangle filled with 0, the mean colour
        area = box.shape[1] * box.shape[2] / (128 * 64)
        assert 0.015 <= area <= 0.41  # IRRA's scale (0.02, 0.4), up to rounding
    assert 35 <= erased <= 65  # p = 0.5


def test_seeded_transforms_repeat_and_leave_the_global_rng_alone():
    img = _person()
    full = train_transform((128, 64), AugmentConfig())
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, b = seeded(full, img, 9), seeded(full, img, 9)
    assert torch.equal(a, b) and not torch.equal(a, seeded(full, img, 10))
    assert torch.equal(torch.get_rng_state(), before)


def test_stored_noise_is_used_only_when_its_tokens_match(clip_and_tokenizer):
    _, tokenizer = clip_and_tokenizer
    ids = tokenizer.encode("a man in a red-jacket")
    mine = clip_token_strings(tokenizer, ids)
    assert mine == ["a", "man", "in", "a", "red", "-", "jacket"]
    noise = np.linspace(0.1, 0.7, len(mine)).astype(np.float32)
    used, case = aligned_noise(noise, mine, mine)
    assert case == NOISE_STORED and np.array_equal(used, noise)
    # Another tokenizer's tokens (or another caption): not used.
    other = ["a", "man", "in", "a", "re", "d-", "jacket"]
    assert aligned_noise(noise, other, mine) == (None, NOISE_MISALIGNED)
    # The stored side was cut by a shorter context: the levels cover the prefix.
    used, case = aligned_noise(noise[:4], mine[:4], mine)
    assert case == NOISE_STORED and len(used) == 4
    # The trainer's context is shorter: the levels of its tokens only.
    used, case = aligned_noise(noise, mine, mine[:3])
    assert case == NOISE_STORED and np.array_equal(used, noise[:3])
    # No stored tokens: one level per token is required.
    assert aligned_noise(noise, None, mine)[1] == NOISE_STORED
    assert aligned_noise(noise[:5], None, mine) == (None, NOISE_MISALIGNED)
    assert aligned_noise(None, None, mine) == (None, NOISE_NONE)


def test_raw_cuhk_dataset_through_ingest_readers(procedural_small):
    index, rejects = load_split(f"cuhk-pedes:{procedural_small}", "train")
    assert rejects == 0 and index.samples and index.image_refs[0].row_group == -1
    assert ImageReader().read(index.image_refs[0])[:2] == b"\xff\xd8"


def test_bad_data_gives_clear_errors(tmp_path, shards):
    with pytest.raises(DataError, match="does not exist"):
        load_split(str(tmp_path / "nope"), "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data/"):
        load_split(str(tmp_path / "empty"), "train")
    # A shard whose image bytes are not an image: the error names the image.
    table = pq.read_table(shards / "data" / "val-00000-of-00001.parquet")
    images = table.column("image").to_pylist()
    images[0] = {"bytes": b"not a jpeg", "path": "x.jpg"}
    bad = table.set_column(
        table.schema.get_field_index("image"),
        "image",
        pa.array(images, type=table.schema.field("image").type),
    )
    (tmp_path / "bad" / "data").mkdir(parents=True)
    pq.write_table(bad, tmp_path / "bad" / "data" / "train-00000-of-00001.parquet")
    index, _ = load_split(str(tmp_path / "bad"), "train")
    with pytest.raises(DataError, match="cannot decode image"):
        decode_image(ImageReader().read(index.image_refs[0]), index.image_ids[0])

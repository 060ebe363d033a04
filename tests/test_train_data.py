"""Training data: shard indexing, BSS pools, streaming image reads, augmentation, raw datasets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.train import TrainConfig
from pedsynth.tasks import ingest
from pedsynth.train.data import (
    BlockShuffleBatchSampler,
    DataError,
    ImageReader,
    TrainDataset,
    augment,
    index_shards,
    load_split,
)
from pedsynth.train.model import create_clip


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
    first = batches[0]
    base, extra = first[:6], first[6:]
    negatives = {i for _, c in base for i in index.hard_negatives[c]}
    assert all(index.caption_image[c] in negatives for _, c in extra)
    again = BlockShuffleBatchSampler(
        index, 8, seed=1, shuffle_blocks=2, hard_negative_fraction=0.25
    )
    assert list(again) == batches
    sampler.set_epoch(1)
    assert list(sampler) != batches
    with pytest.raises(DataError, match="fewer than one batch"):
        BlockShuffleBatchSampler(index, 10_000, seed=0)


def test_augment_keeps_shape_and_changes_pixels():
    image = torch.randn(3, 32, 16)
    rng = np.random.default_rng(0)
    out = [augment(image, rng, flip=True, pad=4, crop=True, erasing=1.0) for _ in range(5)]
    assert all(o.shape == image.shape for o in out)
    assert all((o == 0).any() for o in out)  # padding or erased box
    same = augment(image, rng, flip=False, pad=0, crop=False, erasing=0.0)
    assert torch.equal(same, image)


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
    from pedsynth.train.data import decode_image

    with pytest.raises(DataError, match="cannot decode image"):
        decode_image(ImageReader().read(index.image_refs[0]), index.image_ids[0])

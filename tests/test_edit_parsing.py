"""The SegFormer mask backend: label names onto regions, logits to masks at the crop's size,
and the edit stage with a tiny random SegFormer saved and loaded by path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from PIL import Image

from pedsynth.schemas.edit import EditConfig
from pedsynth.tasks.edit import build_stage
from pedsynth.tasks.edit_masks import dilate
from pedsynth.tasks.edit_parsing import masks_from_logits, region_labels
from tests.text_shards import ingest_procedural, torch_threads

# The ATR layout of mattmdjaga/segformer_b2_clothes.
CLOTHES = [
    "Background", "Hat", "Hair", "Sunglasses", "Upper-clothes", "Skirt", "Pants", "Dress",
    "Belt", "Left-shoe", "Right-shoe", "Face", "Left-leg", "Right-leg", "Left-arm", "Right-arm",
    "Bag", "Scarf",
]  # fmt: skip
TINY = {"steps": 2, "height": 64, "width": 32, "device": "cpu", "batch_size": 16}


def test_clothes_parsing_labels_map_onto_the_regions_by_name():
    labels = region_labels(dict(enumerate(CLOTHES)))
    assert labels == {
        "hair": (2,),
        "upper": (4, 7),
        "lower": (5, 6, 7),
        "shoes": (9, 10),
        "bag": (16,),
    }
    # spelling and case do not matter; a layout without bags has no bag region
    lip = {0: "background", 1: "hair", 2: "upper_clothes", 3: "pants", 4: "left_shoe"}
    assert region_labels(lip) == {
        "hair": (1,),
        "upper": (2,),
        "lower": (3,),
        "shoes": (4,),
        "bag": (),
    }


def test_an_unknown_layout_is_an_error_naming_its_labels():
    with pytest.raises(ValueError, match=r"unknown parsing layout.*'car'.*'road'"):
        region_labels({0: "road", 1: "car"})


def test_masks_are_the_argmax_upsampled_to_the_crop():
    # 3 classes on a 2x3 grid; each cell's winner is known, upsampled x2 to 4x6
    winners = np.array([[0, 1, 2], [2, 2, 1]])
    logits = torch.full((3, 2, 3), -5.0)
    for (y, x), c in np.ndenumerate(winners):
        logits[c, y, x] = 5.0
    masks = masks_from_logits(logits, (4, 6), {"hair": (1,), "upper": (2,), "bag": ()})
    hair = np.array(
        [
            [0, 0, 1, 1, 0, 0],
            [0, 0, 1, 1, 0, 0],
            [0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 1, 1],
        ],
        dtype=bool,
    )
    upper = np.array(
        [
            [0, 0, 0, 0, 1, 1],
            [0, 0, 0, 0, 1, 1],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
        ],
        dtype=bool,
    )
    np.testing.assert_array_equal(masks["hair"], hair)
    np.testing.assert_array_equal(masks["upper"], upper)
    assert masks["bag"].shape == (4, 6) and not masks["bag"].any()


@pytest.fixture(scope="module")
def segformer(tmp_path_factory):
    """A tiny random SegFormer with the clothes layout, saved to a folder; hair never wins."""
    from transformers import (
        SegformerConfig,
        SegformerForSemanticSegmentation,
        SegformerImageProcessor,
    )

    config = SegformerConfig(
        num_encoder_blocks=2,
        depths=[1, 1],
        sr_ratios=[2, 1],
        hidden_sizes=[8, 16],
        patch_sizes=[7, 3],
        strides=[4, 2],
        num_attention_heads=[1, 2],
        mlp_ratios=[2, 2],
        decoder_hidden_size=16,
        num_labels=len(CLOTHES),
        id2label=dict(enumerate(CLOTHES)),
        label2id={name: i for i, name in enumerate(CLOTHES)},
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = SegformerForSemanticSegmentation(config).eval()
    with torch.no_grad():
        model.decode_head.classifier.bias[CLOTHES.index("Hair")] = -1e4
        model.decode_head.classifier.bias[CLOTHES.index("Upper-clothes")] += 1.0
    folder = tmp_path_factory.mktemp("segformer")
    model.save_pretrained(folder)
    SegformerImageProcessor(size={"height": 64, "width": 32}).save_pretrained(folder)
    return model, folder


def _parse(model, folder: Path, pixels: np.ndarray) -> np.ndarray:
    """The class of every pixel, computed here with transformers and torch."""
    from transformers import SegformerImageProcessor

    inputs = SegformerImageProcessor.from_pretrained(folder)(
        images=[pixels.copy()], return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**inputs).logits
    up = torch.nn.functional.interpolate(logits, size=pixels.shape[:2], mode="bilinear")
    return up[0].argmax(0).numpy()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


def test_the_stage_edits_inside_the_parsed_region_and_rejects_empty_ones(tmp_path, segformer):
    model, folder = segformer
    table: pa.Table = ingest_procedural(tmp_path, identities=6, images_per_identity=2)
    config = EditConfig.model_validate(
        {
            "share": 1.0,
            "edits_per_image": 2,
            "regions": ["upper", "hair"],
            "diffusion": TINY,
            "masks": {"backend": "segformer", "model": str(folder), "device": "cpu"},
        }
    )
    with torch_threads(1):
        out, rejects = build_stage(config, seed=0)(table)
    parents = {r["pair_id"]: r for r in table.to_pylist()}
    edits = out.filter(pc.equal(out.column("caption_source"), "edit")).to_pylist()
    empty = rejects.filter(pc.equal(rejects.column("reason"), "empty_mask")).to_pylist()
    assert edits and empty
    ids = region_labels(dict(enumerate(CLOTHES)))
    for row in edits:
        assert row["edit"]["mask"] == "segformer"
        parent = _pixels(parents[row["parent_id"]]["image"]["bytes"])
        region = row["edit"]["attribute"].split("_")[0]
        exact = np.isin(_parse(model, folder, parent), ids[region])
        assert exact.sum() >= config.masks.min_pixels
        changed = np.abs(_pixels(row["image"]["bytes"]).astype(int) - parent).max(-1) > 24
        # the model changed pixels of the parsed region, and none far outside it
        assert changed[exact].any()
        assert not changed[~dilate(exact, config.masks.dilate_px + 2)].any()
    for reject in empty:
        parent = _pixels(parents[reject["pair_id"]]["image"]["bytes"])
        region = reject["detail"].split("the ", 1)[1].split(" mask")[0]
        count = int(np.isin(_parse(model, folder, parent), ids[region]).sum())
        assert count < config.masks.min_pixels
        assert f"has {count} pixels" in reject["detail"]
    assert any("the hair mask has 0 pixels" in r["detail"] for r in empty)

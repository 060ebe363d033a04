"""A whole build with the edit stage (``configs/offline-edit.yaml`` on a tiny procedural
benchmark), read back from what it wrote: the dataset card reports the edits (counts by region
and method, the before/after grid, rejects by reason) and the trainer trains on the edited
images as new images of new identities.

Expected values come from the written Parquet (``data/`` and ``rejects/``), never from the card
or the trainer's own bookkeeping.
"""

from __future__ import annotations

import io
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest
from PIL import Image

from pedsynth.procedural import generate
from pedsynth.schemas.train import load_train_config
from pedsynth.tasks.card import write_dataset_card
from pedsynth.tasks.card_figures import EDIT_GRID_PNG, EDIT_TILE_HEIGHT
from pedsynth.train.loop import prepare, train

REPO = Path(__file__).resolve().parents[1]
STEPS = 2


@pytest.fixture(scope="module")
def build(prefect_server, tmp_path_factory) -> Path:
    from pedsynth.flows.build_dataset import build_dataset

    root = tmp_path_factory.mktemp("edit-build")
    bench = root / "bench"
    generate(bench, identities=10, images_per_identity=2, seed=0, workers=1)
    out = root / "out"
    build_dataset(
        config=str(REPO / "configs" / "offline-edit.yaml"),
        sources=[f"cuhk-pedes:{bench}"],
        out=str(out),
        overrides=[f"edit.masks.root={bench}", "edit.share=1.0", "workers=1"],
    )
    return out / "latest"


@pytest.fixture(scope="module")
def rows(build) -> list[dict]:
    columns = ["pair_id", "image_id", "person_id", "split", "caption_source", "parent_id", "edit"]
    return ds.dataset(build / "data").to_table(columns=columns).to_pylist()


def _edit_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["caption_source"] == "edit"]


# ---------------------------------------------------------------------------- the card
def test_the_card_counts_edits_by_region_and_method_and_draws_the_grid(build, rows):
    edits = _edit_rows(rows)
    assert len({r["image_id"] for r in edits}) >= 4  # enough edits for a grid of four
    images: dict[tuple[str, str, str], set[str]] = {}
    captions: Counter = Counter()
    for r in edits:
        key = (r["edit"]["attribute"].rsplit("_", 1)[0], r["edit"]["method"], r["edit"]["mask"])
        images.setdefault(key, set()).add(r["image_id"])
        captions[key] += 1
    readme = (build / "README.md").read_text()
    section = readme.split("## Edits\n", 1)[1].split("\n## ", 1)[0]
    for (region, method, mask), ids in images.items():
        line = f"| {region} | {method} | {mask} | {len(ids)} | {captions[(region, method, mask)]} |"
        assert line in section, line
    assert len(re.findall(r"^\| \w+ \| inpaint \|", section, re.M)) == len(images)
    total = len({r["image_id"] for r in edits})
    assert f"added {total} edited images" in section

    # The grid: four before/after pairs side by side, each tile the parent / edited image.
    assert f"](card/{EDIT_GRID_PNG})" in section
    with Image.open(build / "card" / EDIT_GRID_PNG) as im:
        assert im.format == "PNG"
        grid = np.asarray(im.convert("RGB")).astype(np.int16)
    assert grid.shape[0] > EDIT_TILE_HEIGHT
    tiles = grid[grid.shape[0] - 6 - EDIT_TILE_HEIGHT : grid.shape[0] - 6]
    non_white = (tiles < 250).any(axis=(0, 2))  # columns holding an image
    runs = np.diff(np.concatenate([[0], non_white.astype(int), [0]]))
    assert (runs == 1).sum() == 8  # 4 examples x (before, after)


def test_the_card_lists_the_edit_stage_rejects_by_reason(build):
    rejects = ds.dataset(build / "rejects").to_table(columns=["stage", "reason"]).to_pylist()
    by_reason = Counter(r["reason"] for r in rejects if r["stage"] == "edit")
    assert by_reason  # people without a bag or a stated shoe colour, at share 1.0
    readme = (build / "README.md").read_text()
    for reason, n in by_reason.items():
        assert f"| edit | {reason} | {n} |" in readme


def test_no_grid_without_card_plots(build, tmp_path):
    manifest = json.loads((build / "manifest.json").read_text())
    manifest["config"].setdefault("write", {})["card_plots"] = False
    try:
        write_dataset_card(build, manifest)
        assert not (build / "card" / EDIT_GRID_PNG).exists()
        readme = (build / "README.md").read_text()
        assert "## Edits" in readme and EDIT_GRID_PNG not in readme
    finally:
        manifest["config"]["write"]["card_plots"] = True
        write_dataset_card(build, manifest)
    assert (build / "card" / EDIT_GRID_PNG).is_file()


# ---------------------------------------------------------------------------- the trainer
def test_the_trainer_takes_edited_images_as_new_images_of_new_identities(build, rows, tmp_path):
    edits = [r for r in _edit_rows(rows) if r["split"] == "train"]
    edited_people = {r["person_id"] for r in edits}
    train_people = {r["person_id"] for r in rows if r["split"] == "train"}
    parents = {r["pair_id"]: r for r in rows}
    assert edits and not edited_people & {parents[r["parent_id"]]["person_id"] for r in edits}

    cfg = load_train_config(
        REPO / "configs" / "train-tiny.yaml",
        data=str(build),
        out=str(tmp_path / "run"),
        overrides=["epochs=1", "batch_size=8", "num_workers=0", "threads=1", "text.bss=true"],
    )
    run = prepare(cfg)
    index = run.train_index
    # The ID loss's classes: every train identity, the edited ones included, once each.
    assert set(index.persons) == train_people
    assert run.model.classifier.out_features == len(train_people)
    # Each edited image is a new image with its own caption as a training sample, and never
    # a BSS caption of its parent.
    edit_pairs = {r["pair_id"] for r in edits}
    sampled = {index.caption_pair[c] for c in index.samples}
    assert edit_pairs <= sampled
    for c in index.samples:
        if index.caption_pair[c] in edit_pairs:
            image = index.image_ids[index.caption_image[c]]
            assert image == next(
                r["image_id"] for r in edits if r["pair_id"] == index.caption_pair[c]
            )
    pooled = {index.caption_pair[c] for pool in index.augmented.values() for c in pool}
    assert not pooled & edit_pairs

    # What the first steps draw, counted from the batches here, is what training reports.
    run.sampler.set_epoch(0)
    drawn = 0
    for number, batch in enumerate(run.loader):
        for caption in batch["caption"].tolist():
            drawn += index.caption_pair[caption] in edit_pairs
        if number + 1 == STEPS:
            break
    assert drawn > 0
    result = train(cfg.model_copy(update={"max_steps": STEPS}))
    assert result["draws"]["edited"] == drawn
    assert result["draws"]["items"] == STEPS * cfg.batch_size
    (epoch,) = json.loads((tmp_path / "run" / "metrics.json").read_text())["history"]
    assert epoch["step"] == STEPS and math.isfinite(epoch["loss"]) and epoch["id"] > 0


def test_grid_tiles_are_the_parent_and_the_edited_image(build, rows):
    """The first pair of the grid shows a parent image and its edit, scaled to the tile."""
    from pedsynth.tasks.card_stats import edit_summary, scan_build

    summary = edit_summary(scan_build(build), 1)
    (example,) = summary.examples
    assert example.before and example.after and example.before != example.after
    table = ds.dataset(build / "data").to_table(
        columns=["image_id", "image"], filter=ds.field("image_id") == example.image_id
    )
    assert table["image"][0].as_py()["bytes"] == example.after
    with Image.open(io.BytesIO(example.before)) as im:
        assert im.size[0] > 0

"""Reference-image editing (Paint-by-Example) on a real procedural shard: the reference bank the
procedural painter writes, the edit stage conditioned on its garments, and the rejects of a
reference that does not decode or does not exist."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from pedsynth.lexicon import extract_facts
from pedsynth.procedural.references import INDEX, write_reference_bank
from pedsynth.schemas.edit import EditConfig
from pedsynth.tasks.edit import build_stage
from tests.text_shards import ingest_procedural, torch_threads

TINY = {
    "method": "paint-by-example",
    "model": "tiny-random:paint-by-example",
    "steps": 2,
    "height": 64,
    "width": 32,
    "device": "cpu",
    "batch_size": 16,
}
RED_UPPER = [{"region": "upper", "kind": "colour", "to": "red"}]


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, Path, pa.Table]:
    root = tmp_path_factory.mktemp("edit-ref")
    table = ingest_procedural(root, identities=6, images_per_identity=2)
    refs = root / "refs"
    write_reference_bank(refs, {"upper": ("red", "blue"), "bag": ("pink",)})
    return root / "bench", refs, table


def _config(bench: Path, refs: Path, specs=RED_UPPER, per_image: int = 1) -> EditConfig:
    return EditConfig.model_validate(
        {
            "share": 1.0,
            "edits_per_image": per_image,
            "diffusion": TINY,
            "masks": {"root": str(bench), "dilate_px": 1},
            "references": str(refs),
            "specs": specs,
        }
    )


def _edits(table: pa.Table) -> list[dict]:
    return table.filter(pc.equal(table.column("caption_source"), "edit")).to_pylist()


def test_the_bank_holds_one_garment_per_type_and_colour(shard):
    _, refs, _ = shard
    index = json.loads((refs / INDEX).read_text())["references"]
    assert {(e["region"], e["colour"]) for e in index} == {
        ("upper", "red"),
        ("upper", "blue"),
        ("bag", "pink"),
    }
    assert len({e["type"] for e in index if e["region"] == "upper"}) == 6
    for entry in index:
        with Image.open(refs / entry["path"]) as im:
            pixels = np.asarray(im.convert("RGB")).astype(int)
        garment = (pixels < 250).any(axis=2)
        assert garment.mean() > 0.1 and garment[:, 0].any() and garment[0].any()  # cropped
        r, g, b = np.median(pixels[garment], axis=0)
        if entry["colour"] == "red":
            assert r > g + 60 and r > b + 60, entry
        if entry["colour"] == "blue":
            assert b > r + 40, entry


def test_paint_by_example_edits_toward_the_reference(shard):
    bench, refs, table = shard
    with torch_threads(1):
        out, rejects = build_stage(_config(bench, refs), seed=0)(table)
    rows = _edits(out)
    assert rows
    parents = {r["pair_id"]: r for r in table.to_pylist()}
    types = {e["path"]: e["type"] for e in json.loads((refs / INDEX).read_text())["references"]}
    for row in rows:
        edit = row["edit"]
        assert edit["method"] == "paint-by-example" and edit["target"] == "red"
        assert edit["model"] == "diffusers:tiny-random:paint-by-example@main"
        assert edit["reference_image_id"].startswith("upper/") and edit[
            "reference_image_id"
        ].endswith("/red.png")
        assert (refs / edit["reference_image_id"]).is_file()
        # the reference is of the garment type the caption names, when the bank has it
        stated = extract_facts(parents[row["parent_id"]]["caption"]).get("upper_type", ())
        garment = types[edit["reference_image_id"]]
        if set(stated) & {"t-shirt", "shirt", "jacket", "coat", "hoodie", "sweater"}:
            assert garment in stated
        with Image.open(io.BytesIO(row["image"]["bytes"])) as im:
            assert im.size == (
                parents[row["parent_id"]]["width"],
                parents[row["parent_id"]]["height"],
            )
    # people whose caption states no upper colour are rejected; nobody else is
    assert set(rejects.column("reason").to_pylist()) <= {"region_missing", "not_in_caption"}


def test_a_reference_that_does_not_decode_or_is_missing_is_a_reject(shard, tmp_path):
    bench, refs, table = shard
    broken = tmp_path / "refs"
    shutil.copytree(refs, broken)
    for png in (broken / "upper").rglob("red.png"):
        png.write_bytes(b"not a png")
    with torch_threads(1):
        out, rejects = build_stage(_config(bench, broken), seed=0)(table)
    reasons = rejects.column("reason").to_pylist()
    assert not _edits(out) and "bad_reference" in reasons
    assert all(
        "does not decode" in r["detail"]
        for r in rejects.to_pylist()
        if r["reason"] == "bad_reference"
    )
    # navy: a colour the bank has no garment in; blue: still there, so those rows are edited
    specs = [{"region": "upper", "kind": "colour", "to": c} for c in ("navy", "blue")]
    with torch_threads(1):
        out, rejects = build_stage(_config(bench, refs, specs, per_image=4), seed=0)(table)
    reasons = set(rejects.column("reason").to_pylist())
    targets = {r["edit"]["target"] for r in _edits(out)}
    assert "no_reference" in reasons and targets == {"blue"}


def test_paint_by_example_needs_a_reference_bank(shard):
    bench, _, _ = shard
    with pytest.raises(ValueError, match="needs edit.references"):
        EditConfig.model_validate({"diffusion": TINY, "masks": {"root": str(bench)}})

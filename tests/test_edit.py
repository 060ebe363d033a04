"""The edit stage on real procedural shards: label maps, the bank, substitution, diffusion
locality, lineage, split isolation, determinism, and rejects with reasons."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from PIL import Image

from pedsynth.lexicon import extract_facts, lexicon
from pedsynth.procedural import generate
from pedsynth.procedural.vocabulary import GARMENT_COLOURS
from pedsynth.schemas.config import load_config
from pedsynth.schemas.edit import EditConfig
from pedsynth.schemas.text import EngineConfig
from pedsynth.tasks.edit import build_stage
from pedsynth.tasks.edit_annotate import substitute
from pedsynth.tasks.edit_bank import EditSpec, bank, sample_specs
from pedsynth.tasks.edit_masks import dilate
from pedsynth.tasks.stages import active_stages
from tests.text_shards import ingest_procedural, torch_threads

ROOT = Path(__file__).resolve().parents[1]
TINY = {"steps": 2, "height": 64, "width": 32, "device": "cpu", "batch_size": 16}


def _config(bench: Path, **overrides) -> EditConfig:
    data = {"share": 1.0, "diffusion": TINY, "masks": {"root": str(bench), "dilate_px": 1}}
    return EditConfig.model_validate(data | overrides)


def _edits(table: pa.Table) -> list[dict]:
    return table.filter(pc.equal(table.column("caption_source"), "edit")).to_pylist()


def _pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


def _reencoded(data: bytes, quality: int = 95) -> np.ndarray:
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as im:
        im.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return _pixels(buffer.getvalue())


def _labels(bench: Path, path: str) -> np.ndarray:
    return np.asarray(Image.open(bench / "labels" / Path(path).with_suffix(".png")))


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("edit")
    return root / "bench", ingest_procedural(root, identities=8, images_per_identity=2)


@pytest.fixture(scope="module")
def edited(shard):
    bench, table = shard
    with torch_threads(1):
        return build_stage(_config(bench), seed=0)(table)


# ---------------------------------------------------------------------------- label maps
def test_label_maps_are_written_and_images_stay_byte_identical(tmp_path):
    generate(tmp_path / "b", identities=6, images_per_identity=2, seed=0, workers=1)
    image = tmp_path / "b" / "imgs" / "test" / "00005" / "00005_00.jpg"
    # the hash of this image before label maps existed
    digest = "ea525d13920b69ee5588c637034aaa636c113da940604274eb488b0e6cb40371"
    assert hashlib.sha256(image.read_bytes()).hexdigest() == digest
    legend = json.loads((tmp_path / "b" / "labels.json").read_text())["labels"]
    labels = _labels(tmp_path / "b", "test/00005/00005_00.jpg")
    with Image.open(image) as im:
        assert labels.shape == (im.height, im.width)
    rows = {name: np.nonzero(labels == legend[name])[0] for name in ("hair", "upper", "shoes")}
    assert all(len(r) > 10 for r in rows.values())
    # top to bottom: hair above the top above the shoes
    assert rows["hair"].mean() < rows["upper"].mean() < rows["shoes"].mean()
    assert (labels == 0).mean() > 0.3  # background


NEUTRAL = {"black", "white", "grey"}


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()  # chroma only: brightness and grey casts cancel
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


def test_labelled_garments_show_their_ground_truth_colours(tmp_path):
    generate(tmp_path / "b", identities=6, images_per_identity=2, seed=1, workers=1)
    attrs = json.loads((tmp_path / "b" / "attributes.json").read_text())
    checked = 0
    for record in json.loads((tmp_path / "b" / "reid_raw.json").read_text()):
        truth = attrs["identities"][str(record["id"])]
        if {truth["upper_colour"], truth["lower_colour"]} <= NEUTRAL:
            continue  # brightness, not hue, tells these apart, and the camera changes it
        labels = _labels(tmp_path / "b", record["file_path"])
        pixels = _pixels((tmp_path / "b" / "imgs" / record["file_path"]).read_bytes())
        upper = np.median(pixels[~dilate(labels != 2, 1)], axis=0)  # inside, away from edges
        lower = np.median(pixels[~dilate(labels != 3, 1)], axis=0)
        want_upper = np.array(GARMENT_COLOURS[truth["upper_colour"]])
        want_lower = np.array(GARMENT_COLOURS[truth["lower_colour"]])
        # a labelled region of a chromatic colour has that garment's hue, not the other's
        for got, own, want, other in (
            (upper, truth["upper_colour"], want_upper, want_lower),
            (lower, truth["lower_colour"], want_lower, want_upper),
        ):
            if own not in NEUTRAL:
                assert _cos(got, want) > max(0.5, _cos(got, other)), (record["file_path"], own)
                checked += 1
    assert checked >= 6


# ---------------------------------------------------------------------------- bank and text
def test_the_bank_names_lexicon_keys_and_sampling_is_deterministic():
    lex, b = lexicon(), bank()
    for region in b.regions.values():
        assert set(region.colours) <= set(lex.colour_senses)
    facts = extract_facts("A man in a red shirt, blue jeans and white sneakers.")
    kwargs = {"count": 3, "regions": ["upper", "lower", "shoes"], "kinds": ["colour"]}
    first = sample_specs(0, "img-1", facts, **kwargs)
    assert first == sample_specs(0, "img-1", facts, **kwargs)
    assert first != sample_specs(1, "img-1", facts, **kwargs)
    for spec in first:
        assert spec.original is not None
        assert not lex.values_compatible(spec.fact, spec.to, spec.original)


def test_substitute_replaces_only_the_edited_phrase():
    caption = "A man in a red shirt and black jeans with a red backpack."
    spec = EditSpec("upper", "colour", "red", "orange")
    assert substitute(caption, spec) == (
        "A man in an orange shirt and black jeans with a red backpack."
    )
    hair = EditSpec("hair", "colour", "blonde", "black")
    assert substitute("She has long blonde hair and a white top.", hair) == (
        "She has long black hair and a white top."
    )
    garment = EditSpec("upper", "type", "t-shirt", "shirt")
    assert substitute("He wears a grey t-shirt.", garment) == "He wears a grey shirt."
    assert substitute("He wears a grey t-shirt.", EditSpec("bag", "colour", "red", "blue")) is None


def test_offline_edit_config_runs_the_edit_stage():
    cfg = load_config(ROOT / "configs" / "offline-edit.yaml")
    assert [s.name for s in active_stages(cfg)] == ["ingest", "edit", "write"]
    assert cfg.edit.diffusion.model.startswith("tiny-random:")
    assert cfg.edit.reannotate.method == "substitute"


# ---------------------------------------------------------------------------- the stage
def test_edit_rows_carry_lineage_and_name_the_new_attribute(shard, edited):
    bench, table = shard
    out, rejects = edited
    parents = {r["pair_id"]: r for r in table.to_pylist()}
    rows = _edits(out)
    assert len(rows) >= 3
    assert out.num_rows == table.num_rows + len(rows)
    for row in rows:
        parent = parents[row["parent_id"]]
        edit = row["edit"]
        assert edit["parent_image_id"] == parent["image_id"] != row["image_id"]
        assert row["person_id"] != parent["person_id"]  # identity: new
        assert row["person_id"].startswith(parent["person_id"] + "~")
        assert edit["mask"] == "procedural" and edit["method"] == "inpaint"
        assert edit["model"] == "diffusers:tiny-random:sd-inpaint@main"
        assert row["seed"] == edit["seed"] and row["generator"].startswith("substitute:")
        assert row["fact_conflicts"] == []
        values = extract_facts(row["caption"]).get(edit["attribute"], ())
        assert edit["target"] in values and edit["original"] not in values
        assert row["caption"] != parent["caption"]
        assert (row["width"], row["height"]) == (parent["width"], parent["height"])


def test_edits_never_cross_splits(shard, edited):
    _, table = shard
    out, _ = edited
    parents = {r["pair_id"]: r for r in table.to_pylist()}
    rows = _edits(out)
    assert {"val", "test"} & set(table.column("split").to_pylist())  # there was something to skip
    assert all(parents[r["parent_id"]]["split"] == r["split"] == "train" for r in rows)


def test_pixels_change_inside_the_mask_only(shard, edited):
    bench, table = shard
    out, _ = edited
    parents = {r["pair_id"]: r for r in table.to_pylist()}
    legend = json.loads((bench / "labels.json").read_text())["labels"]
    for row in _edits(out):
        parent = parents[row["parent_id"]]
        labels = _labels(bench, parent["image"]["path"])
        region = bank().regions[row["edit"]["attribute"].split("_")[0]].label
        exact = labels == legend[region]
        before, after = _pixels(parent["image"]["bytes"]), _pixels(row["image"]["bytes"])
        # outside the dilated mask, beyond the 8x8 JPEG blocks it touches, the edit differs
        # from the original no more than encoding the original once more does
        far = ~dilate(exact, 1 + 8)
        diff_out = np.abs(after - before)[far]
        recoded = np.abs(_reencoded(parent["image"]["bytes"]) - before)[far]
        assert diff_out.mean() <= recoded.mean() + 0.25, row["edit"]
        assert np.percentile(diff_out, 99) <= np.percentile(recoded, 99) + 2, row["edit"]
        diff_in = np.abs(after - before)[exact].mean()
        assert diff_in > 10, (row["edit"], diff_in)


def test_the_same_seed_gives_the_same_edits_and_another_seed_others(shard, edited):
    bench, table = shard
    out, rejects = edited
    with torch_threads(1):
        again, again_rejects = build_stage(_config(bench), seed=0)(table)
        other, _ = build_stage(_config(bench), seed=5)(table)
    assert again.equals(out) and again_rejects.equals(rejects)
    first = {(r["edit"]["attribute"], r["edit"]["target"], r["image_id"]) for r in _edits(out)}
    second = {(r["edit"]["attribute"], r["edit"]["target"], r["image_id"]) for r in _edits(other)}
    assert first != second


def test_bad_inputs_are_rejected_with_reasons_and_the_rest_is_edited(shard, tmp_path):
    bench, table = shard
    copy = tmp_path / "bench"
    shutil.copytree(bench, copy)
    rows = table.to_pylist()
    train = sorted({r["image_id"] for r in rows if r["split"] == "train"})
    broken, empty, unlabelled = train[0], train[1], train[2]
    for r in rows:
        if r["image_id"] == broken:
            r["image"] = {"bytes": b"not an image", "path": r["image"]["path"]}
        if r["image_id"] == empty:
            label_file = copy / "labels" / Path(r["image"]["path"]).with_suffix(".png")
            Image.fromarray(np.zeros_like(_labels(copy, r["image"]["path"]))).save(label_file)
        if r["image_id"] == unlabelled:
            (copy / "labels" / Path(r["image"]["path"]).with_suffix(".png")).unlink(missing_ok=True)
    bad = pa.Table.from_pylist(rows, schema=table.schema)
    masks = {"root": str(copy), "fallback": "none", "dilate_px": 1}
    specs = [{"region": "upper", "kind": "colour", "to": "purple"}]
    with torch_threads(1):
        out, rejects = build_stage(_config(copy, masks=masks, specs=specs), seed=0)(bad)
    reasons = {r["image_id"]: r["reason"] for r in rejects.to_pylist()}
    assert reasons[broken] == "bad_image"
    assert reasons[empty] == "empty_mask"
    assert reasons[unlabelled] == "no_mask"
    edited = {r["edit"]["parent_image_id"] for r in _edits(out)}
    assert edited and not edited & {broken, empty, unlabelled}
    assert all(r["detail"] for r in rejects.to_pylist())

    unknown = [{"region": "upper", "kind": "colour", "to": "chartreuse"}]
    out, rejects = build_stage(_config(copy, specs=unknown), seed=0)(bad)
    assert not _edits(out) and set(rejects.column("reason").to_pylist()) == {"unknown_attribute"}

    bags = [{"region": "bag", "kind": "colour", "to": "pink"}]
    with torch_threads(1):
        out, rejects = build_stage(_config(bench, specs=bags), seed=0)(table)
    no_bag = {r["image_id"] for r in rejects.to_pylist() if r["reason"] == "region_missing"}
    with_bag = {r["edit"]["parent_image_id"] for r in _edits(out)}
    assert no_bag and with_bag  # people without a bag are rejected, the others edited
    for row in table.filter(
        pc.is_in(table.column("image_id"), pa.array(sorted(no_bag)))
    ).to_pylist():
        assert "bag_colour" not in extract_facts(row["caption"])


def test_a_failed_reannotation_ends_in_rejects_with_its_reason(shard):
    bench, table = shard
    engine = EngineConfig(model="tiny-random:llama", max_tokens=12, batch_size=32)
    reannotate = {"method": "llm", "engine": engine.model_dump(), "max_retries": 1}
    with torch_threads(1):
        out, rejects = build_stage(_config(bench, reannotate=reannotate), seed=0)(table)
    reasons = rejects.column("reason").to_pylist()
    assert not _edits(out)  # word salad never names the new attribute: nothing is edited
    assert "regenerated:missing_target" in reasons and "missing_target" in reasons
    final = [r for r in rejects.to_pylist() if r["reason"] == "missing_target"]
    assert all("does not name" in r["detail"] and "try 2" in r["detail"] for r in final)

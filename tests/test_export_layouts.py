"""``pedsynth export``: a finished build in CUHK-PEDES / ICFG-PEDES / RSTPReid layout.

A tiny procedural build (ingest and write only, no model stage) is exported in each layout and
read back with the project's ingest reader of that layout; the (image bytes, caption, split)
pairs and the grouping of pairs into persons must be those of the build's Parquet. The layout
itself is checked against what IRRA's loaders require: the annotation file's name and record
fields, and train person ids contiguous from the layout's first id.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pedsynth.cli import main
from pedsynth.export.layouts import export_layout
from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.manifest import resolve_build
from pedsynth.tasks import ingest, sources
from pedsynth.tasks.readers import read_catalog
from pedsynth.tasks.write import write_dataset

CUHK_KEYS = {"split", "captions", "file_path", "processed_tokens", "id"}
FORMATS = {  # format: (annotation file, record keys, first person id)
    "cuhk-pedes": ("reid_raw.json", CUHK_KEYS, 1),
    "icfg-pedes": ("ICFG-PEDES.json", CUHK_KEYS, 0),
    "rstpreid": ("data_captions.json", {"id", "img_path", "captions", "split"}, 0),
}


def tiny_build(bench: Path, out: Path) -> Path:
    """Ingest + write of a procedural benchmark, as the flow runs them, without Prefect."""
    chunks, _ = sources.plan_chunks(SourceConfig(format="cuhk-pedes", path=str(bench)), out, 40)
    shards = [sources.ingest_chunk(c, IngestConfig(), out) for c in chunks]
    config = {"name": "tiny", "write": {"card_examples": 0, "card_plots": False}}
    write_dataset(
        out, shards, [s.rejects_path for s in shards], shard_rows=40, config=config, stages={}
    )
    return out


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    from pedsynth.procedural import generate

    root = tmp_path_factory.mktemp("export-layouts")
    generate(root / "bench", identities=12, images_per_identity=3, seed=3, workers=1)
    return tiny_build(root / "bench", root / "out")


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def pairs_and_persons(rows: list[dict]) -> tuple[set, set]:
    """(set of (image hash, caption, split), set of persons as frozensets of those pairs)."""
    pairs, persons = set(), defaultdict(set)
    for row in rows:
        pair = (digest(row["image"]["bytes"]), row["caption"], row["split"])
        pairs.add(pair)
        persons[row["person_id"]].add(pair)
    return pairs, {frozenset(p) for p in persons.values()}


@pytest.fixture(scope="module")
def built_pairs(build) -> tuple[set, set]:
    rows = pq.read_table(
        resolve_build(build) / "data", columns=["image", "caption", "split", "person_id"]
    )
    return pairs_and_persons(rows.to_pylist())


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_an_export_ingests_back_to_the_same_pairs(build, built_pairs, tmp_path, fmt):
    folder = tmp_path / fmt
    export_layout(build, folder, fmt)
    catalog, catalog_rejects = read_catalog(SourceConfig(format=fmt, path=str(folder)))
    pairs, rejects = ingest.load_images(catalog, IngestConfig())
    assert catalog_rejects.num_rows == 0 and rejects.num_rows == 0
    got_pairs, got_persons = pairs_and_persons(pairs.to_pylist())
    want_pairs, want_persons = built_pairs
    assert len(want_pairs) == 72  # 36 images × 2 captions
    assert got_pairs == want_pairs
    assert got_persons == want_persons


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_the_layout_is_what_the_field_s_loaders_read(build, tmp_path, fmt):
    annotation, keys, first_id = FORMATS[fmt]
    folder = tmp_path / fmt
    export_layout(build, folder, fmt)
    records = json.loads((folder / annotation).read_text())
    path_key = "img_path" if fmt == "rstpreid" else "file_path"
    assert all(set(r) == keys for r in records)
    assert all(isinstance(r["id"], int) and r["split"] in ("train", "val", "test") for r in records)
    # IRRA: pid = id - 1 (CUHK-PEDES) or id (the others), then asserts train pids are 0..n-1.
    train_ids = sorted({r["id"] for r in records if r["split"] == "train"})
    assert train_ids == list(range(first_id, first_id + len(train_ids)))
    all_ids = sorted({r["id"] for r in records})
    assert all_ids == list(range(first_id, first_id + 12))
    # each image once, its bytes as stored in the build, by a relative path under imgs/
    cells = (
        pq.read_table(resolve_build(build) / "data", columns=["image"]).column("image").to_pylist()
    )
    stored = {digest(c["bytes"]) for c in cells}
    paths = [r[path_key] for r in records]
    assert len(paths) == len(set(paths)) == 36
    assert all(not Path(p).is_absolute() and p.endswith(".jpg") for p in paths)
    files = sorted(p for p in (folder / "imgs").rglob("*") if p.is_file())
    assert len(files) == 36
    assert {digest(p.read_bytes()) for p in files} == stored
    if fmt != "rstpreid":
        record = records[0]
        assert len(record["processed_tokens"]) == len(record["captions"])
        assert record["processed_tokens"][0][:2] == record["captions"][0].lower().split()[:2]


def test_an_interrupted_export_is_finished_by_a_rerun(build, tmp_path):
    folder = tmp_path / "cuhk"
    export_layout(build, folder, "cuhk-pedes")
    annotation = (folder / "reid_raw.json").read_bytes()
    first = sorted((folder / "imgs").rglob("*.jpg"))[0]
    image = first.read_bytes()
    # a kill before the annotation file was committed, with one image not written yet
    (folder / "reid_raw.json").unlink()
    first.unlink()
    summary = export_layout(build, folder, "cuhk-pedes")
    assert summary["images_written"] == 1
    assert (folder / "reid_raw.json").read_bytes() == annotation
    assert first.read_bytes() == image


def test_a_non_empty_folder_is_refused_unless_overwrite(build, tmp_path, capsys):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    code = main(["export", str(build), str(folder), "--format", "rstpreid"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "not empty" in err[0] and "--overwrite" in err[0]
    assert not (folder / "data_captions.json").exists()

    # another export there is refused too, and replaced with --overwrite
    export_layout(build, tmp_path / "other", "cuhk-pedes")
    assert main(["export", str(build), str(tmp_path / "other"), "--format", "rstpreid"]) == 2
    capsys.readouterr()
    code = main(
        ["export", str(build), str(tmp_path / "other"), "--format", "rstpreid", "--overwrite"]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["format"] == "rstpreid"
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == [
        ".pedsynth-export.json",
        "data_captions.json",
        "imgs",
        "pedsynth_export.json",
    ]


def test_a_folder_that_is_not_a_build_is_one_line(tmp_path, capsys):
    (tmp_path / "not-a-build").mkdir()
    code = main(["export", str(tmp_path / "not-a-build"), str(tmp_path / "x"), "--format=rstpreid"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("error:") and "manifest.json" in err[0]
    assert not (tmp_path / "x").exists()

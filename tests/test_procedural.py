"""The procedural benchmark: layout, determinism, splits, images and caption quality."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from pedsynth.procedural import generate
from pedsynth.procedural.captions import tokenize

IDENTITIES = 60
IMAGES_PER_IDENTITY = 2
SEED = 7


def _load(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    records = json.loads((folder / "reid_raw.json").read_text())
    attributes = json.loads((folder / "attributes.json").read_text())
    return records, attributes


def _image_bytes(folder: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted((folder / "imgs").rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def parallel_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    folder = tmp_path_factory.mktemp("parallel")
    summary = generate(
        folder,
        identities=IDENTITIES,
        images_per_identity=IMAGES_PER_IDENTITY,
        seed=SEED,
        workers=2,
    )
    return folder, summary


@pytest.fixture(scope="module")
def bench(parallel_run: tuple[Path, dict[str, Any]]) -> Path:
    return parallel_run[0]


@pytest.fixture(scope="module")
def loaded(bench: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    return _load(bench)


def _tiny(folder: Path, seed: int, **kwargs: Any) -> dict[str, Any]:
    return generate(folder, identities=6, images_per_identity=2, seed=seed, workers=1, **kwargs)


# ---------------------------------------------------------------------- determinism
def test_same_seed_gives_identical_files(tmp_path: Path) -> None:
    _tiny(tmp_path / "a", seed=3)
    _tiny(tmp_path / "b", seed=3)
    for name in ("reid_raw.json", "attributes.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert _image_bytes(tmp_path / "a") == _image_bytes(tmp_path / "b")


def test_different_seed_gives_different_benchmark(tmp_path: Path) -> None:
    _tiny(tmp_path / "a", seed=3)
    _tiny(tmp_path / "b", seed=4)
    first, second = _load(tmp_path / "a"), _load(tmp_path / "b")
    assert first[0] != second[0]
    assert first[1]["identities"] != second[1]["identities"]
    images_a, images_b = _image_bytes(tmp_path / "a"), _image_bytes(tmp_path / "b")
    assert not set(images_a.values()) & set(images_b.values())


def test_serial_run_equals_parallel_run(bench: Path, tmp_path: Path) -> None:
    generate(
        tmp_path,
        identities=IDENTITIES,
        images_per_identity=IMAGES_PER_IDENTITY,
        seed=SEED,
        workers=1,
    )
    for name in ("reid_raw.json", "attributes.json"):
        assert (tmp_path / name).read_bytes() == (bench / name).read_bytes()
    assert _image_bytes(tmp_path) == _image_bytes(bench)


# ---------------------------------------------------------------------- layout and counts
def test_summary_reports_counts(parallel_run: tuple[Path, dict[str, Any]]) -> None:
    _, summary = parallel_run
    assert summary["identities"] == IDENTITIES
    assert summary["images"] == IDENTITIES * IMAGES_PER_IDENTITY
    assert summary["captions"] == 2 * summary["images"]
    assert sum(s["identities"] for s in summary["splits"].values()) == IDENTITIES
    assert sum(s["images"] for s in summary["splits"].values()) == summary["images"]
    assert summary["seconds"] > 0


def test_records_follow_cuhk_pedes_layout(bench: Path, loaded) -> None:
    records, _ = loaded
    assert len(records) == IDENTITIES * IMAGES_PER_IDENTITY
    assert Counter(r["id"] for r in records) == {
        i: IMAGES_PER_IDENTITY for i in range(1, IDENTITIES + 1)
    }
    for record in records:
        assert list(record) == ["split", "captions", "file_path", "processed_tokens", "id"]
        assert (bench / "imgs" / record["file_path"]).is_file()
        assert record["file_path"].startswith(f"{record['split']}/{record['id']:05d}/")
        captions = record["captions"]
        assert len(captions) >= 2 and len(set(captions)) == len(captions)
        assert record["processed_tokens"] == [tokenize(c) for c in captions]
        for tokens in record["processed_tokens"]:
            assert tokens and all(
                t == t.lower() and re.fullmatch(r"[a-z0-9'-]+", t) for t in tokens
            )
    assert len({r["file_path"] for r in records}) == len(records)
    assert not list(bench.rglob("*.tmp")), "temporary files left behind"


def test_splits_are_identity_disjoint_and_all_present(loaded) -> None:
    records, attributes = loaded
    splits_of = defaultdict(set)
    for record in records:
        splits_of[record["id"]].add(record["split"])
    assert all(len(splits) == 1 for splits in splits_of.values())
    per_split = Counter(next(iter(s)) for s in splits_of.values())
    assert set(per_split) == {"train", "val", "test"}
    assert per_split["train"] == 48 and per_split["val"] == 6 and per_split["test"] == 6
    for identity_id, splits in splits_of.items():
        assert attributes["identities"][str(identity_id)]["split"] in splits


def test_three_identities_fill_three_splits(tmp_path: Path) -> None:
    generate(tmp_path, identities=3, images_per_identity=1, workers=1)
    records, _ = _load(tmp_path)
    assert sorted(r["split"] for r in records) == ["test", "train", "val"]


def test_attributes_use_the_vocabulary(loaded) -> None:
    _, attributes = loaded
    vocabulary = attributes["vocabulary"]
    assert attributes["seed"] == SEED
    assert len(vocabulary["upper_colour"]) >= 10 and len(vocabulary["upper_type"]) >= 6
    for person in attributes["identities"].values():
        for key in ("gender", "hair_style", "hair_colour", "upper_type", "upper_colour"):
            assert person[key] in vocabulary[key]
        for key in ("lower_type", "lower_colour", "shoes_type", "shoes_colour"):
            assert person[key] in vocabulary[key]
        for accessory in ("bag", "hat"):
            if person[accessory] is not None:
                assert person[accessory]["type"] in vocabulary[f"{accessory}_type"]
                assert person[accessory]["colour"] in vocabulary[f"{accessory}_colour"]
        assert isinstance(person["glasses"], bool)


# ---------------------------------------------------------------------- images
def test_images_decode_as_portrait_crops(bench: Path, loaded) -> None:
    records, _ = loaded
    for record in records:
        with Image.open(bench / "imgs" / record["file_path"]) as image:
            assert image.format == "JPEG"
            image.load()
            width, height = image.size
        assert 64 <= width <= 128 and 160 <= height <= 320
        assert height > 1.5 * width


def test_images_of_one_identity_differ(bench: Path, loaded) -> None:
    records, _ = loaded
    paths = defaultdict(list)
    for record in records:
        paths[record["id"]].append(bench / "imgs" / record["file_path"])
    for first, second in paths.values():
        a, b = Image.open(first).convert("RGB"), Image.open(second).convert("RGB")
        if a.size == b.size:
            assert np.abs(np.asarray(a, int) - np.asarray(b, int)).mean() > 2.0


# ---------------------------------------------------------------------- attributes and captions
def test_attributes_are_shared_but_combinations_are_not(loaded) -> None:
    _, attributes = loaded
    people = list(attributes["identities"].values())
    colours = Counter(p["upper_colour"] for p in people)
    assert colours.most_common(1)[0][1] >= 3  # the commonest top colour is shared
    assert len(colours) >= 8 and colours.most_common(1)[0][1] <= 0.3 * len(people)
    outfits = {
        (p["upper_colour"], p["upper_type"], p["lower_colour"], p["lower_type"]) for p in people
    }
    assert len(outfits) >= 0.9 * len(people)
    assert {p["gender"] for p in people} == {"man", "woman"}


def test_captions_mention_the_upper_garment(loaded) -> None:
    records, attributes = loaded
    phrases = attributes["phrases"]["upper_type"]
    colour_hits = garment_hits = total = 0
    for record in records:
        person = attributes["identities"][str(record["id"])]
        words = phrases[person["upper_type"]]
        for caption in record["captions"]:
            text = caption.lower()
            total += 1
            colour_hits += bool(re.search(rf"\b{person['upper_colour']}\b", text))
            garment_hits += any(word in text for word in words)
    assert colour_hits / total >= 0.8
    assert garment_hits / total >= 0.8


def test_captions_never_invent_accessories(loaded) -> None:
    records, attributes = loaded
    for record in records:
        person = attributes["identities"][str(record["id"])]
        for tokens in record["processed_tokens"]:
            if not person["glasses"]:
                assert not {"glasses", "eyeglasses", "spectacles"} & set(tokens)
            if person["bag"] is None or person["bag"]["type"] != "backpack":
                assert not {"backpack", "rucksack"} & set(tokens)
            if person["hat"] is None:
                assert not {"cap", "beanie", "hat"} & set(tokens)
            pronoun = "she" if person["gender"] == "woman" else "he"
            assert ({"she", "her"} if pronoun == "he" else {"he", "his"}).isdisjoint(tokens)


def test_captions_use_several_sentence_patterns(loaded) -> None:
    records, _ = loaded
    captions = [c for r in records if r["id"] <= 50 for c in r["captions"]]
    openings = {" ".join(tokenize(c)[:3]) for c in captions}
    assert len(openings) >= 6
    first_words = Counter(tokenize(c)[0] for c in captions)
    assert first_words.most_common(1)[0][1] < 0.6 * len(captions)


def test_caption_length_is_cuhk_like(loaded) -> None:
    records, _ = loaded
    captions = [c for r in records for c in r["captions"]]
    lengths = [len(tokenize(c)) for c in captions]
    assert 15 <= np.mean(lengths) <= 35
    sentences = [len(re.findall(r"[.!?](?:\s|$)", c)) for c in captions]
    assert min(sentences) >= 1 and max(sentences) <= 4


# ---------------------------------------------------------------------- guards
def test_refuses_to_overwrite_a_finished_benchmark(tmp_path: Path) -> None:
    _tiny(tmp_path, seed=1)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _tiny(tmp_path, seed=2)
    summary = generate(
        tmp_path, identities=4, images_per_identity=1, seed=2, workers=1, overwrite=True
    )
    records, attributes = _load(tmp_path)
    assert len(records) == summary["images"] == 4
    assert attributes["seed"] == 2
    assert len(_image_bytes(tmp_path)) == 4  # the old images are gone


@pytest.mark.parametrize(
    "kwargs",
    [
        {"identities": 0, "images_per_identity": 1},
        {"identities": 3, "images_per_identity": 0},
        {"identities": 3, "images_per_identity": 1, "split_fractions": (0.5, 0.2, 0.2)},
        {"identities": 3, "images_per_identity": 1, "captions_per_image": 0},
        {"identities": 3, "images_per_identity": 1, "seed": -1},
    ],
)
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate(tmp_path, workers=1, **kwargs)

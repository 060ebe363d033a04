"""Tests of pedsynth.tasks.ingest: every reader, and every kind of bad input ending as a reject."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.tables import (
    CATALOG_SCHEMA,
    PAIRS_SCHEMA,
    REJECTS_SCHEMA,
    pairs_table,
    stable_id,
)
from pedsynth.tasks.ingest import (
    REJECT_REASONS,
    CheckedImage,
    Rejection,
    check_caption,
    check_image,
    load_images,
    read_catalog,
    verify_pairs,
)

CFG = IngestConfig()
JPEG_MAGIC = b"\xff\xd8"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------------------------
# fixtures


def noise(mode: str = "RGB", size: tuple[int, int] = (16, 40), seed: int = 0) -> Image.Image:
    """A small noisy image (noise so that JPEG/PNG files are not trivially small)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(
        mode
    )


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def put(path: Path, data: bytes) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data


def header_bomb(width: int, height: int) -> bytes:
    """A valid-looking PNG whose header claims ``width`` x ``height`` (the data is tiny)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def record(path: str, pid: int | str = 1, split: str = "train", captions: Any = None) -> dict:
    caps = ["A man in a red coat."] if captions is None else captions
    return {"split": split, "captions": caps, "file_path": path, "id": pid}


def symlink_loop(path: Path) -> None:
    """``path`` -> ``path.loop`` -> ``path``: every open or stat fails with ELOOP, even as root."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partner = path.with_name(path.name + ".loop")
    path.symlink_to(partner.name)
    partner.symlink_to(path.name)


def dataset(root: Path, records: list, name: str = "reid_raw.json") -> Path:
    """A CUHK-PEDES-style folder: the annotation file and an ``imgs`` folder."""
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    (root / name).write_text(json.dumps(records))
    return root


def reasons(rejects: pa.Table) -> Counter:
    return Counter(rejects.column("reason").to_pylist())


def cuhk(path: Path | str, **kwargs: Any) -> SourceConfig:
    return SourceConfig(format="cuhk-pedes", path=str(path), **kwargs)


# --------------------------------------------------------------------------------------------
# readers


def test_cuhk_reader_folder_or_json_path(tmp_path: Path) -> None:
    root = dataset(
        tmp_path / "CUHK-PEDES",
        [
            {**record("CUHK01/a.jpg", 7), "processed_tokens": [["a", "man"]]},
            record("test_query/b.jpg", "12", split="test"),
            record("x/c.jpg", 3, split="validation"),
            record("x/d.jpg", 3, split="dev"),
        ],
    )
    catalog, rejects = read_catalog(cuhk(root))
    assert catalog.schema.equals(CATALOG_SCHEMA)
    assert rejects.schema.equals(REJECTS_SCHEMA) and rejects.num_rows == 0
    rows = catalog.to_pylist()
    assert rows[0] == {
        "source": "cuhk-pedes:reid_raw.json#0",
        "image_path": str(root / "imgs" / "CUHK01/a.jpg"),
        "rel_path": "CUHK01/a.jpg",
        "image_id": "cuhk-pedes:CUHK01/a.jpg",
        "person_id": "cuhk-pedes:7",
        "split": "train",
        "captions": ["A man in a red coat."],
    }
    assert [r["person_id"] for r in rows] == [f"cuhk-pedes:{i}" for i in (7, 12, 3, 3)]
    assert [r["split"] for r in rows] == ["train", "test", "val", "val"]
    assert all(Path(r["image_path"]).is_absolute() for r in rows)
    from_file, _ = read_catalog(cuhk(root / "reid_raw.json"))
    assert from_file.equals(catalog)
    named, _ = read_catalog(cuhk(root, name="cuhk"))
    assert named.column("image_id")[0].as_py() == "cuhk:CUHK01/a.jpg"


@pytest.mark.parametrize(
    "name",
    ["ICFG-PEDES.json", "ICFG_PEDES.json", "ICFG-PDES.json", "icfg-pedes.json", "Icfg Pdes.JSON"],
)
def test_icfg_reader_accepts_misspelt_names(tmp_path: Path, name: str) -> None:
    root = dataset(tmp_path, [record("test/0001/a.jpg", 1, "test"), record("train/b.jpg", 2)], name)
    (tmp_path / "other.json").write_text("[]")
    source = SourceConfig(format="icfg-pedes", path=str(root))
    catalog, rejects = read_catalog(source)
    assert rejects.num_rows == 0
    assert catalog.column("source").to_pylist() == [f"icfg-pedes:{name}#0", f"icfg-pedes:{name}#1"]
    assert catalog.column("split").to_pylist() == ["test", "train"]
    by_file = SourceConfig(format="icfg-pedes", path=str(root / name))
    assert read_catalog(by_file)[0].equals(catalog)


def test_icfg_reader_needs_exactly_one_annotation_file(tmp_path: Path) -> None:
    dataset(tmp_path, [], "reid_raw.json")
    source = SourceConfig(format="icfg-pedes", path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ICFG-PEDES.json"):
        read_catalog(source)
    (tmp_path / "ICFG-PEDES.json").write_text("[]")
    (tmp_path / "ICFG_PDES.json").write_text("[]")
    with pytest.raises(ValueError, match="several"):
        read_catalog(source)


def test_rstpreid_reader(tmp_path: Path) -> None:
    records = [
        {"id": 0, "img_path": "0000_c14_0031.jpg", "captions": ["a", "b"], "split": "train"},
        {"id": 1, "img_path": "0001_c1_0001.jpg", "captions": ["c"], "split": "val"},
        {"id": 2, "img_path": "0002_c2_0001.jpg", "captions": ["d"], "split": "test"},
        {"id": 3, "file_path": "wrong_key.jpg", "captions": ["e"], "split": "test"},
    ]
    root = dataset(tmp_path / "RSTPReid", records, "data_captions.json")
    source = SourceConfig(format="rstpreid", path=str(root))
    catalog, rejects = read_catalog(source)
    assert catalog.column("image_id").to_pylist() == [
        "rstpreid:0000_c14_0031.jpg",
        "rstpreid:0001_c1_0001.jpg",
        "rstpreid:0002_c2_0001.jpg",
    ]
    assert catalog.column("split").to_pylist() == ["train", "val", "test"]
    assert catalog.column("source")[1].as_py() == "rstpreid:data_captions.json#1"
    assert rejects.column("reason").to_pylist() == ["bad_record"]
    assert "img_path" in rejects.column("detail")[0].as_py()
    file_source = SourceConfig(format="rstpreid", path=str(root / "data_captions.json"))
    assert read_catalog(file_source)[0].equals(catalog)


def test_folder_reader_per_identity(tmp_path: Path) -> None:
    jpeg = encode(noise(), "JPEG")
    for rel in ["0002/c.jpeg", "0001/sub/b.PNG", "0001/a.jpg", ".hidden/x.jpg", "0002/.x.jpg"]:
        put(tmp_path / rel, jpeg)
    put(tmp_path / "0001/notes.txt", b"not an image")
    put(tmp_path / "stray.webp", jpeg)
    source = SourceConfig(format="folder", path=str(tmp_path), name="mine", split="test")
    catalog, rejects = read_catalog(source)
    rows = catalog.to_pylist()
    assert [r["rel_path"] for r in rows] == ["0001/a.jpg", "0001/sub/b.PNG", "0002/c.jpeg"]
    assert [r["person_id"] for r in rows] == ["mine:0001", "mine:0001", "mine:0002"]
    assert rows[0]["image_id"] == rows[0]["source"] == "mine:0001/a.jpg"
    assert {r["split"] for r in rows} == {"test"}
    assert all(r["captions"] == [] for r in rows)
    assert rejects.to_pylist() == [
        {
            "stage": "ingest",
            "reason": "bad_record",
            "detail": "image is not inside an identity folder",
            "source": "mine:stray.webp",
            "image_id": None,
            "pair_id": None,
            "person_id": None,
            "split": None,
            "caption": None,
        }
    ]


def test_folder_reader_per_image(tmp_path: Path) -> None:
    jpeg = encode(noise(), "JPEG")
    for rel in ["b/2.jpg", "a.jpg", "b/1.TIFF"]:
        put(tmp_path / rel, jpeg)
    source = SourceConfig(format="folder", path=str(tmp_path), layout="per-image")
    catalog, rejects = read_catalog(source)
    assert rejects.num_rows == 0
    assert catalog.column("person_id").to_pylist() == ["folder:a", "folder:b/1", "folder:b/2"]
    assert catalog.column("split").to_pylist() == ["train"] * 3


def test_missing_sources_and_unsupported_formats(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_catalog(cuhk(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="reid_raw.json"):
        read_catalog(cuhk(tmp_path))
    (tmp_path / "reid_raw.json").write_text("[]")
    with pytest.raises(FileNotFoundError, match="imgs"):
        read_catalog(cuhk(tmp_path))
    with pytest.raises(FileNotFoundError, match="folder source"):
        read_catalog(SourceConfig(format="folder", path=str(tmp_path / "nope")))
    for fmt in ("shards", "procedural"):
        with pytest.raises(ValueError, match=fmt):
            read_catalog(SourceConfig(format=fmt, path=str(tmp_path)))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[{"split": "train", "captions": ["a"], "file_path": "a.jpg", "id": 1}, {"spl', "line 1"),
        ('{"images": []}', "top level is a JSON object"),
        ("", "line 1 column 1"),
        ("null", "top level is a JSON null"),
        ("\xff\xfe garbage", "utf-8"),
    ],
)
def test_malformed_json_gives_one_reject(tmp_path: Path, text: str, expected: str) -> None:
    dataset(tmp_path, [])
    (tmp_path / "reid_raw.json").write_bytes(text.encode("latin-1"))
    catalog, rejects = read_catalog(cuhk(tmp_path))
    assert catalog.num_rows == 0 and catalog.schema.equals(CATALOG_SCHEMA)
    [reject] = rejects.to_pylist()
    assert (reject["stage"], reject["reason"]) == ("ingest", "malformed_json")
    assert reject["source"] == "cuhk-pedes:reid_raw.json"
    assert expected in reject["detail"]
    if expected.startswith("line"):
        assert "column" in reject["detail"]


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"id": "abc"}, "id = 'abc'"),
        ({"id": True}, "id = True"),
        ({"id": 1.5}, "id = 1.5"),
        ({"captions": "a string"}, "captions = 'a string'"),
        ({"file_path": None}, "file_path = None"),
        ({"file_path": ""}, "file_path = ''"),
        ({"split": "holdout"}, "split = 'holdout'"),
        ({"split": 3}, "split = 3"),
        ({"id": None, "file_path": None}, "file_path = None"),
        ({"captions": "x" * 500}, "…"),
    ],
)
def test_bad_record_names_the_field(tmp_path: Path, bad: dict, field: str) -> None:
    dataset(tmp_path, [record("good.jpg"), record("bad.jpg") | bad, record("good2.jpg")])
    catalog, rejects = read_catalog(cuhk(tmp_path))
    assert catalog.column("rel_path").to_pylist() == ["good.jpg", "good2.jpg"]
    [reject] = rejects.to_pylist()
    assert reject["reason"] == "bad_record"
    assert reject["source"] == "cuhk-pedes:reid_raw.json#1"
    assert field in reject["detail"]
    assert len(reject["detail"]) < 500


@pytest.mark.parametrize("path", ["../../etc/passwd", "/abs/a.jpg", "a/../../b.jpg"])
def test_a_path_leaving_the_image_folder_is_outside_root(tmp_path: Path, path: str) -> None:
    dataset(tmp_path, [record("good.jpg"), record("bad.jpg") | {"file_path": path}])
    catalog, rejects = read_catalog(cuhk(tmp_path))
    assert catalog.column("rel_path").to_pylist() == ["good.jpg"]
    [reject] = rejects.to_pylist()
    assert reject["reason"] == "outside_root"
    assert reject["source"] == "cuhk-pedes:reid_raw.json#1"
    assert f"file_path {path!r}" in reject["detail"]


def test_bad_record_shapes(tmp_path: Path) -> None:
    missing = record("m.jpg")
    del missing["captions"]
    dataset(tmp_path, [missing, "just a string", [1, 2], None, record("ok.jpg", " 42 ")])
    catalog, rejects = read_catalog(cuhk(tmp_path))
    assert catalog.column("person_id").to_pylist() == ["cuhk-pedes:42"]
    details = rejects.column("detail").to_pylist()
    assert reasons(rejects) == Counter(bad_record=4)
    assert details[0] == "missing key 'captions'"
    assert rejects.column("image_id")[0].as_py() == "cuhk-pedes:m.jpg"
    assert all("expected a JSON object" in d for d in details[1:])


def test_duplicate_image_keeps_the_first(tmp_path: Path) -> None:
    dataset(tmp_path, [record("a.jpg", 1), record("b.jpg", 2), record("a.jpg", 3)])
    catalog, rejects = read_catalog(cuhk(tmp_path))
    assert catalog.column("person_id").to_pylist() == ["cuhk-pedes:1", "cuhk-pedes:2"]
    [reject] = rejects.to_pylist()
    assert reject["reason"] == "duplicate_image"
    assert reject["source"] == "cuhk-pedes:reid_raw.json#2"
    assert "record 0" in reject["detail"]


# --------------------------------------------------------------------------------------------
# the corpus: every kind of bad input at once, every good row arrives


@pytest.fixture()
def corpus(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "CUHK-PEDES"
    imgs = root / "imgs"
    files = {
        "good/a.jpg": put(imgs / "good/a.jpg", encode(noise(seed=1), "JPEG")),
        "good/b.png": put(imgs / "good/b.png", encode(noise("RGBA", seed=2), "PNG")),
        "good/c.jpg": put(imgs / "good/c.jpg", encode(noise(seed=3), "JPEG")),
        "good/d.jpg": put(imgs / "good/d.jpg", encode(noise(seed=4), "JPEG")),
    }
    jpeg, png = encode(noise(seed=5), "JPEG"), encode(noise(seed=6), "PNG")
    put(imgs / "bad/empty.jpg", b"")
    put(imgs / "bad/trunc.jpg", jpeg[: len(jpeg) // 2])
    put(imgs / "bad/trunc.png", png[: len(png) // 2])
    put(imgs / "bad/text.jpg", b"this is not an image\n")
    put(imgs / "bad/big.png", encode(noise(size=(64, 64)), "PNG"))
    put(imgs / "bad/bomb.png", header_bomb(30_000, 30_000))
    put(imgs / "bad/heavy.jpg", jpeg + b"\0" * 200_000)
    put(imgs / "bad/small.jpg", encode(noise(size=(4, 40)), "JPEG"))
    (imgs / "bad/folder.jpg").mkdir()
    symlink_loop(imgs / "bad/loop.jpg")
    mixed = ["Good one.", "", "   \n\t", 5, {"a": 1}, "x" * 150, "\x00\x01abc"]
    records = [
        record("good/a.jpg", 1, captions=["A man in a red coat.", "  He  carries\n a bag "]),
        record("good/b.png", 2, split="test", captions=["A woman in blue."]),
        record("good/c.jpg", 3, captions=mixed),
        record("good/d.jpg", 4, captions=["", 7]),
        record("bad/missing.jpg", 5),
        record("bad/empty.jpg", 5),
        record("bad/trunc.jpg", 5),
        record("bad/trunc.png", 5),
        record("bad/text.jpg", 5),
        record("bad/big.png", 5),
        record("bad/bomb.png", 5),
        record("bad/heavy.jpg", 5),
        record("bad/small.jpg", 5),
        record("bad/folder.jpg", 5),
        record("bad/loop.jpg", 5),
        record("bad/id.jpg", "abc"),
        record("bad/captions.jpg", 6, captions="a string"),
        record("bad/path.jpg", 6) | {"file_path": None},
        record("bad/split.jpg", 6, split="holdout"),
        record("good/a.jpg", 9),
    ]
    dataset(root, records)
    return root, files


CORPUS_CFG = IngestConfig(max_pixels=3_600, max_image_bytes=100_000, max_caption_chars=100)
IMAGE_REJECTS = {
    "bad/missing.jpg": "missing_file",
    "bad/empty.jpg": "empty_file",
    "bad/trunc.jpg": "truncated",
    "bad/trunc.png": "truncated",
    "bad/text.jpg": "undecodable",
    "bad/big.png": "too_large",
    "bad/bomb.png": "too_large",
    "bad/heavy.jpg": "too_large",
    "bad/small.jpg": "too_small",
    "bad/folder.jpg": "missing_file",
    "bad/loop.jpg": "unreadable_file",
}


def ingest(root: Path, cfg: IngestConfig = CORPUS_CFG) -> tuple[pa.Table, pa.Table, pa.Table]:
    catalog, catalog_rejects = read_catalog(cuhk(root))
    pairs, load_rejects = load_images(catalog, cfg)
    return pairs, catalog_rejects, load_rejects


def test_corpus_every_bad_input_is_one_reject(corpus: tuple[Path, dict]) -> None:
    root, _ = corpus
    pairs, catalog_rejects, load_rejects = ingest(root)
    assert reasons(catalog_rejects) == Counter(bad_record=4, duplicate_image=1, non_text_caption=3)
    assert reasons(load_rejects) == Counter(IMAGE_REJECTS.values()) + Counter(
        empty_caption=3, non_text_caption=1, caption_too_long=1
    )
    all_reasons = set(reasons(catalog_rejects)) | set(reasons(load_rejects))
    assert all_reasons <= set(REJECT_REASONS)
    image_rejects = {
        r["image_id"].split(":", 1)[1]: r["reason"]
        for r in load_rejects.to_pylist()
        if not r["source"].rsplit("/", 1)[-1].startswith("caption")
    }
    assert image_rejects == IMAGE_REJECTS
    for r in load_rejects.to_pylist():
        assert r["stage"] == "ingest" and r["detail"] and r["person_id"] and r["split"]

    assert pairs.schema.equals(PAIRS_SCHEMA)
    assert pairs.column("caption").to_pylist() == [
        "A man in a red coat.",
        "He carries a bag",
        "A woman in blue.",
        "Good one.",
        None,
    ]
    assert pairs.column("source").to_pylist() == [
        "cuhk-pedes:reid_raw.json#0/caption0",
        "cuhk-pedes:reid_raw.json#0/caption1",
        "cuhk-pedes:reid_raw.json#1/caption0",
        "cuhk-pedes:reid_raw.json#2/caption0",
        "cuhk-pedes:reid_raw.json#3",
    ]
    assert pairs.column("caption_source").to_pylist() == ["original"] * 4 + [None]
    assert set(pairs.column("generator").to_pylist()) == {"dataset:cuhk-pedes"}
    assert pairs.column("split").to_pylist() == ["train", "train", "test", "train", "train"]
    assert pairs.column("width").to_pylist() == [16] * 5
    assert pairs.column("height").to_pylist() == [40] * 5
    assert pairs.column("parent_id").null_count == 5


def _no_read_permission(path: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("root reads a file without read permission; see the other cases")
    put(path, encode(noise(), "JPEG"))
    path.chmod(0)
    return "Permission denied"


def _looping_link(path: Path) -> str:
    symlink_loop(path)
    return "Too many levels of symbolic links"


@pytest.mark.parametrize(
    "make_unreadable",
    [_looping_link, _no_read_permission],
    ids=["symlink-loop", "chmod-000"],
)
def test_unreadable_file_is_a_reject_with_the_os_reason(tmp_path: Path, make_unreadable) -> None:
    root = tmp_path / "CUHK-PEDES"
    put(root / "imgs" / "ok.jpg", encode(noise(seed=9), "JPEG"))
    why = make_unreadable(root / "imgs" / "locked.jpg")
    dataset(root, [record("locked.jpg", 1), record("ok.jpg", 2)])
    pairs, catalog_rejects, load_rejects = ingest(root, CFG)
    assert catalog_rejects.num_rows == 0
    assert pairs.column("image_id").to_pylist() == ["cuhk-pedes:ok.jpg"]
    [reject] = load_rejects.to_pylist()
    assert reject["reason"] == "unreadable_file"
    assert reject["detail"] == f"{root / 'imgs' / 'locked.jpg'}: {why}"
    assert reject["source"] == "cuhk-pedes:reid_raw.json#0"
    assert (reject["image_id"], reject["person_id"]) == ("cuhk-pedes:locked.jpg", "cuhk-pedes:1")


def test_corpus_caption_rejects_carry_ids_and_text(corpus: tuple[Path, dict]) -> None:
    root, _ = corpus
    _, catalog_rejects, load_rejects = ingest(root)
    rows = catalog_rejects.to_pylist() + load_rejects.to_pylist()
    captions = {r["source"]: r for r in rows if "/caption" in r["source"]}
    c = "cuhk-pedes:reid_raw.json#2/caption"
    assert {k: (v["reason"], v["caption"]) for k, v in captions.items() if k.startswith(c)} == {
        f"{c}1": ("empty_caption", ""),
        f"{c}2": ("empty_caption", "   \n\t"),
        f"{c}3": ("non_text_caption", "5"),
        f"{c}4": ("non_text_caption", '{"a": 1}'),
        f"{c}5": ("caption_too_long", "x" * 150),
        f"{c}6": ("non_text_caption", "\x00\x01abc"),
    }
    assert all(v["image_id"] and v["person_id"] and v["split"] for v in captions.values())
    assert "150 characters" in captions[f"{c}5"]["detail"]


def test_corpus_ids_are_stable(corpus: tuple[Path, dict]) -> None:
    root, _ = corpus
    first, second = ingest(root), ingest(root)
    for a, b in zip(first, second, strict=True):
        assert a.equals(b)
    pairs = first[0].to_pylist()
    assert pairs[0]["pair_id"] == stable_id(
        "cuhk-pedes:good/a.jpg", "original", 0, pairs[0]["caption"]
    )
    assert pairs[3]["pair_id"] == stable_id("cuhk-pedes:good/c.jpg", "original", 0, "Good one.")
    assert pairs[4]["pair_id"] == stable_id("cuhk-pedes:good/d.jpg", "uncaptioned")
    assert len({p["pair_id"] for p in pairs}) == len(pairs)


def test_corpus_jpeg_kept_png_converted_once(corpus: tuple[Path, dict]) -> None:
    root, files = corpus
    pairs = ingest(root)[0].to_pylist()
    assert pairs[0]["image"] == {"bytes": files["good/a.jpg"], "path": "good/a.jpg"}
    converted = pairs[2]["image"]
    assert converted["path"] == "good/b.jpg"
    assert converted["bytes"].startswith(JPEG_MAGIC)
    with Image.open(io.BytesIO(converted["bytes"])) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (16, 40))
    again = check_image(converted["bytes"], converted["path"], CFG)
    assert again == CheckedImage(16, 40, converted["bytes"], "good/b.jpg")  # not re-encoded


def test_folder_source_gives_uncaptioned_rows(tmp_path: Path) -> None:
    put(tmp_path / "p1/a.jpg", encode(noise(), "JPEG"))
    put(tmp_path / "p1/b.png", encode(noise("P"), "PNG"))
    catalog, _ = read_catalog(SourceConfig(format="folder", path=str(tmp_path)))
    pairs, rejects = load_images(catalog, CFG)
    assert rejects.num_rows == 0
    assert pairs.column("caption").to_pylist() == [None, None]
    assert pairs.column("pair_id").to_pylist() == [
        stable_id("folder:p1/a.jpg", "uncaptioned"),
        stable_id("folder:p1/b.png", "uncaptioned"),
    ]
    assert pairs.column("image")[1].as_py()["path"] == "p1/b.jpg"


def test_load_images_rejects_a_table_that_is_not_a_catalog() -> None:
    with pytest.raises(ValueError, match="no column 'source'"):
        load_images(pa.table({"x": [1]}), CFG)
    wrong = CATALOG_SCHEMA.empty_table().set_column(
        6, "captions", pa.array([], pa.list_(pa.int64()))
    )
    with pytest.raises(ValueError, match="captions"):
        load_images(wrong, CFG)
    with pytest.raises(TypeError):
        load_images([], CFG)  # type: ignore[arg-type]
    assert load_images(CATALOG_SCHEMA.empty_table(), CFG)[0].num_rows == 0


# --------------------------------------------------------------------------------------------
# image and caption checks


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("1", "PNG"),
        ("L", "PNG"),
        ("RGB", "BMP"),
        ("RGB", "WEBP"),
        ("P", "GIF"),
        ("RGB", "TIFF"),
        ("CMYK", "TIFF"),
    ],
)
def test_non_jpeg_modes_convert_to_rgb_jpeg(mode: str, fmt: str) -> None:
    result = check_image(encode(noise(mode), fmt), "x/img.data.png", CFG)
    assert isinstance(result, CheckedImage), result
    assert result.data.startswith(JPEG_MAGIC) and result.path == "x/img.data.jpg"
    with Image.open(io.BytesIO(result.data)) as img:
        assert (img.mode, img.size) == ("RGB", (16, 40))


def test_alpha_and_palette_transparency_composite_on_white() -> None:
    cfg = IngestConfig(convert_format="png")
    rgba = Image.new("RGBA", (16, 40), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    palette = Image.new("P", (16, 40), 1)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((0, 0), 0)
    for img, kwargs in ((rgba, {}), (palette, {"transparency": 0})):
        result = check_image(encode(img, "PNG", **kwargs), "a.png", cfg)
        assert isinstance(result, CheckedImage) and result.data.startswith(PNG_MAGIC)
        with Image.open(io.BytesIO(result.data)) as out:
            assert out.mode == "RGB"
            assert out.getpixel((0, 0)) == (255, 255, 255)
            assert out.getpixel((1, 1)) in ((255, 0, 0), (0, 0, 255))


def test_16_bit_png_is_scaled_to_8_bits() -> None:
    pixels = np.full((40, 16), 0x8000, dtype=np.uint16)
    pixels[0, 0] = 0xFFFF
    data = encode(Image.fromarray(pixels), "PNG")
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I")
    result = check_image(data, "deep.png", IngestConfig(convert_format="png"))
    assert isinstance(result, CheckedImage)
    with Image.open(io.BytesIO(result.data)) as out:
        assert out.getpixel((1, 1)) == (128, 128, 128)
        assert out.getpixel((0, 0)) == (255, 255, 255)
    assert isinstance(check_image(data, "deep.png", CFG), CheckedImage)


def test_grayscale_jpeg_is_stored_as_it_is() -> None:
    data = encode(noise("L"), "JPEG")
    assert check_image(data, "a.jpeg", CFG) == CheckedImage(16, 40, data, "a.jpeg")
    assert check_image(data, "misnamed.png", CFG).path == "misnamed.jpg"


def test_header_size_is_checked_before_decoding() -> None:
    # 7000 x 7000 is under Pillow's own limit; decoding it would take seconds
    result = check_image(header_bomb(7_000, 7_000), "bomb.png", CFG)
    assert result.reason == "too_large" and "49000000 pixels" in result.detail
    assert check_image(header_bomb(30_000, 30_000), "bomb.png", CFG).reason == "too_large"


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_warning_is_too_large() -> None:
    cfg = IngestConfig(max_pixels=10**9)  # our limit passes, Pillow's warning fires
    assert check_image(header_bomb(10_000, 10_000), "bomb.png", cfg).reason == "too_large"


def test_truncation_is_caught_even_if_the_caller_allows_truncated_images(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    jpeg = encode(noise(), "JPEG")
    cut = jpeg[: len(jpeg) // 2]
    result = check_image(cut, "cut.jpg", CFG)
    assert isinstance(result, Rejection) and result.reason == "truncated"
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    with ThreadPoolExecutor(8) as pool:  # the flag is global: concurrent checks must not race
        results = list(pool.map(lambda _: check_image(cut, "cut.jpg", CFG), range(64)))
    assert {r.reason for r in results} == {"truncated"}
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_check_image_details_are_deterministic() -> None:
    first = check_image(b"plain text", "a.jpg", CFG)
    assert first == check_image(b"plain text", "a.jpg", CFG)
    assert first == Rejection("undecodable", "a.jpg: not an image file Pillow can identify")
    assert check_image(b"", "a.jpg", CFG) == Rejection("empty_file", "a.jpg: 0 bytes")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  A  man\n in\tred ", "A man in red"),
        ("cafe\u0301 owner", "caf\u00e9 owner"),
        ("", "empty_caption"),
        (" \n\u3000 ", "empty_caption"),
        (12, "non_text_caption"),
        (None, "non_text_caption"),
        ("12 34 !!", "non_text_caption"),
        ("a man\x07", "non_text_caption"),
        ("mojibake \ufffd", "non_text_caption"),
        ("y" * 2_001, "caption_too_long"),
        ("y" * 2_000, "y" * 2_000),
    ],
)
def test_check_caption(value: object, expected: str) -> None:
    result = check_caption(value, CFG.max_caption_chars)
    got = result.reason if isinstance(result, Rejection) else result
    assert got == expected


def test_surrogate_caption_is_rejected_while_cataloguing(tmp_path: Path) -> None:
    dataset(tmp_path, [record("a.jpg", captions=["ok text", "bad \ud800"])])  # JSON "\\ud800"
    catalog, rejects = read_catalog(cuhk(tmp_path))
    assert catalog.column("captions").to_pylist() == [["ok text", None]]
    [reject] = rejects.to_pylist()
    assert reject["reason"] == "non_text_caption" and reject["caption"] == "bad \\ud800"


# --------------------------------------------------------------------------------------------
# verify_pairs (the shards source)


@pytest.fixture()
def good_pairs(corpus: tuple[Path, dict]) -> pa.Table:
    return ingest(corpus[0])[0]


def test_verify_pairs_passes_good_rows_unchanged(good_pairs: pa.Table) -> None:
    kept, rejects = verify_pairs(good_pairs, CFG, "old")
    assert rejects.num_rows == 0
    assert kept.equals(good_pairs)


def test_verify_pairs_rejects_bad_images(good_pairs: pa.Table) -> None:
    rows = good_pairs.to_pylist()
    jpeg = rows[0]["image"]["bytes"]
    bad = {
        1: ({"bytes": jpeg[: len(jpeg) // 2], "path": "t.jpg"}, "truncated"),
        2: ({"bytes": b"", "path": "e.jpg"}, "empty_file"),
        3: ({"bytes": None, "path": "n.jpg"}, "missing_file"),
        4: ({"bytes": b"<html>", "path": "h.jpg"}, "undecodable"),
    }
    for i, (image, _) in bad.items():
        rows[i]["image"] = image
    kept, rejects = verify_pairs(pairs_table(rows), CFG, "old")
    assert kept.column("pair_id").to_pylist() == [rows[0]["pair_id"]]
    assert rejects.column("reason").to_pylist() == [reason for _, reason in bad.values()]
    assert rejects.column("pair_id").to_pylist() == [rows[i]["pair_id"] for i in bad]
    assert rejects.column("source").to_pylist() == [rows[i]["source"] for i in bad]
    assert verify_pairs(pairs_table(rows), IngestConfig(min_side=20), "old")[0].num_rows == 0


def test_verify_pairs_casts_older_tables(good_pairs: pa.Table) -> None:
    old = good_pairs.drop_columns(["edit", "tokens", "clip_score"]).append_column(
        "legacy", pa.array([1] * good_pairs.num_rows)
    )
    old = old.set_column(
        old.column_names.index("width"), "width", old.column("width").cast("int64")
    )
    kept, rejects = verify_pairs(old, CFG, "old")
    assert rejects.num_rows == 0 and kept.schema.equals(PAIRS_SCHEMA)
    assert kept.column("edit").null_count == kept.num_rows
    assert kept.column("width").equals(good_pairs.column("width"))
    with pytest.raises(ValueError, match="image_id"):
        verify_pairs(good_pairs.drop_columns(["image_id"]), CFG, "old")


def test_verify_pairs_rejects_null_required_values(good_pairs: pa.Table) -> None:
    rows = good_pairs.to_pylist()
    rows[1]["width"] = None
    loose = pa.schema([f.with_nullable(True) for f in PAIRS_SCHEMA])
    kept, rejects = verify_pairs(pa.Table.from_pylist(rows, schema=loose), CFG, "old")
    assert kept.num_rows == len(rows) - 1
    [reject] = rejects.to_pylist()
    assert reject["reason"] == "bad_record" and "'width'" in reject["detail"]

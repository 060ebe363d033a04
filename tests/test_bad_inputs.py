"""A corpus of bad inputs through the whole flow: each ends as a reject row, good rows arrive."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.test_build import run_build


def _jpeg(size=(40, 100), colour=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _png_rgba(size=(30, 80)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (10, 200, 10, 128)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def bad_corpus(tmp_path: Path) -> tuple[Path, Path, dict]:
    root = tmp_path / "cuhk"
    imgs = root / "imgs"
    imgs.mkdir(parents=True)
    files = {
        "good1.jpg": _jpeg(),
        "good2.png": _png_rgba(),
        "good3.jpg": _jpeg(colour=(0, 0, 255)),
        "empty.jpg": b"",
        "truncated.jpg": _jpeg((120, 300))[:400],
        "text.jpg": b"this is not an image at all\n",
        "huge.png": None,  # written below: a real image whose pixel count exceeds the limit
        "tiny.jpg": _jpeg((3, 3)),
    }
    for name, data in files.items():
        if data is not None:
            (imgs / name).write_bytes(data)
    Image.new("L", (3000, 3000)).save(imgs / "huge.png")
    (imgs / "loop.jpg").symlink_to("loop2.jpg")  # a link loop: open fails even as root
    (imgs / "loop2.jpg").symlink_to("loop.jpg")
    good_caption = "A man in a red jacket and blue jeans walks with a black backpack."
    records = [
        {"id": 1, "split": "train", "file_path": "good1.jpg", "captions": [good_caption, "   "]},
        {"id": 1, "split": "train", "file_path": "good2.png", "captions": [good_caption, 42]},
        {
            "id": 2,
            "split": "test",
            "file_path": "good3.jpg",
            "captions": [good_caption, "x" * 5000],
        },
        {"id": 3, "split": "train", "file_path": "missing.jpg", "captions": [good_caption]},
        {"id": 3, "split": "train", "file_path": "empty.jpg", "captions": [good_caption]},
        {"id": 4, "split": "train", "file_path": "truncated.jpg", "captions": [good_caption]},
        {"id": 4, "split": "train", "file_path": "text.jpg", "captions": [good_caption]},
        {"id": 5, "split": "train", "file_path": "huge.png", "captions": [good_caption]},
        {"id": 5, "split": "train", "file_path": "tiny.jpg", "captions": [good_caption]},
        {"id": 5, "split": "train", "file_path": "loop.jpg", "captions": [good_caption]},
        {"id": "abc", "split": "train", "file_path": "good1.jpg", "captions": [good_caption]},
        {"id": 6, "split": "train", "file_path": "good1.jpg", "captions": "not a list"},
        {"id": 6, "split": "holdout", "file_path": "good3.jpg", "captions": [good_caption]},
    ]
    (root / "reid_raw.json").write_text(json.dumps(records))
    broken = tmp_path / "rstp"
    (broken / "imgs").mkdir(parents=True)
    (broken / "data_captions.json").write_text('[{"id": 1, "img_path": "a.jpg", "capt')
    expected = Counter(
        {
            "empty_caption": 1,
            "non_text_caption": 1,
            "caption_too_long": 1,
            "missing_file": 1,
            "empty_file": 1,
            "truncated": 1,
            "undecodable": 1,
            "too_large": 1,
            "too_small": 1,
            "unreadable_file": 1,
            "bad_record": 3,
            "malformed_json": 1,
        }
    )
    return root, broken, expected


def test_each_bad_input_becomes_a_reject_and_good_rows_arrive(prefect_server, bad_corpus, tmp_path):
    root, broken, expected = bad_corpus
    out = tmp_path / "out"
    manifest = run_build(
        out,
        [f"cuhk-pedes:{root}", f"rstpreid:{broken}"],
        "ingest.max_pixels=1000000",
        "ingest.max_caption_chars=1000",
    )
    rejects = pq.read_table(out / "latest" / "rejects").to_pylist()
    assert Counter(r["reason"] for r in rejects) == expected
    assert all(r["stage"] == "ingest" and r["detail"] for r in rejects)
    by_reason = {r["reason"]: r for r in rejects}
    assert by_reason["malformed_json"]["source"].startswith("rstpreid")
    assert "truncated.jpg" in by_reason["truncated"]["source"] + str(
        by_reason["truncated"]["image_id"]
    )
    unreadable = by_reason["unreadable_file"]
    assert unreadable["image_id"] == "cuhk-pedes:loop.jpg"
    assert unreadable["detail"].endswith("loop.jpg: Too many levels of symbolic links")

    data = pq.read_table(out / "latest" / "data").to_pylist()
    assert sorted(r["image"]["path"] for r in data) == ["good1.jpg", "good2.jpg", "good3.jpg"]
    assert all(r["caption"].startswith("A man in a red jacket") for r in data)
    png_row = next(r for r in data if r["image"]["path"] == "good2.jpg")
    assert png_row["image"]["bytes"][:2] == b"\xff\xd8"  # converted once, to JPEG
    assert manifest["stages"]["ingest"]["rejected"] == sum(expected.values())
    assert manifest["stages"]["ingest"]["rejects_by_reason"] == dict(sorted(expected.items()))
    assert manifest["totals"]["rejects"] == len(rejects)


def test_uncaptioned_images_are_rejected_at_write_not_dropped(prefect_server, tmp_path):
    folder = tmp_path / "people"
    for pid in ("alice", "bob"):
        (folder / pid).mkdir(parents=True)
        for k in range(2):
            (folder / pid / f"{k}.jpg").write_bytes(_jpeg(colour=(k * 50, 10, 10)))
    out = tmp_path / "out"
    manifest = run_build(out, [f"folder:{folder}"])
    assert manifest["totals"]["pairs"] == 0
    rejects = pq.read_table(out / "latest" / "rejects").to_pylist()
    assert [r["reason"] for r in rejects] == ["uncaptioned"] * 4
    assert {r["person_id"] for r in rejects} == {"folder:alice", "folder:bob"}


def test_missing_source_is_a_clear_error(prefect_server, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        run_build(tmp_path / "out", [f"cuhk-pedes:{tmp_path / 'nowhere'}"])
    shutil.rmtree(tmp_path / "out", ignore_errors=True)

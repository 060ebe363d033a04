"""Ingest safety: paths stay inside the dataset root, metadata is stripped, swaps are noticed.

Real files, real symbolic links, real Pillow-made JPEGs and PNGs; nothing is mocked.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import ExifTags, Image, ImageCms

from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.tasks.card_markdown import sources_section
from pedsynth.tasks.image_checks import CheckedImage, check_image
from pedsynth.tasks.image_metadata import strip_jpeg
from pedsynth.tasks.ingest import load_images, read_catalog
from pedsynth.tasks.sources import ingest_chunk, plan_chunks

CFG = IngestConfig()
KEEP = IngestConfig(strip_metadata=False)
CAPTION = "A woman in a green coat carries a grey bag."


def noise(size: tuple[int, int] = (16, 40), seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels).convert(mode)


def smooth(size: tuple[int, int] = (16, 40), mode: str = "RGB") -> Image.Image:
    """Gradients that differ along each axis, so that lossy copies stay close to the original
    and a turned or mirrored copy does not."""
    w, h = size
    x, y = np.meshgrid(np.linspace(0, 255, w), np.linspace(0, 255, h))
    rgb = np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    out = io.BytesIO()
    img.save(out, fmt, **kwargs)
    return out.getvalue()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB") if img.mode == "CMYK" else img)


def gps_exif(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneMaker"
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (52.0, 31.0, 12.5)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E"
    gps[ExifTags.GPS.GPSLongitude] = (13.0, 24.0, 1.5)
    return exif


def jpeg_markers(data: bytes) -> list[int]:
    """The markers of a JPEG's header segments, up to the first scan."""
    found, at = [], 2
    while data[at] == 0xFF and data[at + 1] != 0xDA:
        found.append(data[at + 1])
        at += 2 + int.from_bytes(data[at + 2 : at + 4], "big")
    return found


def png_chunks(data: bytes) -> list[bytes]:
    kinds, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kinds.append(data[at + 4 : at + 8])
        at += 12 + length
    return kinds


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def annotated(root: Path, paths: list[str]) -> SourceConfig:
    (root / "imgs").mkdir(parents=True, exist_ok=True)
    records = [
        {"id": i, "split": "train", "file_path": p, "captions": [CAPTION]}
        for i, p in enumerate(paths)
    ]
    (root / "reid_raw.json").write_text(json.dumps(records))
    return SourceConfig(format="cuhk-pedes", path=str(root))


def put(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------------------------
# paths stay inside the dataset root


@pytest.fixture
def escapes(tmp_path: Path) -> tuple[SourceConfig, Path]:
    """A dataset whose records reach out of ``imgs/`` in every way, next to two that stay in.

    The file outside is a valid image, so accepting it would succeed: only the root check
    can keep it out.
    """
    secret = put(tmp_path / "elsewhere" / "secret.jpg", encode(noise(seed=7)))
    root = tmp_path / "CUHK"
    imgs = root / "imgs"
    put(imgs / "real" / "a.jpg", encode(noise(seed=1)))
    (imgs / "evil").symlink_to("/")
    (imgs / "leak.jpg").symlink_to(secret)
    (imgs / "outdir").symlink_to(secret.parent)
    (imgs / "alias.jpg").symlink_to("real/a.jpg")
    (imgs / "samedir").symlink_to(imgs / "real")
    paths = [
        "evil/etc/passwd",
        "leak.jpg",
        "outdir/secret.jpg",
        "../../elsewhere/secret.jpg",
        "real/a.jpg",
        "alias.jpg",
        "samedir/a.jpg",
    ]
    return annotated(root, paths), secret


def test_paths_out_of_the_image_folder_are_rejected_outside_root(escapes) -> None:
    source, _ = escapes
    catalog, rejects = read_catalog(source)
    assert catalog.column("rel_path").to_pylist() == ["real/a.jpg", "alias.jpg", "samedir/a.jpg"]
    by_source = {r["source"]: r for r in rejects.to_pylist()}
    assert sorted(by_source) == [f"cuhk-pedes:reid_raw.json#{i}" for i in range(4)]
    assert {r["reason"] for r in by_source.values()} == {"outside_root"}
    for i, path in enumerate(["evil/etc/passwd", "leak.jpg", "outdir/secret.jpg"]):
        detail = by_source[f"cuhk-pedes:reid_raw.json#{i}"]["detail"]
        assert repr(path) in detail and "symbolic link" in detail
        assert "elsewhere" not in detail and "root:" not in detail  # no target, no content
    assert "leaves the image folder" in by_source["cuhk-pedes:reid_raw.json#3"]["detail"]
    pairs, load_rejects = load_images(catalog, CFG)
    assert load_rejects.num_rows == 0
    assert pairs.column("image_id").to_pylist() == [
        "cuhk-pedes:real/a.jpg",
        "cuhk-pedes:alias.jpg",
        "cuhk-pedes:samedir/a.jpg",
    ]
    assert len({row["bytes"] for row in pairs.column("image").to_pylist()}) == 1


def test_a_link_turned_outward_after_cataloguing_is_refused_when_opened(escapes) -> None:
    source, secret = escapes
    catalog, _ = read_catalog(source)
    alias = Path(source.path) / "imgs" / "alias.jpg"
    alias.unlink()
    alias.symlink_to(secret)  # same record, now pointing at a valid image outside
    pairs, rejects = load_images(catalog, CFG)
    assert "cuhk-pedes:alias.jpg" not in pairs.column("image_id").to_pylist()
    [reject] = rejects.to_pylist()
    assert (reject["reason"], reject["image_id"]) == ("outside_root", "cuhk-pedes:alias.jpg")
    assert reject["detail"].startswith("'alias.jpg': ")


def test_folder_walk_follows_links_inside_the_root_only(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    put(outside / "x.jpg", encode(noise(seed=3)))
    root = tmp_path / "people"
    put(root / "p1" / "a.jpg", encode(noise(seed=1)))
    put(root / ".store" / "kept" / "b.jpg", encode(noise(seed=2)))  # hidden, reached by a link
    (root / "p1" / "alias.jpg").symlink_to("a.jpg")
    (root / "p1" / "leak.jpg").symlink_to(outside / "x.jpg")
    (root / "p1" / "up").symlink_to("..")  # a loop back to the root: walked once only
    (root / "p0").symlink_to("p1")  # sorts first, but p1 is listed under its own name
    (root / "p2").symlink_to(outside)
    (root / "p3").symlink_to(root / ".store" / "kept")
    (root / "p4").symlink_to("/")
    source = SourceConfig(format="folder", path=str(root))
    catalog, rejects = read_catalog(source)
    assert catalog.column("rel_path").to_pylist() == ["p1/a.jpg", "p1/alias.jpg", "p3/b.jpg"]
    assert catalog.column("person_id").to_pylist() == ["folder:p1", "folder:p1", "folder:p3"]
    assert [(r["reason"], r["source"]) for r in rejects.to_pylist()] == [
        ("outside_root", "folder:p1/leak.jpg"),
        ("outside_root", "folder:p2"),
        ("outside_root", "folder:p4"),
    ]
    pairs, load_rejects = load_images(catalog, CFG)
    assert pairs.num_rows == 3 and load_rejects.num_rows == 0


# --------------------------------------------------------------------------------------------
# metadata policy


def test_gps_exif_xmp_and_comment_are_stripped_with_identical_pixels() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    data = encode(noise(), exif=gps_exif(), comment=b"shot at home", xmp=xmp, icc_profile=icc)
    assert 0xE1 in jpeg_markers(data) and 0xFE in jpeg_markers(data)  # the input has them
    result = check_image(data, "a.jpg", CFG)
    assert isinstance(result, CheckedImage)
    assert (result.width, result.height, result.path) == (16, 40, "a.jpg")
    assert jpeg_markers(result.data)[0] == 0xE0  # JFIF stays first
    assert not {0xE1, 0xFE} & set(jpeg_markers(result.data))
    for trace in (b"Exif", b"PhoneMaker", b"shot at home", b"xmpmeta"):
        assert trace not in result.data
    with Image.open(io.BytesIO(result.data)) as out:
        assert dict(out.getexif()) == {}
        assert out.info.get("icc_profile") == icc  # the colour profile is kept
    assert np.array_equal(pixels(result.data), pixels(data))


def test_progressive_restart_and_trailing_frames_keep_their_pixels() -> None:
    data = encode(
        noise((64, 48), seed=5),
        exif=gps_exif(),
        progressive=True,
        restart_marker_blocks=2,
    )
    data += b"\xff\xd8 trailing frame with GPS 52N \xff\xd9"
    stripped = strip_jpeg(data)
    assert stripped is not None and stripped.endswith(b"\xff\xd9")
    assert b"Exif" not in stripped and b"trailing" not in stripped
    assert len(data) - len(stripped) > 100
    assert np.array_equal(pixels(stripped), pixels(data))


def test_jfif_thumbnails_go_and_the_density_stays() -> None:
    data = encode(noise(seed=2), dpi=(300, 300))
    app0 = 4 + int.from_bytes(data[4:6], "big")
    thumb = b"THUMBNAILPIX"  # a 2x2 RGB thumbnail in the JFIF segment
    jfif = data[6:18] + b"\x02\x02" + thumb
    jfxx = b"JFXX\x00\x13" + b"\x01\x01" + thumb[:3]  # an extension segment, 1x1 RGB
    segments = b"".join(b"\xff\xe0" + (len(p) + 2).to_bytes(2, "big") + p for p in (jfif, jfxx))
    with_thumbs = b"\xff\xd8" + segments + data[app0:]
    result = check_image(with_thumbs, "t.jpg", CFG)
    assert jpeg_markers(result.data).count(0xE0) == 1
    assert result.data[4:6] == (16).to_bytes(2, "big")  # JFIF without a thumbnail
    assert result.data[6:18] == data[6:18]  # version, units and density as they were
    assert b"THU" in with_thumbs and b"THU" not in result.data
    with Image.open(io.BytesIO(result.data)) as out:
        assert out.info["dpi"] == (300, 300)
    assert np.array_equal(pixels(result.data), pixels(with_thumbs))


def test_a_marker_stream_the_stripper_cannot_follow_is_re_encoded_not_kept() -> None:
    data = encode(smooth(), exif=gps_exif(), quality=100)
    app0 = 4 + int.from_bytes(data[4:6], "big")
    odd = data[:app0] + b"\x00\x00" + data[app0:]  # stray bytes between two segments
    assert strip_jpeg(odd) is None
    result = check_image(odd, "odd.jpg", CFG)
    assert isinstance(result, CheckedImage) and b"PhoneMaker" not in result.data
    assert np.abs(pixels(result.data).astype(np.int16) - pixels(data)).mean() < 4


def test_a_jpeg_without_metadata_is_stored_byte_for_byte() -> None:
    data = encode(noise(seed=4))
    assert check_image(data, "a.jpg", CFG).data == data


def test_strip_off_keeps_the_bytes() -> None:
    data = encode(noise(), exif=gps_exif(orientation=6), comment=b"shot at home")
    result = check_image(data, "a.jpg", KEEP)
    assert result == CheckedImage(16, 40, data, "a.jpg")


def test_exif_orientation_is_applied_before_the_tag_goes() -> None:
    img = smooth((16, 40))
    data = encode(img, exif=gps_exif(orientation=6), comment=b"shot at home", quality=100)
    result = check_image(data, "a.jpg", CFG)  # orientation 6: turn 90° clockwise
    assert (result.width, result.height) == (40, 16)
    assert b"Exif" not in result.data and b"shot at home" not in result.data
    upright = np.asarray(img.transpose(Image.Transpose.ROTATE_270), dtype=np.int16)
    stored = pixels(result.data).astype(np.int16)
    assert np.abs(stored - upright).mean() < 4  # the same picture, turned
    assert np.abs(stored[:, ::-1] - upright).mean() > 40  # and not its mirror image


@pytest.mark.parametrize("cfg", [CFG, KEEP], ids=["strip", "keep"])
def test_cmyk_jpeg_is_converted_to_rgb_once(cfg: IngestConfig) -> None:
    data = encode(smooth(mode="CMYK"), quality=100, exif=gps_exif(), comment=b"shot at home")
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "CMYK"
    result = check_image(data, "c.jpeg", cfg)
    kept = not cfg.strip_metadata
    assert (b"PhoneMaker" in result.data, b"shot at home" in result.data) == (kept, kept)
    assert (result.width, result.height, result.path) == (16, 40, "c.jpeg")
    with Image.open(io.BytesIO(result.data)) as out:
        assert (out.format, out.mode) == ("JPEG", "RGB")
        stored = np.asarray(out, dtype=np.int16)
    assert np.abs(stored - np.asarray(smooth(), dtype=np.int16)).mean() < 4


def test_png_text_and_exif_chunks_are_dropped_with_identical_pixels() -> None:
    png = encode(noise(seed=9), "PNG", exif=gps_exif())
    iend = png.rindex(b"IEND") - 4
    png = png[:iend] + png_chunk(b"tEXt", b"Comment\x00shot at home") + png[iend:]
    assert {b"eXIf", b"tEXt"} <= set(png_chunks(png))
    result = check_image(png, "p.png", IngestConfig(convert_format="png"))
    assert result.path == "p.png"
    assert not {b"eXIf", b"tEXt", b"iTXt", b"zTXt"} & set(png_chunks(result.data))
    assert b"shot at home" not in result.data and b"PhoneMaker" not in result.data
    assert np.array_equal(pixels(result.data), pixels(png))


def test_the_card_says_what_was_done_to_metadata() -> None:
    stripped = sources_section({"ingest": CFG.model_dump(mode="json")})
    assert "Image metadata: stripped" in stripped and "GPS" in stripped
    kept = sources_section({"ingest": KEEP.model_dump(mode="json")})
    assert "Image metadata: kept" in kept and "byte for byte" in kept
    assert "Image metadata" not in sources_section({"ingest": {"max_pixels": 10}})


# --------------------------------------------------------------------------------------------
# fingerprints notice a swapped file


@pytest.mark.parametrize("replace", ["new-file", "in-place"])
def test_a_same_size_swap_with_mtime_restored_is_recomputed(tmp_path: Path, replace: str) -> None:
    root = tmp_path / "CUHK"
    source = annotated(root, ["a.bmp", "b.bmp"])
    first, second = encode(noise(seed=1), "BMP"), encode(noise(seed=2), "BMP")
    assert len(first) == len(second) and first != second
    image = put(root / "imgs" / "a.bmp", first)
    put(root / "imgs" / "b.bmp", encode(noise(seed=3), "BMP"))
    before = os.stat(image)
    out = tmp_path / "out"
    cfg = IngestConfig(convert_format="png")  # lossless, so the stored pixels can be compared
    [chunk], _ = plan_chunks(source, out, shard_rows=100)
    built = ingest_chunk(chunk, cfg, out)
    assert ingest_chunk(chunk, cfg, out).reused  # unchanged input: reused
    fp_before = chunk.content_fingerprint()

    if replace == "new-file":  # what cp/mv/rsync do: a new inode under the old name
        put(root / "imgs" / "a.bmp.new", second).replace(image)
    else:  # rewritten in place: same inode, the ctime moves
        image.write_bytes(second)
    os.utime(image, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(image)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)

    [again], _ = plan_chunks(source, out, shard_rows=100)
    assert again.input_fp == chunk.input_fp  # the annotation file did not change
    assert again.content_fingerprint() != fp_before
    rebuilt = ingest_chunk(again, cfg, out)
    assert not rebuilt.reused and rebuilt.fingerprint != built.fingerprint
    stored = pq.read_table(rebuilt.path).column("image").to_pylist()
    assert pixels(stored[0]["bytes"]).tobytes() == pixels(second).tobytes()

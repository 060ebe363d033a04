"""Ingest: turn a dataset on disk into pairs rows, and reject what cannot be used.

Ingest is split in two because the two halves cost very different amounts:

1. :func:`read_catalog` reads only the annotation file (or lists a folder). It is cheap, runs once
   per source, and gives the flow a table of image records it can cut into chunks.
2. :func:`load_images` opens, fully decodes and verifies the images of one chunk of that catalog.
   This is the expensive part; the flow runs it on many chunks in parallel.

:func:`verify_pairs` re-checks rows read back from existing pedsynth shards (the ``shards``
source) with the same image checks (:func:`check_image`).

Bad data never raises here: every unusable record, image or caption becomes one row of the
rejects table (stage ``ingest``, a reason from :data:`REJECT_REASONS`, a human-readable
detail). Exceptions are kept for config errors (a source that is not there) and programmer
errors (a table with the wrong schema). Nothing here imports Prefect; the flow wraps these
functions in tasks.
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import threading
import unicodedata
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, UnidentifiedImageError

from pedsynth.schemas.config import IngestConfig, SourceConfig
from pedsynth.schemas.tables import (
    CATALOG_SCHEMA,
    PAIRS_SCHEMA,
    pairs_table,
    rejects_table,
    stable_id,
)

STAGE = "ingest"

REJECT_REASONS: tuple[str, ...] = (
    # read_catalog
    "malformed_json",  # annotation file is not JSON, or its top level is not a list
    "bad_record",  # a record with missing keys or fields of the wrong type
    "duplicate_image",  # a second record for the same image file
    # load_images / verify_pairs
    "missing_file",
    "unreadable_file",  # the file exists but cannot be read (permissions, I/O error)
    "empty_file",
    "too_large",
    "too_small",
    "truncated",
    "undecodable",
    # captions (non-string captions are rejected by read_catalog, the rest by load_images)
    "non_text_caption",
    "empty_caption",
    "caption_too_long",
)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

_ANNOTATION_FILES = {"cuhk-pedes": "reid_raw.json", "rstpreid": "data_captions.json"}
_PATH_KEYS = {"cuhk-pedes": "file_path", "icfg-pedes": "file_path", "rstpreid": "img_path"}
_SPLITS = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}
_JPEG_FORMATS = frozenset({"JPEG", "MPO"})  # MPO: camera JPEGs with extra frames appended
_SHOWN_CHARS = 200  # longest value quoted in a reject detail
_REJECTED_CAPTION_CHARS = 2_000  # longest caption copied into a reject row
_INT_RE = re.compile(r"[+-]?\d+")
_JSON_TYPES = {
    dict: "object",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


class CheckedImage(NamedTuple):
    """An image that passed :func:`check_image`, as it will be stored."""

    width: int
    height: int
    data: bytes  # JPEG: the input bytes untouched; anything else: converted once
    path: str  # the input name, with the extension of the stored format


class Rejection(NamedTuple):
    """Why an image or caption was rejected: a reason from REJECT_REASONS and a detail."""

    reason: str
    detail: str


# --------------------------------------------------------------------------------------------
# small helpers


def _show(value: object) -> str:
    """``repr(value)`` cut to a length fit for a reject detail."""
    text = repr(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 1] + "…"


def _is_utf8(text: str) -> bool:
    """False for strings Arrow cannot store (unpaired surrogates from JSON ``\\ud800``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _as_text(value: object) -> str:
    """Something storable in a string column that shows what ``value`` was."""
    if isinstance(value, str):
        text = value.encode("utf-8", "backslashreplace").decode("utf-8")
    else:
        text = json.dumps(value, default=repr)
    return text[:_REJECTED_CAPTION_CHARS]


def _reject(reason: str, detail: str, source: str, **ids: Any) -> dict[str, Any]:
    """One rejects row; ``ids`` are image_id, person_id, split, pair_id, caption."""
    return {"stage": STAGE, "reason": reason, "detail": detail, "source": source, **ids}


def _with_suffix(name: str, suffix: str) -> str:
    stem, dot, ext = name.rpartition(".")
    return stem + suffix if dot and "/" not in ext else name + suffix


class _StrictDecoding:
    """Holds ``ImageFile.LOAD_TRUNCATED_IMAGES`` at False while any check runs.

    The flag is a module global of Pillow; a counter under a lock makes nested and concurrent
    (threaded) checks safe, and the caller's value comes back when the last check ends.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._depth = 0
        self._saved = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._lock:
            if self._depth == 0:
                self._saved = ImageFile.LOAD_TRUNCATED_IMAGES
                ImageFile.LOAD_TRUNCATED_IMAGES = False
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    ImageFile.LOAD_TRUNCATED_IMAGES = self._saved


_strict_decoding = _StrictDecoding()


# --------------------------------------------------------------------------------------------
# step 1: catalogue


def read_catalog(source: SourceConfig) -> tuple[pa.Table, pa.Table]:
    """Catalogue one source: (CATALOG_SCHEMA table, REJECTS_SCHEMA table).

    Reads only the annotation file (or lists the folder); images are not opened. Raises
    ``FileNotFoundError`` when the source is not there and ``ValueError`` for formats that are
    not catalogued here (``shards``, ``procedural``).
    """
    if source.format == "folder":
        return _read_folder(source)
    if source.format not in _PATH_KEYS:
        raise ValueError(
            f"source {source.label!r}: format {source.format!r} has no catalogue; "
            "shards go through verify_pairs and procedural sources through their generator"
        )
    annotation = _find_annotation(source)
    images = annotation.parent / "imgs"
    if not images.is_dir():
        raise FileNotFoundError(
            f"{source.format} source {source.label!r}: image folder {images} not found "
            f"(expected next to {annotation.name})"
        )
    return _read_annotation(annotation, source.label, _PATH_KEYS[source.format])


def _find_annotation(source: SourceConfig) -> Path:
    """The annotation JSON of ``source``: ``source.path`` itself or the file inside it."""
    path = Path(source.path).expanduser().absolute()
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{source.format} source {source.label!r}: {path} does not exist")
    if source.format == "icfg-pedes":
        return _find_icfg_json(path)
    annotation = path / _ANNOTATION_FILES[source.format]
    if not annotation.is_file():
        raise FileNotFoundError(
            f"{source.format} source {source.label!r}: {path} has no {annotation.name}"
        )
    return annotation


def _is_icfg_name(name: str) -> bool:
    letters = re.sub(r"[^a-z]", "", PurePosixPath(name.lower()).stem)
    return letters.startswith("icfg") and ("pdes" in letters or "pedes" in letters)


def _find_icfg_json(folder: Path) -> Path:
    """The one ICFG annotation file, tolerating the spellings seen in the wild."""
    found = sorted(
        p for p in folder.iterdir() if p.suffix.lower() == ".json" and _is_icfg_name(p.name)
    )
    if not found:
        raise FileNotFoundError(
            f"icfg-pedes source: {folder} has no ICFG-PEDES.json (or a variant such as "
            "ICFG_PEDES.json / ICFG-PDES.json)"
        )
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise ValueError(
            f"icfg-pedes source: {folder} has several ICFG annotation files ({names}); "
            "point the source path at one of them"
        )
    return found[0]


def _load_json_list(path: Path) -> tuple[list[Any], str | None]:
    """The records of a JSON list file, or ``([], why not)``."""
    try:
        data = json.loads(path.read_bytes().decode("utf-8-sig"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
        return [], f"{path.name}: {exc}"
    if not isinstance(data, list):
        kind = _JSON_TYPES.get(type(data), type(data).__name__)
        return [], f"{path.name}: the top level is a JSON {kind}, expected a list"
    return data, None


def _read_annotation(annotation: Path, label: str, path_key: str) -> tuple[pa.Table, pa.Table]:
    """Catalogue a CUHK-PEDES-style annotation list (one record per image)."""
    file_source = f"{label}:{annotation.name}"
    records, error = _load_json_list(annotation)
    if error is not None:
        reject = _reject("malformed_json", error, file_source)
        return CATALOG_SCHEMA.empty_table(), rejects_table([reject])
    image_root = annotation.parent / "imgs"
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"{file_source}#{index}"
        fields, problems = _parse_record(record, path_key)
        ids = _record_ids(label, fields)
        if problems:
            rejects.append(_reject("bad_record", "; ".join(problems), where, **ids))
            continue
        rel_path = fields["rel_path"]
        if rel_path in first_seen:
            detail = (
                f"{path_key} {_show(rel_path)} is already listed by record {first_seen[rel_path]}"
            )
            rejects.append(_reject("duplicate_image", detail, where, **ids))
            continue
        first_seen[rel_path] = index
        captions, caption_rejects = _catalog_captions(fields["captions"], where, ids)
        rejects.extend(caption_rejects)
        rows.append(
            {"source": where, "image_path": str(image_root / rel_path), "rel_path": rel_path}
            | ids
            | {"captions": captions}
        )
    return pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), rejects_table(rejects)


def _record_ids(label: str, fields: dict[str, Any]) -> dict[str, Any]:
    """image_id / person_id / split for the fields that parsed (None for the others)."""
    rel_path, person, split = fields.get("rel_path"), fields.get("id"), fields.get("split")
    return {
        "image_id": None if rel_path is None else f"{label}:{rel_path}",
        "person_id": None if person is None else f"{label}:{person}",
        "split": split,
    }


def _parse_record(record: object, path_key: str) -> tuple[dict[str, Any], list[str]]:
    """The valid fields of one annotation record and a list of problems with the others."""
    if not isinstance(record, dict):
        return {}, [f"record = {_show(record)}: expected a JSON object"]
    parsers = (
        ("id", "id", _parse_id),
        (path_key, "rel_path", _parse_rel_path),
        ("split", "split", _parse_split),
        ("captions", "captions", _parse_captions),
    )
    fields: dict[str, Any] = {}
    problems: list[str] = []
    for key, name, parse in parsers:
        if key not in record:
            problems.append(f"missing key {key!r}")
            continue
        value, problem = parse(record[key])
        if problem:
            problems.append(f"{key} = {_show(record[key])}: {problem}")
        else:
            fields[name] = value
    return fields, problems


def _parse_id(value: object) -> tuple[int | None, str | None]:
    if isinstance(value, int) and not isinstance(value, bool):
        return value, None
    if isinstance(value, str) and _INT_RE.fullmatch(value.strip()):
        return int(value), None
    return None, "expected an integer"


def _parse_rel_path(value: object) -> tuple[str | None, str | None]:
    if not isinstance(value, str) or not value.strip():
        return None, "expected a non-empty string"
    if not _is_utf8(value) or "\x00" in value:
        return None, "not a valid file name"
    parts = PurePosixPath(value.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts:
        return None, "the path leaves the image folder"
    return value, None


def _parse_split(value: object) -> tuple[str | None, str | None]:
    split = _SPLITS.get(value.strip().lower()) if isinstance(value, str) else None
    if split is None:
        return None, "expected one of train, val (validation, dev), test"
    return split, None


def _parse_captions(value: object) -> tuple[list[Any] | None, str | None]:
    if not isinstance(value, list):
        return None, "expected a list of strings"
    return value, None


def _catalog_captions(
    values: list[Any], where: str, ids: dict[str, Any]
) -> tuple[list[str | None], list[dict[str, Any]]]:
    """Captions as the catalog stores them, plus rejects for those that are not strings.

    The catalog column holds strings only, so a caption that is not one (an int, a dict, a
    string with unpaired surrogates) is rejected here, with its value, and kept as null so the
    caption indices of the others do not move. :func:`load_images` skips nulls.
    """
    captions: list[str | None] = []
    rejects: list[dict[str, Any]] = []
    for k, value in enumerate(values):
        if isinstance(value, str) and _is_utf8(value):
            captions.append(value)
            continue
        captions.append(None)
        what = "a string with unpaired surrogates" if isinstance(value, str) else "not a string"
        detail = f"caption {k} is {what}: {_show(value)}"
        source = f"{where}/caption{k}"
        rejects.append(_reject("non_text_caption", detail, source, caption=_as_text(value), **ids))
    return captions, rejects


def _image_files(root: Path) -> list[str]:
    """Relative POSIX paths of the image files under ``root``, sorted; hidden entries skipped."""
    found: list[str] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found, key=lambda rel: rel.split("/"))


def _read_folder(source: SourceConfig) -> tuple[pa.Table, pa.Table]:
    """Catalogue a folder of images: per identity sub-folder, or one identity per image."""
    root = Path(source.path).expanduser().absolute()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"folder source {source.label!r}: {root} {what}")
    label = source.label
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for rel_path in _image_files(root):
        where = f"{label}:{rel_path}"
        if not _is_utf8(rel_path):
            shown = _as_text(rel_path)
            rejects.append(
                _reject("bad_record", f"file name is not UTF-8: {shown}", f"{label}:{shown}")
            )
            continue
        if source.layout == "per-image":
            person = str(PurePosixPath(rel_path).with_suffix(""))
        elif "/" in rel_path:
            person = rel_path.split("/", 1)[0]
        else:
            rejects.append(_reject("bad_record", "image is not inside an identity folder", where))
            continue
        rows.append(
            {
                "source": where,
                "image_path": str(root / rel_path),
                "rel_path": rel_path,
                "image_id": where,
                "person_id": f"{label}:{person}",
                "split": source.split,
                "captions": [],
            }
        )
    return pa.Table.from_pylist(rows, schema=CATALOG_SCHEMA), rejects_table(rejects)


# --------------------------------------------------------------------------------------------
# image checks (shared by load_images and verify_pairs)


def check_image(data: bytes, name: str, cfg: IngestConfig) -> CheckedImage | Rejection:
    """Verify one image's bytes and give what to store, or why it is rejected.

    Size limits are checked from the header before anything is decoded, then the image is
    decoded in full (``verify()`` misses truncation). JPEG bytes are kept as they are; other
    formats are converted once to RGB ``cfg.convert_format``. ``name`` is the image's path as the
    source names it; the stored path gets the stored format's extension.
    """
    if not data:
        return Rejection("empty_file", f"{name}: 0 bytes")
    if len(data) > cfg.max_image_bytes:
        return Rejection(
            "too_large", f"{name}: {len(data)} bytes > max_image_bytes {cfg.max_image_bytes}"
        )
    with _strict_decoding():
        try:
            with Image.open(io.BytesIO(data)) as img:
                problem = _check_size(img.size, name, cfg)
                if problem is not None:
                    return problem
                img.load()
                return _stored(img, data, name, cfg)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            return Rejection("too_large", f"{name}: {exc}")
        except UnidentifiedImageError:
            return Rejection("undecodable", f"{name}: not an image file Pillow can identify")
        except Exception as exc:  # any decoder failure is a property of the data
            return _decode_failure(exc, name)


def _check_size(size: tuple[int, int], name: str, cfg: IngestConfig) -> Rejection | None:
    width, height = size
    if width * height > cfg.max_pixels:
        detail = f"{name}: {width}x{height} = {width * height} pixels > max_pixels {cfg.max_pixels}"
        return Rejection("too_large", detail)
    if min(width, height) < cfg.min_side:
        return Rejection("too_small", f"{name}: {width}x{height}, a side < min_side {cfg.min_side}")
    return None


def _decode_failure(exc: Exception, name: str) -> Rejection:
    message = str(exc)
    lowered = message.lower()
    reason = (
        "truncated" if "truncated" in lowered or "broken data stream" in lowered else "undecodable"
    )
    detail = f"{name}: {type(exc).__name__}: {message}"
    return Rejection(reason, detail[: _SHOWN_CHARS * 2])


def _stored(img: Image.Image, data: bytes, name: str, cfg: IngestConfig) -> CheckedImage:
    """What to store for a decoded image: JPEG as is, anything else converted once."""
    width, height = img.size
    if img.format in _JPEG_FORMATS:
        jpeg_name = name if name.lower().endswith((".jpg", ".jpeg")) else _with_suffix(name, ".jpg")
        return CheckedImage(width, height, data, jpeg_name)
    out = io.BytesIO()
    if cfg.convert_format == "jpeg":
        _to_rgb(img).save(out, "JPEG", quality=cfg.jpeg_quality)
        suffix = ".jpg"
    else:
        _to_rgb(img).save(out, "PNG")
        suffix = ".png"
    return CheckedImage(width, height, out.getvalue(), _with_suffix(name, suffix))


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB for any Pillow mode: alpha on white, 16/32-bit and float scaled to 8 bits."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode.startswith(("I", "F")):
        return Image.fromarray(_to_uint8(np.asarray(img)), mode="L").convert("RGB")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return img.convert("RGB")


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    """8-bit grey levels for 16-bit, 32-bit or float pixels."""
    if pixels.dtype.kind == "u" and pixels.dtype.itemsize == 2:  # I;16 and variants
        return (pixels.astype(np.uint32) >> 8).astype(np.uint8)
    values = pixels.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if low >= 0 and high <= 255:
        return values.astype(np.uint8)
    if high <= low:
        return np.zeros(values.shape, np.uint8)
    return ((values - low) * (255.0 / (high - low))).round().astype(np.uint8)


def _read_image_file(path: str, name: str, cfg: IngestConfig) -> CheckedImage | Rejection:
    """:func:`check_image` for a file; its size is checked before it is read."""
    try:
        info = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return Rejection("missing_file", f"{path}: no such file")
    except OSError as exc:
        return Rejection("unreadable_file", f"{path}: {exc.strerror or exc}")
    if not stat.S_ISREG(info.st_mode):
        return Rejection("missing_file", f"{path}: not a regular file")
    if info.st_size == 0:
        return Rejection("empty_file", f"{path}: 0 bytes")
    if info.st_size > cfg.max_image_bytes:
        detail = f"{path}: {info.st_size} bytes > max_image_bytes {cfg.max_image_bytes}"
        return Rejection("too_large", detail)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return Rejection("unreadable_file", f"{path}: {exc.strerror or exc}")
    return check_image(data, name, cfg)


# --------------------------------------------------------------------------------------------
# caption checks


def normalize_caption(text: str) -> str:
    """NFC, whitespace runs collapsed to one space, stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


# Unicode categories Cc (C0/C1 controls) and Cs (surrogates), and U+FFFD; one regex search
# instead of a per-character category lookup, which dominated ingest time on large corpora.
_CONTROL_OR_REPLACEMENT = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufffd]")


def _not_text(text: str) -> str | None:
    """Why a normalised caption is not text: no letter, or a control character; else None."""
    if not any(ch.isalpha() for ch in text):
        return "has no letters"
    if (bad := _CONTROL_OR_REPLACEMENT.search(text)) is not None:
        return f"has the control or replacement character U+{ord(bad.group()):04X}"
    return None


def check_caption(value: object, max_chars: int) -> str | Rejection:
    """The normalised caption, or why it is rejected."""
    if not isinstance(value, str):
        return Rejection("non_text_caption", f"not a string: {_show(value)}")
    text = normalize_caption(value)
    if not text:
        what = "empty" if not value else "whitespace only"
        return Rejection("empty_caption", f"caption is {what}: {_show(value)}")
    problem = _not_text(text)
    if problem is not None:
        return Rejection("non_text_caption", f"caption {problem}: {_show(text)}")
    if len(text) > max_chars:
        return Rejection(
            "caption_too_long", f"{len(text)} characters > max_caption_chars {max_chars}"
        )
    return text


# --------------------------------------------------------------------------------------------
# step 2: load images


def _require_catalog(catalog: pa.Table) -> None:
    """Raise for a table that is not a catalog (a programmer error, not bad data)."""
    if not isinstance(catalog, pa.Table):
        raise TypeError(f"load_images: expected a pyarrow Table, got {type(catalog).__name__}")
    for field in CATALOG_SCHEMA:
        if field.name not in catalog.column_names:
            raise ValueError(f"load_images: the catalog has no column {field.name!r}")
        column = catalog.column(field.name)
        if column.type != field.type:
            raise ValueError(
                f"load_images: catalog column {field.name!r} is {column.type}, "
                f"expected {field.type}"
            )
        if not field.nullable and column.null_count:
            raise ValueError(f"load_images: catalog column {field.name!r} has nulls")


def load_images(catalog: pa.Table, cfg: IngestConfig) -> tuple[pa.Table, pa.Table]:
    """Open and verify the images of (a chunk of) a catalog: (pairs, rejects).

    One pairs row per good caption, or one uncaptioned row (``caption`` null) for a good image
    without any; rows keep catalog order. Bad images and captions become rejects.
    """
    _require_catalog(catalog)
    pairs: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    for entry in catalog.to_pylist():
        ids = {k: entry[k] for k in ("image_id", "person_id", "split")}
        image = _read_image_file(entry["image_path"], entry["rel_path"], cfg)
        if isinstance(image, Rejection):
            rejects.append(_reject(*image, entry["source"], **ids))
            continue
        captions, caption_rejects = _check_captions(entry, ids, cfg)
        rejects.extend(caption_rejects)
        pairs.extend(_pair_rows(entry, image, captions))
    return pairs_table(pairs), rejects_table(rejects)


def _check_captions(
    entry: dict[str, Any], ids: dict[str, Any], cfg: IngestConfig
) -> tuple[list[tuple[int, str]], list[dict[str, Any]]]:
    """The good captions of one catalog row as (index, text), and rejects for the others."""
    good: list[tuple[int, str]] = []
    rejects: list[dict[str, Any]] = []
    for k, value in enumerate(entry["captions"] or []):
        if value is None:  # not a string; read_catalog rejected it already
            continue
        checked = check_caption(value, cfg.max_caption_chars)
        if isinstance(checked, Rejection):
            where = f"{entry['source']}/caption{k}"
            rejects.append(_reject(*checked, where, caption=_as_text(value), **ids))
        else:
            good.append((k, checked))
    return good, rejects


def _pair_rows(
    entry: dict[str, Any], image: CheckedImage, captions: list[tuple[int, str]]
) -> list[dict[str, Any]]:
    """The pairs rows of one good image: one per caption, or one uncaptioned row."""
    label = entry["image_id"].split(":", 1)[0]
    base = {
        "image_id": entry["image_id"],
        "person_id": entry["person_id"],
        "split": entry["split"],
        "image": {"bytes": image.data, "path": image.path},
        "width": image.width,
        "height": image.height,
        "parent_id": None,
        "generator": f"dataset:{label}",
    }
    if not captions:
        pair_id = stable_id(entry["image_id"], "uncaptioned")
        return [base | {"pair_id": pair_id, "caption": None, "source": entry["source"]}]
    return [
        base
        | {
            "pair_id": stable_id(entry["image_id"], "original", k, caption),
            "caption": caption,
            "caption_source": "original",
            "source": f"{entry['source']}/caption{k}",
        }
        for k, caption in captions
    ]


# --------------------------------------------------------------------------------------------
# step 2 for the shards source


def _cast_to_pairs(table: pa.Table, label: str) -> pa.Table:
    """``table`` with PAIRS_SCHEMA: missing optional columns null, extra columns dropped."""
    if not isinstance(table, pa.Table):
        raise TypeError(f"verify_pairs: expected a pyarrow Table, got {type(table).__name__}")
    missing = [f.name for f in PAIRS_SCHEMA if not f.nullable and f.name not in table.column_names]
    if missing:
        raise ValueError(
            f"shards source {label!r}: the rows lack required column(s) {', '.join(missing)}"
        )
    columns = []
    for field in PAIRS_SCHEMA:
        if field.name not in table.column_names:
            columns.append(pa.nulls(table.num_rows, field.type))
            continue
        column = table.column(field.name)
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise ValueError(
                f"shards source {label!r}: column {field.name!r} is {column.type}, "
                f"which does not cast to {field.type}: {exc}"
            ) from exc
    return pa.Table.from_arrays(columns, schema=PAIRS_SCHEMA)


def _null_required(table: pa.Table) -> list[str | None]:
    """Per row, the first required column that is null there (None when there is none)."""
    found: list[str | None] = [None] * table.num_rows
    for field in PAIRS_SCHEMA:
        column = table.column(field.name)
        if field.nullable or not column.null_count:
            continue
        for i, valid in enumerate(column.is_valid().to_pylist()):
            if not valid and found[i] is None:
                found[i] = field.name
    return found


def verify_pairs(table: pa.Table, cfg: IngestConfig, label: str) -> tuple[pa.Table, pa.Table]:
    """Re-verify pairs rows read from existing shards: (good rows unchanged, rejects).

    The table is cast to PAIRS_SCHEMA first (a missing required column raises ``ValueError``).
    Each row's image bytes go through :func:`check_image`; a row with a null required value is a
    ``bad_record``, a row without image bytes a ``missing_file``.
    """
    table = _cast_to_pairs(table, label)
    null_columns = _null_required(table)
    images = table.column("image").to_pylist()
    shown = table.select(["source", "image_id", "pair_id", "person_id", "split", "caption"])
    keep: list[bool] = []
    rejects: list[dict[str, Any]] = []
    checked: dict[
        tuple[str, bytes], CheckedImage | Rejection
    ] = {}  # several captions share one image
    for i, (image, row) in enumerate(zip(images, shown.to_pylist(), strict=True)):
        name = (image or {}).get("path") or f"{label}#{i}"
        data = (image or {}).get("bytes")
        if null_columns[i] is not None:
            result: CheckedImage | Rejection = Rejection(
                "bad_record", f"{name}: required column {null_columns[i]!r} is null"
            )
        elif data is None:
            result = Rejection("missing_file", f"{name}: the row has no image bytes")
        else:
            if (name, data) not in checked:
                checked[name, data] = check_image(data, name, cfg)
            result = checked[name, data]
        keep.append(not isinstance(result, Rejection))
        if isinstance(result, Rejection):
            source = row.pop("source") or f"{label}#{i}"
            rejects.append(_reject(*result, source, **row))
    return table.filter(pa.array(keep, pa.bool_())), rejects_table(rejects)

"""Format readers: an annotation file or an image folder on disk → a catalogue of image records.

CUHK-PEDES ``reid_raw.json``, ICFG-PEDES ``ICFG-PEDES.json`` (and its misspelt variants) and
RSTPReid ``data_captions.json`` list one record per image; a ``folder`` source is listed, one
identity per sub-folder or one per image. Only the annotation file is read, no image is opened:
the catalogue is cheap, and :func:`pedsynth.tasks.ingest.load_images` opens the images later in
chunks. What a record gets wrong becomes a reject row, never an exception.

Every image path must stay inside its dataset root (the ``imgs/`` folder beside an annotation
file, or the folder of a ``folder`` source) once resolved: a record path with ``..`` or an
absolute one, or one that reaches outside through a symbolic link (a link to a file, or a
linked directory on the way), is rejected ``outside_root`` before anything is opened; the
detail names the record's path, never what the link points at. Links that stay inside are
followed. :func:`pedsynth.tasks.ingest.load_images` checks again right before it opens a file.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa

from pedsynth.schemas.config import SourceConfig
from pedsynth.schemas.tables import CATALOG_SCHEMA, rejects_table
from pedsynth.tasks.ingest_rejects import Rejection, as_text, ingest_reject, is_utf8, show

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"})

_ANNOTATION_FILES = {"cuhk-pedes": "reid_raw.json", "rstpreid": "data_captions.json"}
_PATH_KEYS = {"cuhk-pedes": "file_path", "icfg-pedes": "file_path", "rstpreid": "img_path"}
_SPLITS = {"train": "train", "val": "val", "validation": "val", "dev": "val", "test": "test"}
_INT_RE = re.compile(r"[+-]?\d+")
_JSON_TYPES = {
    dict: "object",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}


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
    annotation = locate_annotation(source)
    return _read_annotation(annotation, source.label, _PATH_KEYS[source.format])


def locate_annotation(source: SourceConfig) -> Path:
    """The annotation file of an annotated source, with its ``imgs/`` folder beside it.

    Raises ``FileNotFoundError`` naming what is missing; cheap enough to check before a build.
    """
    annotation = _find_annotation(source)
    images = annotation.parent / "imgs"
    if not images.is_dir():
        raise FileNotFoundError(
            f"{source.format} source {source.label!r}: image folder {images} not found "
            f"(expected next to {annotation.name})"
        )
    return annotation


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
        reject = ingest_reject(Rejection("malformed_json", error), file_source)
        return CATALOG_SCHEMA.empty_table(), rejects_table([reject])
    image_root = annotation.parent / "imgs"
    root = real_root(image_root)
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    first_seen: dict[str, int] = {}
    for index, record in enumerate(records):
        where = f"{file_source}#{index}"
        fields, problems = _parse_record(record, path_key)
        ids = _record_ids(label, fields)
        if problems:
            rejects.append(ingest_reject(Rejection("bad_record", "; ".join(problems)), where, ids))
            continue
        rel_path = fields["rel_path"]
        outside = leaves_root(rel_path, image_root, root)
        if outside is not None:
            detail = f"{path_key} {show(rel_path)}: {outside}"
            rejects.append(ingest_reject(Rejection("outside_root", detail), where, ids))
            continue
        if rel_path in first_seen:
            detail = (
                f"{path_key} {show(rel_path)} is already listed by record {first_seen[rel_path]}"
            )
            rejects.append(ingest_reject(Rejection("duplicate_image", detail), where, ids))
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
        return {}, [f"record = {show(record)}: expected a JSON object"]
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
            problems.append(f"{key} = {show(record[key])}: {problem}")
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
    if not is_utf8(value) or "\x00" in value:
        return None, "not a valid file name"
    return value, None


def real_root(root: str | Path) -> str:
    """The real path of a dataset root (links resolved), to test image paths against."""
    return os.path.realpath(root)


def is_inside(real_path: str, root: str) -> bool:
    """Whether ``real_path`` (already resolved) is ``root`` (a :func:`real_root`) or under it."""
    return real_path == root or real_path.startswith(root.rstrip(os.sep) + os.sep)


def leaves_root(rel_path: str, image_root: Path, root: str) -> str | None:
    """Why ``rel_path`` under ``image_root`` leaves the dataset ``root``; None when it stays.

    ``..`` parts and absolute paths are refused as written; the rest is resolved, following
    every symbolic link on the way (a loop resolves to a path that then fails to open).
    """
    parts = PurePosixPath(rel_path.replace("\\", "/"))
    if parts.is_absolute() or ".." in parts.parts:
        return "the path leaves the image folder"
    if not is_inside(os.path.realpath(image_root / rel_path), root):
        return "the path leads out of the image folder through a symbolic link"
    return None


def image_root_of(image_path: str, rel_path: str) -> Path:
    """The dataset root a catalogue row's ``image_path`` was built from (``root / rel_path``)."""
    depth = len(Path(rel_path).parts)
    return Path(image_path).parents[depth - 1] if depth else Path(image_path)


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
    caption indices of the others do not move; ``load_images`` skips nulls.
    """
    captions: list[str | None] = []
    rejects: list[dict[str, Any]] = []
    for k, value in enumerate(values):
        if isinstance(value, str) and is_utf8(value):
            captions.append(value)
            continue
        captions.append(None)
        what = "a string with unpaired surrogates" if isinstance(value, str) else "not a string"
        detail = f"caption {k} is {what}: {show(value)}"
        source = f"{where}/caption{k}"
        rejection = Rejection("non_text_caption", detail)
        rejects.append(ingest_reject(rejection, source, ids, caption=as_text(value)))
    return captions, rejects


def _image_files(root: Path) -> tuple[list[str], list[str]]:
    """Image files under ``root``, sorted, and the entries whose links lead out of it.

    Both as relative POSIX paths; hidden entries are skipped. Symbolic links are followed
    while they stay inside ``root``; a link that leads out is not followed and is returned in
    the second list. A directory is listed once: under its own name when the walk reaches it
    without a link, else under the first link that leads to it (so a link loop ends).
    """
    top = real_root(root)
    found: list[str] = []
    outside: list[str] = []
    seen: set[str] = set()
    # (folder to list, its real path, its relative prefix); a linked folder waits until every
    # folder reachable without a link has been seen
    pending = [(str(root), top, "")]
    linked: list[tuple[str, str, str]] = []
    while pending or linked:
        folder, folder_real, prefix = pending.pop() if pending else linked.pop(0)
        if folder_real in seen:
            continue
        seen.add(folder_real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue  # an unreadable sub-folder lists nothing, as os.walk does
        for entry in entries:
            if entry.name.startswith("."):
                continue
            rel = prefix + entry.name
            is_image = Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS
            if not entry.is_symlink():
                if entry.is_dir(follow_symlinks=False):
                    pending.append((entry.path, os.path.join(folder_real, entry.name), rel + "/"))
                elif is_image:
                    found.append(rel)
                continue
            real = os.path.realpath(entry.path)
            is_dir = os.path.isdir(real)
            if not (is_dir or is_image):
                continue
            if not is_inside(real, top):
                outside.append(rel)
            elif is_dir:
                linked.append((entry.path, real, rel + "/"))
            else:
                found.append(rel)
    return sorted(found, key=_path_parts), sorted(outside, key=_path_parts)


def _path_parts(rel: str) -> list[str]:
    return rel.split("/")


def _read_folder(source: SourceConfig) -> tuple[pa.Table, pa.Table]:
    """Catalogue a folder of images: per identity sub-folder, or one identity per image."""
    root = Path(source.path).expanduser().absolute()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise FileNotFoundError(f"folder source {source.label!r}: {root} {what}")
    label = source.label
    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    found, outside = _image_files(root)
    for rel_path in outside:
        detail = f"{show(rel_path)}: a symbolic link that leads out of the source folder"
        where = f"{label}:{as_text(rel_path)}"
        rejects.append(ingest_reject(Rejection("outside_root", detail), where))
    for rel_path in found:
        where = f"{label}:{rel_path}"
        if not is_utf8(rel_path):
            shown = as_text(rel_path)
            not_utf8 = Rejection("bad_record", f"file name is not UTF-8: {shown}")
            rejects.append(ingest_reject(not_utf8, f"{label}:{shown}"))
            continue
        if source.layout == "per-image":
            person = str(PurePosixPath(rel_path).with_suffix(""))
        elif "/" in rel_path:
            person = rel_path.split("/", 1)[0]
        else:
            not_in_folder = Rejection("bad_record", "image is not inside an identity folder")
            rejects.append(ingest_reject(not_in_folder, where))
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

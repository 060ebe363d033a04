"""``pedsynth export OUT DIR --format F``: a finished build in a public dataset's own layout.

What each layout is (and what IRRA, RDE, TBPS-CLIP and MLLM4Text-ReID read, unchanged):

| format | annotation file | record | person ids |
|---|---|---|---|
| ``cuhk-pedes`` | ``reid_raw.json`` | ``split, captions, file_path, processed_tokens, id`` | 1… |
| ``icfg-pedes`` | ``ICFG-PEDES.json`` | same fields as CUHK-PEDES | 0… |
| ``rstpreid`` | ``data_captions.json`` | ``id, img_path, captions, split`` | 0… |

One record per image, its captions grouped in it; the path is relative to ``imgs/``. Those
codebases require the **train** identities to be numbered contiguously from the dataset's first
id (IRRA: ``pid = id - 1`` for CUHK-PEDES, ``pid = id`` for the other two, then asserts the
train ids are ``0 … n-1`` with no gap). So persons are numbered train first, then val, then
test (other splits after), each split's persons in ``person_id`` order — as in the originals
(CUHK-PEDES: train 1–11003, val 11004–12003, test 12004–13003). Splits are written as
``train``, ``val``, ``test``.

Images come from the final shards through the trainer's reader
(:func:`pedsynth.train.data.index_shards`, :class:`~pedsynth.train.data.ImageReader`): each
image once, its stored bytes written as they are (``.jpg`` for JPEG, else the format's own
suffix), at ``imgs/<split>/<id>/<id>_<n>.<ext>``. ``pedsynth_export.json`` beside the
annotation file maps every exported id and path back to the build's ``person_id`` and
``image_id``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pedsynth.errors import PreflightError
from pedsynth.export.target import (
    SUMMARY_FILE,
    manifest_splits,
    open_build,
    prepare_folder,
    write_json,
    write_once,
)

IMAGES_DIR = "imgs"
CAPTION_SOURCES = ("original", "mllm", "rewrite", "edit")


@dataclass(frozen=True)
class Layout:
    annotation: str  # file name of the annotation list
    path_key: str  # the record's image path field
    first_id: int  # the first person id
    processed_tokens: bool  # records carry ``processed_tokens``

    def record(self, split: str, captions: list[str], path: str, person: int) -> dict[str, Any]:
        if self.path_key == "img_path":  # RSTPReid's field order
            return {"id": person, "img_path": path, "captions": captions, "split": split}
        record: dict[str, Any] = {"split": split, "captions": captions, self.path_key: path}
        if self.processed_tokens:
            record["processed_tokens"] = [tokens(c) for c in captions]
        record["id"] = person
        return record


LAYOUTS = {
    "cuhk-pedes": Layout("reid_raw.json", "file_path", 1, True),
    "icfg-pedes": Layout("ICFG-PEDES.json", "file_path", 0, True),
    "rstpreid": Layout("data_captions.json", "img_path", 0, False),
}

_WORD = re.compile(r"[a-z0-9]+")


def tokens(caption: str) -> list[str]:
    """``processed_tokens`` of one caption: its lower-cased words, punctuation dropped."""
    return _WORD.findall(caption.lower())


def image_suffix(data: bytes) -> str:
    """The file suffix of encoded image bytes (``.jpg`` for JPEG)."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            kind = (img.format or "").lower()
    except OSError:
        kind = ""
    return {"jpeg": ".jpg", "tiff": ".tif", "": ".bin"}.get(kind, f".{kind}")


def export_layout(
    out_dir: str | Path,
    folder: str | Path,
    fmt: str,
    *,
    caption_sources: Iterable[str] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the build at ``out_dir`` into ``folder`` in layout ``fmt``; returns a summary.

    ``caption_sources`` keeps only captions of those kinds (default: every caption); an image
    left without captions is not exported.
    """
    from pedsynth.train.data import ImageReader, index_shards

    if fmt not in LAYOUTS:
        raise PreflightError(f"unknown export format {fmt!r}; choose one of {', '.join(LAYOUTS)}")
    kinds = sorted(set(caption_sources or CAPTION_SOURCES))
    unknown = set(kinds) - set(CAPTION_SOURCES)
    if unknown:
        raise PreflightError(
            f"unknown caption source(s) {', '.join(sorted(unknown))}; "
            f"choose from {', '.join(CAPTION_SOURCES)}"
        )
    layout = LAYOUTS[fmt]
    manifest = open_build(out_dir)
    job = {
        "export": "layout",
        "format": fmt,
        "build_fingerprint": manifest.build_fingerprint,
        "caption_sources": kinds,
    }
    target = prepare_folder(
        folder, job, [IMAGES_DIR, layout.annotation, SUMMARY_FILE], overwrite=overwrite
    )

    indexes = [index_shards(out_dir, split) for split in manifest_splits(manifest)]
    kept: list[dict[int, list[str]]] = []  # per split: image → its exported captions
    for index in indexes:
        captions_of: dict[int, list[str]] = {}
        for caption, image, source in zip(
            index.captions, index.caption_image, index.caption_source, strict=True
        ):
            if source in kinds:
                captions_of.setdefault(image, []).append(caption)
        kept.append(captions_of)
    numbers: dict[str, int] = {}
    for index, captions_of in zip(indexes, kept, strict=True):
        # train's persons first: the contiguous ids the trainers expect
        for person in sorted({index.image_person[i] for i in captions_of}):
            numbers.setdefault(person, layout.first_id + len(numbers))

    reader = ImageReader()
    records: list[dict[str, Any]] = []
    images: dict[str, dict[str, str]] = {}
    written = 0
    counts: dict[str, dict[str, int]] = {}
    for index, captions_of in zip(indexes, kept, strict=True):
        order = sorted(captions_of, key=lambda i: (numbers[index.image_person[i]], i))
        per_person: dict[int, int] = {}
        split_persons: set[int] = set()
        for image in order:
            person = numbers[index.image_person[image]]
            n = per_person[person] = per_person.get(person, 0) + 1
            data = reader.read(index.image_refs[image])
            rel = f"{index.name}/{person:05d}/{person:05d}_{n:02d}{image_suffix(data)}"
            written += write_once(target / IMAGES_DIR / rel, data)
            records.append(layout.record(index.name, captions_of[image], rel, person))
            images[rel] = {
                "image_id": index.image_ids[image],
                "person_id": index.image_person[image],
            }
            split_persons.add(person)
        counts[index.name] = {
            "identities": len(split_persons),
            "images": len(order),
            "captions": sum(len(captions_of[i]) for i in order),
        }

    summary = {
        "format": fmt,
        "annotation": layout.annotation,
        "build": manifest.name,
        "build_fingerprint": manifest.build_fingerprint,
        "caption_sources": kinds,
        "splits": counts,
        "persons": {str(number): person for person, number in numbers.items()},
        "images": images,
    }
    write_json(target / SUMMARY_FILE, summary)
    write_json(target / layout.annotation, records)  # last: the export is complete
    return {
        "folder": str(target),
        "format": fmt,
        "annotation": str(target / layout.annotation),
        "splits": counts,
        "images_written": written,
    }

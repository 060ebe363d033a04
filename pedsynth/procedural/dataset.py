"""Writes the procedural benchmark to disk in the CUHK-PEDES layout.

Images are rendered in worker processes, one chunk of identities per task; every random stream
is seeded from (seed, identity, image), so the bytes do not depend on the number of workers.
Files are written to a temporary name and renamed, and the JSON files come last: a folder with
``reid_raw.json`` is a complete benchmark.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pedsynth.procedural.camera import render_image_and_labels
from pedsynth.procedural.captions import tokenize, write_captions
from pedsynth.procedural.identity import rng_for, sample_identity, sample_look
from pedsynth.procedural.labels import LABELS, label_png
from pedsynth.procedural.pose import sample_shot
from pedsynth.procedural.vocabulary import PHRASES, vocabulary

SPLITS = ("train", "val", "test")
RAW_FILE = "reid_raw.json"
ATTRIBUTES_FILE = "attributes.json"
IMAGE_DIR = "imgs"
LABEL_DIR = "labels"  # one PNG label map per image, same relative path (.png)
LABELS_FILE = "labels.json"  # the label values of the maps
MAX_CAPTIONS_PER_IMAGE = 10
# Stream tags, distinct from the identity module's (1, 2).
IMAGE_STREAM = 3
CAPTION_STREAM = 4
SPLIT_STREAM = 5
CHUNKS_PER_WORKER = 4  # several chunks per worker keep the pool busy to the end
# Below this many images, starting worker processes costs more than it saves, so the default
# (workers=None) renders in-process; an explicit ``workers`` is always obeyed.
SMALL_RUN_IMAGES = 100


@dataclass(frozen=True)
class _Chunk:
    """The work one pool task does: render and caption these identities."""

    seed: int
    image_root: str
    images_per_identity: int
    captions_per_image: int
    identities: tuple[tuple[int, str], ...]  # (identity id, split)


def image_path(split: str, identity_id: int, index: int) -> str:
    """Where an image lives under ``imgs/``; this is the record's ``file_path``."""
    return f"{split}/{identity_id:05d}/{identity_id:05d}_{index:02d}.jpg"


def label_path(file_path: str) -> str:
    """Where the label map of the image at ``file_path`` lives under ``labels/``."""
    return str(Path(file_path).with_suffix(".png"))


def assign_splits(identities: int, fractions: Sequence[float], seed: int) -> list[str]:
    """The split of identity ``i + 1`` at index ``i``; identity-disjoint by construction.

    Val and test get at least one identity each (when their fraction is positive and there
    are three or more identities), so small benchmarks still have all three splits.
    """
    train_fraction, val_fraction, test_fraction = fractions
    sizes = {}
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        size = round(identities * fraction)
        if fraction > 0 and identities >= 3:
            size = max(1, size)
        sizes[name] = size
    while sizes["val"] + sizes["test"] > identities - (1 if train_fraction > 0 else 0):
        larger = max(("val", "test"), key=lambda name: sizes[name])
        if sizes[larger] == 0:
            break
        sizes[larger] -= 1
    sizes["train"] = identities - sizes["val"] - sizes["test"]
    labels = ["train"] * sizes["train"] + ["val"] * sizes["val"] + ["test"] * sizes["test"]
    order = rng_for(seed, 0, SPLIT_STREAM).permutation(identities)
    return [labels[int(position)] for position in order]


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary name, then rename, so readers never see half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def _render_chunk(chunk: _Chunk) -> list[dict[str, Any]]:
    """Render, caption and write every image of the chunk's identities; return the records."""
    records = []
    root = Path(chunk.image_root)
    label_root = root.parent / LABEL_DIR
    for identity_id, split in chunk.identities:
        identity = sample_identity(chunk.seed, identity_id)
        look = sample_look(chunk.seed, identity)
        (root / split / f"{identity_id:05d}").mkdir(parents=True, exist_ok=True)
        (label_root / split / f"{identity_id:05d}").mkdir(parents=True, exist_ok=True)
        for index in range(chunk.images_per_identity):
            image_rng = rng_for(chunk.seed, identity_id, IMAGE_STREAM, index)
            shot = sample_shot(image_rng)
            jpeg, labels = render_image_and_labels(identity, look, shot, image_rng)
            relative = image_path(split, identity_id, index)
            _write_atomic(root / relative, jpeg)
            _write_atomic(label_root / label_path(relative), label_png(labels))
            caption_rng = rng_for(chunk.seed, identity_id, CAPTION_STREAM, index)
            captions = write_captions(identity, shot, caption_rng, chunk.captions_per_image)
            records.append(
                {
                    "split": split,
                    "captions": captions,
                    "file_path": relative,
                    "processed_tokens": [tokenize(caption) for caption in captions],
                    "id": identity_id,
                }
            )
    return records


def _chunks(
    assignments: list[tuple[int, str]], workers: int, template: dict[str, Any]
) -> list[_Chunk]:
    size = max(1, math.ceil(len(assignments) / (workers * CHUNKS_PER_WORKER)))
    return [
        _Chunk(identities=tuple(assignments[start : start + size]), **template)
        for start in range(0, len(assignments), size)
    ]


def _available_cpus() -> int:
    """CPUs this process may run on (respects container and taskset limits)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _check_arguments(
    seed: int,
    identities: int,
    images_per_identity: int,
    captions_per_image: int,
    split_fractions: Sequence[float],
    workers: int | None,
) -> None:
    if seed < 0:
        raise ValueError(f"seed = {seed}: must be a non-negative integer")
    if identities < 1:
        raise ValueError(f"identities = {identities}: need at least 1")
    if images_per_identity < 1:
        raise ValueError(f"images_per_identity = {images_per_identity}: need at least 1")
    if not 1 <= captions_per_image <= MAX_CAPTIONS_PER_IMAGE:
        raise ValueError(
            f"captions_per_image = {captions_per_image}: must be 1..{MAX_CAPTIONS_PER_IMAGE}"
        )
    if workers is not None and workers < 1:
        raise ValueError(f"workers = {workers}: need at least 1")
    fractions = tuple(split_fractions)
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0):
        raise ValueError(
            f"split_fractions = {fractions}: need three non-negative (train, val, test) "
            "fractions that sum to 1"
        )


def _prepare_folder(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished benchmark unless asked; when asked, remove it first."""
    raw = out / RAW_FILE
    if raw.exists():
        if not overwrite:
            raise FileExistsError(
                f"{raw} already exists: {out} holds a finished benchmark. "
                "Pass overwrite=True to replace it, or choose another folder."
            )
        raw.unlink()  # first, so the folder no longer claims to be complete
        (out / ATTRIBUTES_FILE).unlink(missing_ok=True)
        (out / LABELS_FILE).unlink(missing_ok=True)
        shutil.rmtree(out / IMAGE_DIR, ignore_errors=True)
        shutil.rmtree(out / LABEL_DIR, ignore_errors=True)
    (out / IMAGE_DIR).mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | Path,
    *,
    identities: int,
    images_per_identity: int,
    seed: int = 0,
    split_fractions: Sequence[float] = (0.8, 0.1, 0.1),
    workers: int | None = None,
    captions_per_image: int = 2,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write a procedural text-to-person retrieval benchmark to ``out_dir``.

    Layout as CUHK-PEDES: ``reid_raw.json`` (records with ``split``, ``captions``,
    ``file_path`` under ``imgs/``, ``processed_tokens``, ``id`` from 1), ``imgs/``, and
    ``attributes.json`` with each identity's ground truth and the attribute vocabulary;
    ``labels/`` holds an exact region label map per image (same path, ``.png``; values in
    ``labels.json``).
    Identity-disjoint splits follow ``split_fractions`` (train, val, test). The same
    arguments give the same bytes whatever ``workers`` is (default: all CPUs, or in-process
    for tiny runs; 1 renders in this process). Workers are spawned, so a script that calls
    this at import time needs the usual ``if __name__ == "__main__":`` guard. Raises
    ``FileExistsError`` if ``reid_raw.json`` exists, unless ``overwrite`` (which deletes the
    old ``imgs/`` first).

    Returns a summary: identities, images, captions, per-split counts and seconds taken.
    """
    started = time.perf_counter()
    _check_arguments(
        seed, identities, images_per_identity, captions_per_image, split_fractions, workers
    )
    out = Path(out_dir)
    _prepare_folder(out, overwrite)
    splits = assign_splits(identities, tuple(split_fractions), seed)
    assignments = [(index + 1, split) for index, split in enumerate(splits)]
    if workers is None:
        small = identities * images_per_identity < SMALL_RUN_IMAGES
        workers = 1 if small else _available_cpus()
    workers = min(workers, len(assignments))
    template = {
        "seed": seed,
        "image_root": str(out / IMAGE_DIR),
        "images_per_identity": images_per_identity,
        "captions_per_image": captions_per_image,
    }
    chunks = _chunks(assignments, workers, template)
    if workers == 1:
        results = [_render_chunk(chunk) for chunk in chunks]
    else:
        # spawn, not fork: callers such as Prefect run tasks in threads, and forking a
        # threaded process can deadlock.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            results = list(pool.map(_render_chunk, chunks))
    records = [record for chunk_records in results for record in chunk_records]

    attributes = {
        "seed": seed,
        "vocabulary": vocabulary(),
        "phrases": PHRASES,
        "identities": {
            str(identity_id): sample_identity(seed, identity_id).to_json(split)
            for identity_id, split in assignments
        },
    }
    _write_atomic(out / ATTRIBUTES_FILE, json.dumps(attributes, indent=1).encode())
    legend = {"directory": LABEL_DIR, "labels": LABELS}
    _write_atomic(out / LABELS_FILE, json.dumps(legend, indent=1).encode())
    _write_atomic(out / RAW_FILE, json.dumps(records).encode())

    identity_counts = Counter(splits)
    return {
        "out_dir": str(out),
        "identities": identities,
        "images": len(records),
        "captions": sum(len(record["captions"]) for record in records),
        "splits": {
            split: {
                "identities": identity_counts[split],
                "images": identity_counts[split] * images_per_identity,
            }
            for split in SPLITS
        },
        "seconds": round(time.perf_counter() - started, 3),
    }

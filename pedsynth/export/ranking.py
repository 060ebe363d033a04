"""``pedsynth export-ranking OUT DIR``: RAR ranking data for fine-tuning a vision-language
re-ranker, from the memory stage's index.

Per caption of a split (in the order of the memory's caption index), the caption's stored CLIP
embedding (``captions.faiss``) is searched in that split's range of ``images.faiss`` — the
retrieval ``pedsynth search`` and RAR do. Its top ``k`` images become one numbered contact
sheet, drawn by the same :func:`~pedsynth.train.engine_ranker.contact_sheet` the evaluator's
re-ranker (``eval.rerank_model``) is shown, under the same prompt
(:data:`~pedsynth.train.metrics.RANKING_PROMPT`), so a model fine-tuned on these records sees at
evaluation exactly what it was trained on.

The answer is the tile numbers from best to worst: the caption's own image first, then the
other images of the same person (equally correct in person retrieval) in retrieval order, then
the rest in retrieval order. When the index did not retrieve the caption's image, it replaces
the last candidate and takes a tile position drawn uniformly from 1…k by a generator seeded
with (seed, pair_id), so where the true match sits carries no signal; ``true_retrieved`` says
which records those are. The same build and seed give the same records and the same bytes.

Written: ``ranking.jsonl`` (one LLaVA / ShareGPT conversation record per line), ``ranking.json``
(the same records as one JSON list, the file LLaVA's own trainer reads), ``images/<id>.jpg``
(the sheets) and ``pedsynth_export.json`` (settings and counts). Besides ``id``, ``image`` and
``conversations``, each record carries ``pair_id``, ``caption``, ``true_image``,
``candidates`` (the image_id of each tile, in tile order), ``answer`` (tile numbers) and
``true_retrieved``; fine-tuning tools ignore keys they do not know.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from pedsynth.atomic import atomic_write_bytes
from pedsynth.errors import PreflightError
from pedsynth.export.target import (
    SUMMARY_FILE,
    open_build,
    prepare_folder,
    write_json,
    write_once,
)
from pedsynth.schemas.manifest import resolve_build

IMAGES_DIR = "images"
JSONL_FILE = "ranking.jsonl"
JSON_FILE = "ranking.json"
SEARCH_MARGIN = 8  # extra hits asked for, in case some are not in the final shards
QUERY_BATCH = 1024
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")


def true_position(seed: int, pair_id: str, k: int) -> int:
    """0-based tile position of a true image the index did not retrieve (uniform on 0…k-1)."""
    digest = int.from_bytes(hashlib.sha256(pair_id.encode("utf-8")).digest()[:8], "big")
    return int(np.random.default_rng([seed, digest]).integers(0, k))


def candidate_order(
    retrieved: list[str], true_image: str, person_of: dict[str, str], k: int, seed: int, pair: str
) -> tuple[list[str], list[int], bool]:
    """(tile image_ids, answer as 1-based tile numbers, whether the index found the true one)."""
    tiles = list(retrieved[:k])
    found = true_image in tiles
    if not found:
        tiles = tiles[: max(0, len(tiles) - 1)] if len(tiles) >= k else tiles
        tiles.insert(min(true_position(seed, pair, k), len(tiles)), true_image)
    person = person_of[true_image]
    rest = [i for i, img in enumerate(tiles) if img != true_image]
    same = [i for i in rest if person_of[tiles[i]] == person]
    other = [i for i in rest if person_of[tiles[i]] != person]
    answer = [tiles.index(true_image), *same, *other]
    return tiles, [i + 1 for i in answer], found


def export_ranking(
    out_dir: str | Path,
    folder: str | Path,
    *,
    k: int = 5,
    split: str = "train",
    limit: int | None = None,
    seed: int = 0,
    tile_height: int = 256,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write the ranking records of ``split`` of the build at ``out_dir`` into ``folder``."""
    import faiss
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from pedsynth.search import _load_images_index
    from pedsynth.tasks.memory_index import (
        CAPTIONS_INDEX,
        IDS_FILE,
        memory_folder,
        read_memory,
        search_index,
    )
    from pedsynth.train.data import ImageReader, index_shards
    from pedsynth.train.engine_ranker import contact_sheet
    from pedsynth.train.metrics import RANKING_PROMPT

    if k < 2:
        raise PreflightError(f"--k must be at least 2 (a ranking of one is no ranking), got {k}")
    if limit is not None and limit < 1:
        raise PreflightError(f"--limit must be at least 1, got {limit}")
    manifest = open_build(out_dir)
    out_dir = resolve_build(out_dir)  # OUT: the version `latest` names
    meta = read_memory(out_dir)
    if meta is None:
        raise PreflightError(
            f"{out_dir} has no memory index (memory/memory.json); build it with a `memory:` section"
        )
    ranges = meta["split_ranges"]
    if split not in ranges:
        raise PreflightError(f"split {split!r} is not in the memory; it has {sorted(ranges)}")
    job = {
        "export": "ranking",
        "build_fingerprint": manifest.build_fingerprint,
        "memory_fingerprint": meta.get("fingerprint"),
        "split": split,
        "k": k,
        "limit": limit,
        "seed": seed,
        "tile_height": tile_height,
    }
    outputs = [IMAGES_DIR, JSONL_FILE, JSON_FILE, SUMMARY_FILE]
    target = prepare_folder(folder, job, outputs, overwrite=overwrite)

    data = index_shards(out_dir, split)
    slot = {image_id: i for i, image_id in enumerate(data.image_ids)}
    person_of = dict(zip(data.image_ids, data.image_person, strict=True))
    text_of = {
        pair: (caption, data.image_ids[image])
        for pair, caption, image in zip(
            data.caption_pair, data.captions, data.caption_image, strict=True
        )
        if pair is not None
    }
    ids = pq.read_table(memory_folder(out_dir) / IDS_FILE)
    captions = ids.filter(
        pc.and_(pc.equal(ids["index"], "captions"), pc.equal(ids["split"], split))
    ).sort_by("position")
    queries = [
        (pos, pair)
        for pos, pair in zip(
            captions["position"].to_pylist(), captions["pair_id"].to_pylist(), strict=True
        )
        if pair in text_of
    ][:limit]
    images_index, image_rows = _load_images_index(Path(out_dir))
    image_ids = image_rows.column("image_id").to_pylist()
    caption_index = faiss.read_index(str(memory_folder(out_dir) / CAPTIONS_INDEX))
    depth = k + SEARCH_MARGIN
    ef = max(meta["index"]["ef_search"], depth)

    reader = ImageReader()
    records: list[dict[str, Any]] = []
    sheets_written = 0
    for start in range(0, len(queries), QUERY_BATCH):
        batch = queries[start : start + QUERY_BATCH]
        vectors = np.stack([caption_index.reconstruct(int(pos)) for pos, _ in batch])
        _, found = search_index(images_index, vectors, depth, id_range=tuple(ranges[split]), ef=ef)
        for (_, pair), hits in zip(batch, found.tolist(), strict=True):
            caption, true_image = text_of[pair]
            retrieved = [image_ids[h] for h in hits if h >= 0 and image_ids[h] in slot]
            tiles, answer, was_found = candidate_order(
                retrieved, true_image, person_of, k, seed, pair
            )
            rid = record_id(pair)
            image_rel = f"{IMAGES_DIR}/{rid}.jpg"
            if not (target / image_rel).is_file():
                crops = [reader.read(data.image_refs[slot[t]]) for t in tiles]
                sheets_written += write_once(target / image_rel, contact_sheet(crops, tile_height))
            prompt = RANKING_PROMPT.format(n=len(tiles), query=caption)
            records.append(
                {
                    "id": rid,
                    "image": image_rel,
                    "conversations": [
                        {"from": "human", "value": f"<image>\n{prompt}"},
                        {"from": "gpt", "value": ", ".join(map(str, answer))},
                    ],
                    "pair_id": pair,
                    "caption": caption,
                    "true_image": true_image,
                    "candidates": tiles,
                    "answer": answer,
                    "true_retrieved": was_found,
                }
            )

    retrieved = sum(r["true_retrieved"] for r in records)
    summary = {
        "export": "ranking",
        "build": manifest.name,
        "build_fingerprint": manifest.build_fingerprint,
        "split": split,
        "k": k,
        "seed": seed,
        "limit": limit,
        "records": len(records),
        "true_retrieved": retrieved,
        "true_retrieved_rate": round(retrieved / len(records), 4) if records else None,
        "prompt": RANKING_PROMPT,
    }
    write_json(target / SUMMARY_FILE, summary)
    write_json(target / JSON_FILE, records)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_bytes(lines.encode("utf-8"), target / JSONL_FILE)  # last: the export is complete
    return {
        "folder": str(target),
        "records": len(records),
        "true_retrieved": retrieved,
        "sheets_written": sheets_written,
    }


def record_id(pair_id: str) -> str:
    """A file-name-safe id for a record (the pair_id itself when it is one)."""
    if _SAFE_ID.fullmatch(pair_id):
        return pair_id
    return hashlib.sha256(pair_id.encode("utf-8")).hexdigest()[:20]

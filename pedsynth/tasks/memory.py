"""The ``memory`` stage (RAR): CLIP embeddings of every image and caption in faiss HNSW indexes.

It embeds each distinct image once and every caption, writes ``OUT/memory/``
(:mod:`pedsynth.tasks.memory_index`), removes same-identity near-duplicates
(:mod:`pedsynth.tasks.memory_dedupe`), fills ``hard_negatives`` for every caption
(:mod:`pedsynth.tasks.hard_negatives`), and sends rows of undecodable images to rejects
(``image_decode_error``). ``pedsynth search`` queries the folder (:mod:`pedsynth.search`).

Images are stored split by split, so a split is a contiguous id range of ``images.faiss``. It is
a dataset stage: it needs every shard at once; the registry fingerprints its output over every
input, so a rerun with the same inputs, config and code reuses it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pedsynth.atomic import atomic_write_bytes
from pedsynth.schemas.base import shaping_dump
from pedsynth.schemas.tables import (
    PAIRS_SCHEMA,
    REJECT_ROW_FIELDS,
    SPLITS,
    reject_row,
    rejects_table,
)
from pedsynth.schemas.vision import MemoryConfig
from pedsynth.tasks.hard_negatives import hard_negatives
from pedsynth.tasks.memory_dedupe import find_duplicates
from pedsynth.tasks.memory_index import (
    CAPTIONS_INDEX,
    IDS_FILE,
    IDS_SCHEMA,
    IMAGES_INDEX,
    MEMORY_DIR,
    MEMORY_FILE,
    RECALL_K,
    hnsw_index,
    memory_folder,
    normalize,
    read_memory,
    recall_at_k,
    write_index_atomic,
)
from pedsynth.tasks.shards import (
    ShardResult,
    fingerprint,
    read_shard,
    run_shard,
    shard_paths,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)

STAGE = "memory"


@dataclass
class _Collected:
    """Everything embedded, in first-seen order."""

    image_ids: list[str] = field(default_factory=list)
    image_person: list[str] = field(default_factory=list)
    image_split: list[str] = field(default_factory=list)
    image_vecs: list[np.ndarray] = field(default_factory=list)
    pair_ids: list[str] = field(default_factory=list)
    caption_image: list[str] = field(default_factory=list)
    caption_vecs: list[np.ndarray] = field(default_factory=list)
    bad_images: dict[str, str] = field(default_factory=dict)


def _embed_shards(shards: list[ShardResult], engine: Any) -> _Collected:
    """Embed each distinct image once and every caption, one shard at a time (bounded memory)."""
    from pedsynth.engines.clip import ImageDecodeError

    got = _Collected()
    seen: set[str] = set()
    bs = engine.cfg.batch_size
    columns = ["pair_id", "image_id", "person_id", "split", "caption", "image"]
    for shard in shards:
        table = read_shard(shard, columns=columns)
        image_ids = table.column("image_id").to_pylist()
        fresh = []
        for i, image_id in enumerate(image_ids):
            if image_id not in seen:
                seen.add(image_id)
                fresh.append(i)
        persons, splits = table.column("person_id").to_pylist(), table.column("split").to_pylist()
        images = table.column("image")
        for start in range(0, len(fresh), bs):
            ok, pixels = [], []
            for i in fresh[start : start + bs]:
                try:
                    pixels.append(engine.prepare_image(images[i]["bytes"].as_py() or b""))
                    ok.append(i)
                except ImageDecodeError as exc:
                    got.bad_images[image_ids[i]] = str(exc)
            if not ok:
                continue
            got.image_vecs.append(normalize(engine.encode_images(np.stack(pixels)).pooled))
            got.image_ids += [image_ids[i] for i in ok]
            got.image_person += [persons[i] for i in ok]
            got.image_split += [splits[i] for i in ok]
        captions = table.column("caption").to_pylist()
        rows = [
            i
            for i, c in enumerate(captions)
            if c is not None and image_ids[i] not in got.bad_images
        ]
        if rows:
            got.caption_vecs.append(
                normalize(engine.encode_texts([captions[i] for i in rows]).pooled)
            )
            pair_ids = table.column("pair_id").to_pylist()
            got.pair_ids += [pair_ids[i] for i in rows]
            got.caption_image += [image_ids[i] for i in rows]
    return got


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


class MemoryStage:
    """Dataset stage: embeds everything, writes ``OUT/memory/``, then one output per shard."""

    name = STAGE

    def __init__(self, cfg: MemoryConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def fingerprint_parts(self) -> dict[str, Any]:
        from pedsynth.engines.clip import weights_identity

        return {
            "config": shaping_dump(self.cfg),
            "weights": weights_identity(self.cfg.clip),
            "seed": self.seed,
        }

    def run(self, shards: list[ShardResult], context: Any) -> list[ShardResult]:
        """Build (or reuse) ``OUT/memory/`` and one output per input shard.

        ``context`` is the registry's ``StageContext``: ``out_dir`` and ``fingerprint`` (of
        this stage's output over every input shard) are what this stage reads.
        """
        out_dir, build_fp = Path(context.out_dir), context.fingerprint
        shard_fps = [fingerprint(memory=build_fp, key=s.key) for s in shards]
        meta = read_memory(out_dir)
        done = meta is not None and meta.get("fingerprint") == build_fp
        if done and all(
            shard_paths(out_dir, STAGE, s.key, fp)[0].exists()
            for s, fp in zip(shards, shard_fps, strict=True)
        ):
            return [
                run_shard(out_dir, STAGE, s.key, fp, _already_built)
                for s, fp in zip(shards, shard_fps, strict=True)
            ]
        built = self._build(shards, out_dir, build_fp)
        return [
            run_shard(out_dir, STAGE, s.key, fp, lambda s=s: built.apply(read_shard(s)))
            for s, fp in zip(shards, shard_fps, strict=True)
        ]

    def _build(self, shards: list[ShardResult], out_dir: Path, build_fp: str) -> _Built:
        from pedsynth.engines.clip import load_clip

        cfg = self.cfg
        engine = load_clip(cfg.clip)
        got = _embed_shards(shards, engine)
        dim = engine.embed_dim
        vecs = np.concatenate(got.image_vecs) if got.image_vecs else np.empty((0, dim), np.float32)
        # Split-contiguous order, first-seen within a split: a split is an id range.
        order = sorted(
            range(len(got.image_ids)), key=lambda i: (_split_order(got.image_split[i]), i)
        )
        first_seen = {got.image_ids[i]: i for i in range(len(got.image_ids))}
        ids = [got.image_ids[i] for i in order]
        persons = [got.image_person[i] for i in order]
        splits = [got.image_split[i] for i in order]
        vecs = vecs[order]
        index = hnsw_index(vecs, cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)
        # "Keep the first" means first seen in the shards, not first in split order.
        priority = np.array([first_seen[i] for i in ids])
        dups = find_duplicates(vecs, ids, persons, splits, index, cfg, priority)
        removed = dups.removed if cfg.dedupe else {}
        if dups.cross_identity:
            log.warning(
                "%d near-duplicate image pairs have different identities (likely labelling "
                "errors; kept, listed in %s/%s)",
                len(dups.cross_identity),
                MEMORY_DIR,
                MEMORY_FILE,
            )
        if removed:
            keep = [i for i, image_id in enumerate(ids) if image_id not in removed]
            ids, persons, splits = (
                [ids[i] for i in keep],
                [persons[i] for i in keep],
                [splits[i] for i in keep],
            )
            vecs = vecs[keep]
            index = hnsw_index(vecs, cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)
        split_ranges: dict[str, tuple[int, int]] = {}
        for pos, split in enumerate(splits):
            lo, _ = split_ranges.get(split, (pos, pos))
            split_ranges[split] = (lo, pos + 1)

        cap_vecs = (
            np.concatenate(got.caption_vecs) if got.caption_vecs else np.empty((0, dim), np.float32)
        )
        cap_keep = [i for i, img in enumerate(got.caption_image) if img not in removed]
        cap_vecs = cap_vecs[cap_keep]
        cap_pairs = [got.pair_ids[i] for i in cap_keep]
        cap_images = [got.caption_image[i] for i in cap_keep]
        position = {image_id: pos for pos, image_id in enumerate(ids)}
        cap_person = [persons[position[img]] for img in cap_images]
        cap_split = [splits[position[img]] for img in cap_images]
        cap_index = hnsw_index(cap_vecs, cfg.hnsw_m, cfg.ef_construction, cfg.ef_search)

        negatives = hard_negatives(
            index, cap_vecs, cap_person, cap_split, persons, split_ranges,
            cfg.hard_negatives_k, cfg.ef_search,
        )  # fmt: skip
        negatives_by_pair = {
            pair: [ids[i] for i in row] for pair, row in zip(cap_pairs, negatives, strict=True)
        }

        rng = np.random.default_rng(self.seed)
        sample = rng.choice(len(cap_vecs), min(cfg.recall_queries, len(cap_vecs)), replace=False)
        recall = recall_at_k(index, vecs, cap_vecs[np.sort(sample)], RECALL_K, cfg.ef_search)

        folder = memory_folder(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        write_index_atomic(index, folder / IMAGES_INDEX)
        write_index_atomic(cap_index, folder / CAPTIONS_INDEX)
        id_rows = [
            {"index": "images", "position": p, "image_id": i, "pair_id": None,
             "person_id": persons[p], "split": splits[p]}
            for p, i in enumerate(ids)
        ] + [
            {"index": "captions", "position": p, "image_id": cap_images[p], "pair_id": pair,
             "person_id": cap_person[p], "split": cap_split[p]}
            for p, pair in enumerate(cap_pairs)
        ]  # fmt: skip
        write_parquet_atomic(pa.Table.from_pylist(id_rows, schema=IDS_SCHEMA), folder / IDS_FILE)
        meta = {
            "fingerprint": build_fp,
            "clip": cfg.clip.model_dump(mode="json"),
            "embed_dim": dim,
            "metric": "inner_product on L2-normalised vectors",
            "index": {
                "type": "IndexHNSWFlat",
                "M": cfg.hnsw_m,
                "ef_construction": cfg.ef_construction,
                "ef_search": cfg.ef_search,
            },
            "counts": {
                "images": len(ids),
                "captions": len(cap_pairs),
                "near_duplicates_removed": len(removed),
                "near_duplicates_found": len(dups.within_identity),
                "cross_identity_duplicates": len(dups.cross_identity),
                "undecodable_images": len(got.bad_images),
            },
            "split_ranges": {s: list(r) for s, r in split_ranges.items()},
            "recall_at_10": {"hnsw_vs_exact": recall, "queries": int(len(sample))},
            "duplicate_threshold": cfg.duplicate_threshold,
            "dedupe": cfg.dedupe,
            "hard_negatives_k": cfg.hard_negatives_k,
            "near_duplicates": dups.within_identity,
            "cross_identity_duplicates": dups.cross_identity,
            "undecodable_images": got.bad_images,
        }
        atomic_write_bytes(json.dumps(meta, indent=2).encode(), folder / MEMORY_FILE)
        return _Built(removed, got.bad_images, negatives_by_pair, cfg.duplicate_threshold)


def _already_built() -> tuple[pa.Table, pa.Table]:
    raise RuntimeError("memory: a finished shard output disappeared while being reused")


@dataclass(frozen=True)
class _Built:
    removed: dict[str, tuple[str, float]]
    bad_images: dict[str, str]
    negatives: dict[str, list[str]]
    threshold: float

    def apply(self, table: pa.Table) -> tuple[pa.Table, pa.Table]:
        """Drop near-duplicate / undecodable rows (to rejects) and fill ``hard_negatives``."""
        image_ids = table.column("image_id").to_pylist()
        pair_ids = table.column("pair_id").to_pylist()
        reasons: list[tuple[int, str, str]] = []
        for i, image_id in enumerate(image_ids):
            if image_id in self.bad_images:
                reasons.append((i, "image_decode_error", self.bad_images[image_id]))
            elif image_id in self.removed:
                kept, sim = self.removed[image_id]
                detail = f"near-duplicate of image {kept} (cosine {sim:.4f} >= {self.threshold})"
                reasons.append((i, "near_duplicate", detail))
        rejects = []
        if reasons:
            picked = table.take(pa.array([r[0] for r in reasons], pa.int64()))
            for row, (_, reason, detail) in zip(
                picked.select(list(REJECT_ROW_FIELDS)).to_pylist(), reasons, strict=True
            ):
                rejects.append(reject_row(STAGE, reason, detail, row))
        negatives = pa.array(
            [self.negatives.get(p) for p in pair_ids], PAIRS_SCHEMA.field("hard_negatives").type
        )
        table = table.set_column(
            table.schema.get_field_index("hard_negatives"), "hard_negatives", negatives
        )
        if reasons:
            keep = np.ones(table.num_rows, dtype=bool)
            keep[[r[0] for r in reasons]] = False
            table = table.filter(pa.array(keep))
        return table, rejects_table(rejects)


def build_stage(cfg: MemoryConfig, seed: int = 0) -> MemoryStage:
    return MemoryStage(cfg, seed)

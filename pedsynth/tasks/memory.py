"""The ``memory`` stage (RAR): CLIP embeddings of every image and caption in faiss HNSW indexes.

Written to ``OUT/memory/``: ``images.faiss`` and ``captions.faiss`` (``IndexHNSWFlat``, inner
product on L2-normalised vectors), ``ids.parquet`` (index position → image_id / pair_id,
person_id, split) and ``memory.json`` (model, index settings, counts, HNSW recall@10 against
exact search, the duplicate report; written last, it marks the folder complete).

Uses of the index within the build:
- near-duplicates: an image whose neighbour is at or above ``duplicate_threshold`` (cosine) and
  has the *same* identity is kept once (the first seen); the others' rows go to rejects
  (``near_duplicate``). Across identities both are kept and the pair is flagged (a likely
  labelling error) in ``memory.json`` and the log, never merged.
- ``hard_negatives``: for every caption, the ids of the k most similar images of other
  identities in the same split, most similar first.

Images are stored split by split, so a split is a contiguous id range of ``images.faiss`` and a
search can be restricted to it (``search(out, text, split="test")``). The stage needs all shards
at once; its shard outputs are fingerprinted over every input, so a rerun skips it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pedsynth.schemas.tables import PAIRS_SCHEMA, SPLITS, rejects_table
from pedsynth.schemas.vision import ClipModelConfig, MemoryConfig
from pedsynth.tasks.shards import (
    ShardResult,
    atomic_write_bytes,
    code_version,
    fingerprint,
    read_shard,
    run_shard,
    shard_paths,
    write_parquet_atomic,
)

log = logging.getLogger(__name__)

STAGE = "memory"
MEMORY_DIR = "memory"
IMAGES_INDEX = "images.faiss"
CAPTIONS_INDEX = "captions.faiss"
IDS_FILE = "ids.parquet"
MEMORY_FILE = "memory.json"
RECALL_K = 10
REJECT_COLUMNS = ["image_id", "pair_id", "person_id", "split", "caption", "source"]
IDS_SCHEMA = pa.schema(
    [
        pa.field("index", pa.string(), nullable=False),  # "images" | "captions"
        pa.field("position", pa.int64(), nullable=False),  # row in that faiss index
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("pair_id", pa.string()),  # captions only
        pa.field("person_id", pa.string(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
    ]
)


# ---- index helpers ------------------------------------------------------------------------


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy (zero vectors stay zero)."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def hnsw_index(vectors: np.ndarray, m: int, ef_construction: int, ef_search: int):
    """An ``IndexHNSWFlat`` (inner product) over normalised ``vectors``."""
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    index.hnsw.efSearch = ef_search
    if len(vectors):
        index.add(vectors)
    return index


def search_index(
    index: Any, queries: np.ndarray, k: int, *, id_range: tuple[int, int] | None = None, ef: int
) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the k best, best first; ids −1 where fewer exist."""
    import faiss

    k = max(1, k)
    selector = faiss.IDSelectorRange(*id_range) if id_range is not None else None
    params = faiss.SearchParametersHNSW(efSearch=max(ef, k))
    if selector is not None:
        params.sel = selector
    return index.search(np.ascontiguousarray(queries, np.float32), k, params=params)


def recall_at_k(index: Any, base: np.ndarray, queries: np.ndarray, k: int, ef: int) -> float | None:
    """Mean fraction of the exact top-k (``IndexFlatIP``) that the HNSW search returns."""
    import faiss

    if len(base) == 0 or len(queries) == 0:
        return None
    k = min(k, len(base))
    exact = faiss.IndexFlatIP(base.shape[1])
    exact.add(base)
    _, truth = exact.search(queries, k)
    _, found = search_index(index, queries, k, ef=ef)
    hits = [len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True)]
    return float(np.mean(hits) / k)


def _write_index_atomic(index: Any, path: Path) -> None:
    import faiss

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        faiss.write_index(index, str(tmp))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---- embedding pass -----------------------------------------------------------------------


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


# ---- duplicates ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Duplicates:
    removed: dict[str, tuple[str, float]]  # image_id -> (kept image_id, cosine), same identity
    within_identity: list[dict]  # the same as a report (also when dedupe is off)
    cross_identity: list[dict]  # pairs of different identities above the threshold


def find_duplicates(
    vectors: np.ndarray,
    image_ids: list[str],
    persons: list[str],
    splits: list[str],
    index: Any,
    cfg: MemoryConfig,
    priority: np.ndarray | None = None,
) -> Duplicates:
    """Near-duplicate pairs from each image's HNSW neighbours; keep the first seen per identity.

    ``index`` holds ``vectors`` in the same order; ``priority`` (default: position) decides
    which copy is kept: the lowest. Similarities are recomputed exactly for every candidate.
    """
    n = len(image_ids)
    if n < 2:
        return Duplicates({}, [], [])
    k = min(cfg.duplicate_neighbours + 1, n)
    _, neighbours = search_index(index, vectors, k, ef=cfg.ef_search)
    pairs: set[tuple[int, int]] = set()
    for a, row in enumerate(neighbours.tolist()):
        for b in row:
            if b >= 0 and b != a:
                pairs.add((min(a, b), max(a, b)))
    adjacency: dict[int, list[tuple[int, float]]] = defaultdict(list)
    cross = []
    for a, b in sorted(pairs):
        sim = float(vectors[a] @ vectors[b])
        if sim < cfg.duplicate_threshold:
            continue
        if persons[a] == persons[b]:
            adjacency[a].append((b, sim))
            adjacency[b].append((a, sim))
        else:
            cross.append(
                {
                    "image_id": image_ids[a],
                    "person_id": persons[a],
                    "split": splits[a],
                    "other_image_id": image_ids[b],
                    "other_person_id": persons[b],
                    "other_split": splits[b],
                    "similarity": round(sim, 6),
                }
            )
    rank = np.arange(n) if priority is None else np.asarray(priority)
    removed: dict[str, tuple[str, float]] = {}
    # In priority order, a kept image removes its unremoved same-identity duplicates; those
    # always rank lower (had one ranked higher, it would have removed this image first).
    for a in np.argsort(rank, kind="stable").tolist():
        if image_ids[a] in removed:
            continue
        for b, sim in sorted(adjacency[a], key=lambda e: rank[e[0]]):
            if image_ids[b] not in removed:
                removed[image_ids[b]] = (image_ids[a], sim)
    person_of = dict(zip(image_ids, persons, strict=True))
    report = [
        {"image_id": img, "kept_image_id": kept, "person_id": person_of[img],
         "similarity": round(sim, 6)}
        for img, (kept, sim) in removed.items()
    ]  # fmt: skip
    cross.sort(key=lambda r: (-r["similarity"], r["image_id"], r["other_image_id"]))
    return Duplicates(removed, report, cross)


# ---- hard negatives -----------------------------------------------------------------------


def hard_negatives(
    index: Any,
    queries: np.ndarray,
    query_person: list[str],
    query_split: list[str],
    image_person: list[str],
    split_ranges: dict[str, tuple[int, int]],
    k: int,
    ef: int,
) -> list[list[int]]:
    """Per query, the ids of the k most similar images of other identities in its split.

    Searching k + (images of the query's identity in the split) neighbours leaves at least k of
    other identities after filtering; queries are grouped by that size.
    """
    if k == 0:
        return [[] for _ in query_person]
    same_person: dict[tuple[str, str], int] = defaultdict(int)
    for split, (lo, hi) in split_ranges.items():
        for pos in range(lo, hi):
            same_person[(split, image_person[pos])] += 1
    groups: dict[tuple[str, int], list[int]] = defaultdict(list)
    for q, (person, split) in enumerate(zip(query_person, query_split, strict=True)):
        lo, hi = split_ranges.get(split, (0, 0))
        need = min(k + same_person[(split, person)], hi - lo)
        groups[(split, need)].append(q)
    out: list[list[int]] = [[] for _ in query_person]
    for (split, need), members in groups.items():
        if need <= 0:
            continue
        _, ids = search_index(
            index, queries[members], need, id_range=split_ranges[split], ef=max(ef, need)
        )
        for q, row in zip(members, ids.tolist(), strict=True):
            person = query_person[q]
            out[q] = [i for i in row if i >= 0 and image_person[i] != person][:k]
    return out


# ---- the stage ----------------------------------------------------------------------------


def _split_order(split: str) -> tuple[int, str]:
    return (SPLITS.index(split) if split in SPLITS else len(SPLITS), split)


class MemoryStage:
    """Dataset stage: embeds everything, writes ``OUT/memory/``, then one output per shard."""

    name = STAGE

    def __init__(self, cfg: MemoryConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed

    def fingerprint(self, shards: list[ShardResult]) -> str:
        from pedsynth.engines.clip import weights_identity

        return fingerprint(
            inputs=[(s.stage, s.key, s.fingerprint) for s in shards],
            config=self.cfg.model_dump(mode="json"),
            weights=weights_identity(self.cfg.clip),
            seed=self.seed,
            code=code_version(),
        )

    def run(self, shards: list[ShardResult], out_dir: str | Path) -> list[ShardResult]:
        out_dir = Path(out_dir)
        build_fp = self.fingerprint(shards)
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

        folder = out_dir / MEMORY_DIR
        folder.mkdir(parents=True, exist_ok=True)
        _write_index_atomic(index, folder / IMAGES_INDEX)
        _write_index_atomic(cap_index, folder / CAPTIONS_INDEX)
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
                picked.select(REJECT_COLUMNS).to_pylist(), reasons, strict=True
            ):
                rejects.append({**row, "stage": STAGE, "reason": reason, "detail": detail})
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


# ---- query API ----------------------------------------------------------------------------


def read_memory(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / MEMORY_DIR / MEMORY_FILE
    return json.loads(path.read_text()) if path.exists() else None


_loaded: dict[tuple[str, int], tuple[Any, pa.Table]] = {}


def _load_images_index(out_dir: Path) -> tuple[Any, pa.Table]:
    import faiss

    path = out_dir / MEMORY_DIR / IMAGES_INDEX
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _loaded:
        ids = pq.read_table(out_dir / MEMORY_DIR / IDS_FILE)
        ids = ids.filter(pc.equal(ids.column("index"), "images")).sort_by("position")
        _loaded[key] = (faiss.read_index(str(path)), ids)
    return _loaded[key]


def _caption_files(out_dir: Path) -> list[str]:
    final = sorted((out_dir / "data").glob("*.parquet"))
    if final:
        return [str(p) for p in final]
    return [str(p) for p in sorted((out_dir / "_work" / STAGE).glob("*.parquet"))
            if not p.name.endswith(".rejects.parquet")]  # fmt: skip


def search(
    out_dir: str | Path, text: str, k: int = 10, *, split: str | None = None
) -> list[dict[str, Any]]:
    """The k images most similar to ``text``: image_id, person_id, split, score, captions."""
    import pyarrow.dataset as ds

    from pedsynth.engines.clip import load_clip

    out_dir = Path(out_dir)
    meta = read_memory(out_dir)
    if meta is None:
        raise FileNotFoundError(
            f"{out_dir / MEMORY_DIR / MEMORY_FILE} not found (was the build run with a "
            "`memory:` section?)"
        )
    if not text.strip():
        raise ValueError("search text is empty")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    id_range = None
    if split is not None:
        ranges = meta["split_ranges"]
        if split not in ranges:
            raise ValueError(f"split {split!r} is not in the memory; it has {sorted(ranges)}")
        id_range = tuple(ranges[split])
    engine = load_clip(ClipModelConfig.model_validate(meta["clip"]))
    query = normalize(engine.encode_texts([text]).pooled)
    index, ids = _load_images_index(out_dir)
    sims, found = search_index(
        index, query, k, id_range=id_range, ef=max(meta["index"]["ef_search"], k)
    )
    positions = [int(i) for i in found[0] if i >= 0]
    rows = ids.take(pa.array(positions, pa.int64())).to_pylist() if positions else []
    captions: dict[str, list[str]] = defaultdict(list)
    files = _caption_files(out_dir)
    if rows and files:
        wanted = pa.array([r["image_id"] for r in rows])
        table = ds.dataset(files, format="parquet").to_table(
            columns=["image_id", "caption"], filter=pc.field("image_id").isin(wanted)
        )
        for image_id, caption in zip(
            table.column("image_id").to_pylist(), table.column("caption").to_pylist(), strict=True
        ):
            if caption is not None:
                captions[image_id].append(caption)
    return [
        {
            "rank": rank + 1,
            "image_id": row["image_id"],
            "person_id": row["person_id"],
            "split": row["split"],
            "score": float(score),
            "captions": captions.get(row["image_id"], []),
        }
        for rank, (row, score) in enumerate(zip(rows, sims[0].tolist(), strict=False))
    ]

"""The memory's faiss indexes and folder layout: build, search, measure recall, commit.

``OUT/memory/`` holds ``images.faiss`` and ``captions.faiss`` (``IndexHNSWFlat``, inner product
on L2-normalised vectors, so a score is a cosine), ``ids.parquet`` (index position → image_id /
pair_id, person_id, split) and ``memory.json`` (settings, counts, recall, duplicate report),
written last: it marks the folder complete.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pedsynth.atomic import atomic_write_with

MEMORY_DIR = "memory"
IMAGES_INDEX = "images.faiss"
CAPTIONS_INDEX = "captions.faiss"
IDS_FILE = "ids.parquet"
MEMORY_FILE = "memory.json"
RECALL_K = 10
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


def normalize(vectors: np.ndarray) -> np.ndarray:
    """L2-normalised float32 copy (zero vectors stay zero)."""
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


def hnsw_index(vectors: np.ndarray, m: int, ef_construction: int, ef_search: int) -> Any:
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


def write_index_atomic(index: Any, path: Path) -> None:
    import faiss

    atomic_write_with(path, lambda tmp: faiss.write_index(index, str(tmp)))


def memory_folder(out_dir: str | Path) -> Path:
    return Path(out_dir) / MEMORY_DIR


def read_memory(out_dir: str | Path) -> dict | None:
    """``memory.json`` of a build, or None when no memory was completed there."""
    path = memory_folder(out_dir) / MEMORY_FILE
    return json.loads(path.read_text()) if path.exists() else None

"""Near-duplicate images from the memory's image index.

Two images are near-duplicates when their CLIP cosine is at or above ``duplicate_threshold``.
Within one identity the first seen is kept and the others are removed (their rows go to
rejects as ``near_duplicate``); across identities both are kept and the pair is reported (a
likely labelling error), never merged. Candidates come from each image's HNSW neighbours; the
cosine of every candidate pair is recomputed exactly.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np

from pedsynth.schemas.vision import MemoryConfig
from pedsynth.tasks.memory_index import search_index


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

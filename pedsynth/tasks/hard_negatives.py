"""Hard negatives per caption: the most similar images of *other* identities in its split.

The trainer reads them from the ``hard_negatives`` column (image ids, most similar first) to
put confusable people in the same batch. Images are stored split by split in the image index,
so a split is an id range and the search is restricted to it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from pedsynth.tasks.memory_index import search_index


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

"""Text→image retrieval metrics as IRRA computes them, and the two re-rankers.

:func:`rank_metrics` is the one function users need to score their own model: give it a
(queries × gallery) similarity matrix and the identity of every query and gallery item.
Ranking is a full, stable sort of the gallery per query (ties keep gallery order), so a
result does not depend on the sorting backend. The ranks of the relevant items are computed
directly (count of items ranked before each), which is exact and faster than sorting.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

METRIC_NAMES = ("R1", "R5", "R10", "mAP", "mINP")
_QUERY_CHUNK_CELLS = 8_000_000  # bounds the (pairs × gallery) comparison tensors


def _as_tensor(values: Any, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu()
    array = np.asarray(values)
    if array.dtype.kind in "OUS":  # string identities: map to integers
        _, inverse = np.unique(array, return_inverse=True)
        return torch.from_numpy(inverse.reshape(array.shape).astype(np.int64))
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{name}: expected numbers or strings, got dtype {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array))


def _identity_codes(query_pids: Any, gallery_pids: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and gallery identities as one shared integer code space."""
    q, g = np.asarray(query_pids), np.asarray(gallery_pids)
    if isinstance(query_pids, torch.Tensor) and isinstance(gallery_pids, torch.Tensor):
        return query_pids.detach().cpu().long(), gallery_pids.detach().cpu().long()
    if q.dtype.kind in "OUS" or g.dtype.kind in "OUS":
        _, inverse = np.unique(np.concatenate([q.astype(str), g.astype(str)]), return_inverse=True)
        codes = torch.from_numpy(inverse.astype(np.int64))
        return codes[: len(q)], codes[len(q) :]
    return _as_tensor(q, "query_pids").long(), _as_tensor(g, "gallery_pids").long()


def rank_metrics(
    similarity: Any, query_pids: Any, gallery_pids: Any, *, exclude: Any = None
) -> dict[str, float]:
    """R1, R5, R10, mAP and mINP in percent for text→image retrieval, as IRRA defines them.

    ``similarity``: (Q, G) array, larger = more similar (NumPy or torch). ``query_pids`` (Q,)
    and ``gallery_pids`` (G,): identities (ints or strings). Every query needs at least one
    gallery item of its identity; a query without one raises ``ValueError`` (IRRA would
    silently divide by zero). R@k: share of queries with a match in the top k. mAP: mean over
    queries of the average precision over *all* relevant gallery items. mINP: mean of
    (number of relevant items) / (rank of the last one). Ties are broken by gallery order.

    ``exclude`` (Q, G) booleans: gallery items removed from a query's ranking altogether (the
    ReID protocol's junk, e.g. the query image itself in image→image retrieval); they are
    neither relevant nor ranked before anything.
    """
    sim = _as_tensor(similarity, "similarity")
    if sim.ndim != 2:
        raise ValueError(
            f"similarity: expected a (queries, gallery) matrix, got {tuple(sim.shape)}"
        )
    q_pids, g_pids = _identity_codes(query_pids, gallery_pids)
    n_query, n_gallery = sim.shape
    if q_pids.shape != (n_query,) or g_pids.shape != (n_gallery,):
        raise ValueError(
            f"shape mismatch: similarity {tuple(sim.shape)}, query_pids {tuple(q_pids.shape)}, "
            f"gallery_pids {tuple(g_pids.shape)}"
        )
    sim = sim.float()
    if not bool(torch.isfinite(sim.sum())) and not torch.isfinite(sim).all():
        raise ValueError("similarity contains NaN or infinite values")
    if n_query == 0 or n_gallery == 0:
        raise ValueError(f"need at least one query and one gallery item, got {tuple(sim.shape)}")
    relevant = q_pids[:, None] == g_pids[None, :]  # (Q, G)
    if exclude is not None:
        junk = _as_tensor(exclude, "exclude").bool()
        if junk.shape != sim.shape:
            raise ValueError(f"exclude: shape {tuple(junk.shape)}, similarity {tuple(sim.shape)}")
        relevant &= ~junk
        # Below every kept score: never ranked before a relevant item, so ranks are unchanged.
        sim = sim.masked_fill(junk, float(sim.min()) - 1.0)
    # Counted and listed with NumPy: torch's boolean row sums are several times slower on CPU.
    relevant_np = relevant.numpy()
    num_rel = torch.from_numpy(np.count_nonzero(relevant_np, axis=1).astype(np.int64))
    missing = torch.nonzero(num_rel == 0).flatten()
    if len(missing):
        shown = ", ".join(f"#{int(i)} (id {_label(query_pids, int(i))})" for i in missing[:5])
        raise ValueError(
            f"{len(missing)} of {n_query} queries have no gallery item of their identity, "
            f"e.g. query {shown}; every query needs at least one match"
        )
    max_rel = int(num_rel.max())
    # One entry per (query, relevant gallery item) pair, in query order then gallery order.
    pair_query, pair_item = (torch.from_numpy(a.astype(np.int64)) for a in np.nonzero(relevant_np))
    pair_rank = _stable_ranks(sim, pair_query, pair_item)
    # Back to a (Q, max_rel) table padded past the gallery end.
    slot = torch.arange(len(pair_query)) - torch.repeat_interleave(
        torch.cumsum(num_rel, 0) - num_rel, num_rel
    )
    valid = torch.arange(max_rel)[None, :] < num_rel[:, None]
    ranks = torch.full((n_query, max_rel), n_gallery + 1, dtype=torch.long)
    ranks[pair_query, slot] = pair_rank
    ranks, _ = torch.sort(ranks, dim=1)  # relevant items in ranking order
    first = ranks[:, 0]
    hits = torch.arange(1, max_rel + 1, dtype=torch.float64)[None, :]
    precision = torch.where(valid, hits / (ranks.double() + 1), torch.zeros(1, dtype=torch.float64))
    ap = precision.sum(1) / num_rel.double()
    last = torch.gather(ranks, 1, (num_rel - 1)[:, None]).squeeze(1)
    inp = num_rel.double() / (last.double() + 1)
    return {
        "R1": float((first < 1).double().mean() * 100),
        "R5": float((first < 5).double().mean() * 100),
        "R10": float((first < 10).double().mean() * 100),
        "mAP": float(ap.mean() * 100),
        "mINP": float(inp.mean() * 100),
    }


def image_to_image_metrics(
    features: Any, person_ids: Sequence[Any], camera_ids: Sequence[Any] | None = None
) -> dict[str, float]:
    """Image→image re-identification on one split, scored by :func:`rank_metrics`.

    Every image whose identity has another image in the split is a query; the gallery is all
    the split's images, minus the query itself (and, given ``camera_ids``, minus images of the
    same identity from the same camera, the Market-1501 protocol). Images of identities seen
    once stay in the gallery as distractors. ``features``: (N, D), normalised here; returns
    R1, R5, R10, mAP, mINP (percent), ``queries`` and ``gallery`` (the split's image count).
    """
    f = torch.nn.functional.normalize(_as_tensor(features, "features").float(), dim=1)
    n = f.shape[0]
    codes = _codes(person_ids, "person_ids")
    if len(codes) != n:
        raise ValueError(f"{n} features but {len(codes)} person ids")
    same_person = codes[:, None] == codes[None, :]
    junk = torch.eye(n, dtype=torch.bool)
    if camera_ids is not None:
        cams = _codes(camera_ids, "camera_ids")
        if len(cams) != n:
            raise ValueError(f"{n} features but {len(cams)} camera ids")
        junk |= same_person & (cams[:, None] == cams[None, :])
    queries = torch.nonzero((same_person & ~junk).any(dim=1)).flatten()
    if len(queries) == 0:
        raise ValueError("no image has another image of its identity: no image→image query")
    result = rank_metrics(f[queries] @ f.T, codes[queries], codes, exclude=junk[queries])
    return result | {"queries": len(queries), "gallery": n}


def _codes(values: Any, name: str) -> torch.Tensor:
    """Integer codes of one sequence of labels (ints or strings)."""
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().long().flatten()
    return _as_tensor(np.asarray(list(values)), name).long().flatten()


def _stable_ranks(sim: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """0-based position of item ``cols[i]`` in the stable descending ranking of row ``rows[i]``.

    Position = items scored higher + items scored equal that come earlier in the gallery.
    Equal scores are rare with float features, so the tie count runs only where one occurs.
    Counted with NumPy: its ``count_nonzero`` over a comparison is several times faster than
    torch's boolean or float sums on CPU.
    """
    scores = sim.numpy()
    rows_np, cols_np = rows.numpy(), cols.numpy()
    n_gallery = scores.shape[1]
    out = np.empty(len(rows_np), dtype=np.int64)
    chunk = max(1, _QUERY_CHUNK_CELLS // n_gallery)
    positions = np.arange(n_gallery)
    for start in range(0, len(rows_np), chunk):
        r, c = rows_np[start : start + chunk], cols_np[start : start + chunk]
        block = scores[r]  # (p, G)
        score = block[np.arange(len(r)), c][:, None]
        higher = np.count_nonzero(block > score, axis=1)
        tied = np.flatnonzero(np.count_nonzero(block == score, axis=1) > 1)
        if len(tied):
            before = (block[tied] == score[tied]) & (positions[None, :] < c[tied, None])
            higher[tied] += np.count_nonzero(before, axis=1)
        out[start : start + chunk] = higher
    return torch.from_numpy(out)


def _label(pids: Any, index: int) -> str:
    try:
        value = pids[index]
        return str(value.item() if hasattr(value, "item") else value)
    except Exception:  # noqa: BLE001 - only for the error message
        return "?"


def k_reciprocal_rerank(
    query_features: Any, gallery_features: Any, *, k: int = 5, weight: float = 0.05
) -> torch.Tensor:
    """TextReID's re-ranking: sim(q, g) + weight · Jaccard(top-k(q), top-k(g)).

    top-k(q) are the k gallery items nearest the query; top-k(g) the k gallery items nearest
    gallery item g (itself included). Both sets live in the gallery, so their overlap says
    whether q and g share a neighbourhood. Features are L2-normalised here. Returns (Q, G).
    """
    q = torch.nn.functional.normalize(_as_tensor(query_features, "query_features").float(), dim=1)
    g = torch.nn.functional.normalize(
        _as_tensor(gallery_features, "gallery_features").float(), dim=1
    )
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"feature sizes differ: queries {q.shape[1]}, gallery {g.shape[1]}")
    if not 1 <= k <= g.shape[0]:
        raise ValueError(f"k = {k}: must be between 1 and the gallery size {g.shape[0]}")
    qg = q @ g.T
    gg = g @ g.T
    query_nn = _topk_indicator(qg, k)
    gallery_nn = _topk_indicator(gg, k)
    shared = query_nn @ gallery_nn.T  # (Q, G) sizes of the intersections
    jaccard = shared / (2 * k - shared)
    return qg + weight * jaccard


def _topk_indicator(similarity: torch.Tensor, k: int) -> torch.Tensor:
    """A 0/1 matrix marking each row's k largest entries (stable: ties keep column order)."""
    top = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :k]
    marks = torch.zeros_like(similarity)
    marks.scatter_(1, top, 1.0)
    return marks


# --------------------------------------------------------------------------------------------
# retrieve-then-rerank with a vision-language model (RAR)

RankerFn = Callable[[str, Sequence[Any]], str]
"""A vision-language ranker: (query text, candidate images) → the model's raw answer text.

The answer should list candidate numbers (1-based, as shown to the model) best first, e.g.
``"3, 1, 2"`` or ``"[3] > [1] > [2]"``. Engines in ``pedsynth.engines`` are adapted to this.
"""

RANKING_PROMPT = (
    "You are given a description of a person and {n} numbered images. Rank the images from the "
    "best to the worst match of the description. Answer with the image numbers only, best "
    "first, separated by commas.\nDescription: {query}"
)


@dataclass(frozen=True)
class ParsedRanking:
    """Candidate positions (0-based) in the order to use, and whether the answer parsed."""

    order: list[int]
    parsed: bool  # False: nothing usable in the answer, index order kept
    complete: bool  # True: the answer named every candidate


def parse_ranking(answer: str, n: int) -> ParsedRanking:
    """Read a ranking of ``n`` candidates out of free text.

    Numbers 1..n in order of appearance form the ranking (repeats and out-of-range numbers
    are ignored); candidates the answer leaves out follow in their index order. An answer
    with no usable number keeps the index order and counts as a parse failure.
    """
    named: list[int] = []
    for token in re.findall(r"\d+", answer if isinstance(answer, str) else ""):
        position = int(token) - 1
        if 0 <= position < n and position not in named:
            named.append(position)
    if not named:
        return ParsedRanking(list(range(n)), parsed=False, complete=False)
    rest = [i for i in range(n) if i not in named]
    return ParsedRanking(named + rest, parsed=True, complete=not rest)


def rerank_with_model(
    similarity: Any,
    query_texts: Sequence[str],
    gallery_images: Sequence[Any],
    ranker: RankerFn,
    *,
    top_k: int = 10,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Retrieve-then-rerank: the ranker reorders each query's top-k; the rest keep their order.

    Returns a new similarity matrix whose ordering is the reranked one (so
    :func:`rank_metrics` scores it) and stats: ``parse_failure_rate`` (answers with nothing
    usable, index order kept), ``partial_rate`` (answers that left candidates out) and
    ``error_rate`` (ranker calls that raised; index order kept too).
    """
    sim = _as_tensor(similarity, "similarity").float().clone()
    n_query, n_gallery = sim.shape
    if len(query_texts) != n_query or len(gallery_images) != n_gallery:
        raise ValueError(
            f"{len(query_texts)} query texts and {len(gallery_images)} gallery images for a "
            f"{tuple(sim.shape)} similarity matrix"
        )
    k = min(top_k, n_gallery)
    top = torch.argsort(sim, dim=1, descending=True, stable=True)[:, :k]
    failures = partial = errors = 0
    # Reranked items get scores above every other item, in the new order.
    ceiling = float(sim.max()) + 1.0
    for qi in range(n_query):
        candidates = top[qi].tolist()
        try:
            answer = ranker(query_texts[qi], [gallery_images[g] for g in candidates])
        except Exception:  # noqa: BLE001 - a failing model call must not stop the evaluation
            errors += 1
            answer = ""
        result = parse_ranking(answer, k)
        failures += not result.parsed
        partial += result.parsed and not result.complete
        for position, candidate in enumerate(result.order):
            sim[qi, candidates[candidate]] = ceiling + (k - position)
    stats = {
        "parse_failure_rate": failures / max(1, n_query),
        "partial_rate": partial / max(1, n_query),
        "error_rate": errors / max(1, n_query),
    }
    return sim, stats

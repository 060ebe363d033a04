"""Style prototypes learned from a dataset's own captions (HAM-style), as a caption template bank.

MLLM4Text-ReID's 46 templates were written once; HAM (CVPR'25) learns its style prompts from
human captions by clustering them and sampling prototypes uniformly over the clusters. Here:

1. **Structure.** Each caption's sentence pattern is :func:`pedsynth.lexicon.slot_template`
   (every attribute phrase replaced by its slot), rendered in the bank's own form
   (:func:`render_structure`): bracketed slot descriptions such as ``[person/woman/man]``,
   ``[upper clothing description]``, ``[hair description]``, so ``caption_template.txt`` and the
   ``template_leak`` check work unchanged. Captions without any slot give no template.
2. **Features.** TF-IDF of word 1-3-grams over the rendered pattern (a slot is one word,
   punctuation is kept), L2-normalised. Chosen over the sentence embedder on purpose: the slots
   have removed the content, and what is left to tell patterns apart is word order, function
   words and sentence breaks, which n-grams see directly and a meaning embedder is built to
   ignore; it also needs no model and is exact on any machine.
3. **Clusters.** Seeded k-means in numpy (greedy k-means++ starts, Lloyd steps, the best of
   four restarts) over the distinct patterns, each counted once so that the commonest
   patterns do not take most of the clusters, into ``n`` clusters (fewer when there are
   fewer distinct patterns: then each pattern is its own prototype).
4. **Prototypes.** One per cluster, uniformly over the clusters however large each is: the
   member nearest its centroid, ties broken by the pattern's text. Prototypes are listed by
   cluster size (largest first), then text, with ids ``p0001``, ``p0002``, ...

The same captions and seed give the same prototypes, byte for byte; the captions' order does
not matter (patterns are sorted before clustering).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pedsynth.atomic import atomic_write_bytes
from pedsynth.lexicon import slot_template

# lexicon slot -> the bank's bracketed description
SLOT_DESCRIPTIONS = {
    "gender": "person/woman/man",
    "pron": "he/she",
    "poss": "his/her",
    "obj": "him/her",
    "refl": "himself/herself",
    "hair_colour": "hair description",
    "hair_length": "hair description",
    "hair_style": "hair description",
    "upper_type": "upper clothing description",
    "upper_colour": "upper clothing description",
    "lower_type": "lower clothing description",
    "lower_colour": "lower clothing description",
    "clothes_colour": "clothing description",
    "shoes_type": "footwear description",
    "shoes_colour": "footwear description",
    "bag_type": "bag description",
    "bag_colour": "bag description",
    "hat_type": "headwear description",
    "hat_colour": "headwear description",
    "accessory": "accessory description",
    "colour": "colour",
}
# Descriptions that absorb a neighbour of the same description ("[hair description] hair").
_MERGING = frozenset(v for v in SLOT_DESCRIPTIONS.values() if v.endswith("description"))
_SLOT = re.compile(r"\{([a-z_]+)\}")
_BRACKETED = re.compile(r"\[([^\]]+)\]")
_SAME_GROUP_GAP = re.compile(r"^\s*$")
_HAIR_GAP = re.compile(r"^[\s,/-]*(?:(?:and|or)[\s,/-]*)?$", re.IGNORECASE)
_HAIR_WORD = re.compile(r"^\s*hair\b", re.IGNORECASE)
_SENTENCE_PRONOUN = re.compile(r"(^|[.!?]\s+)\[(he/she|his/her)\]")
_ARTICLE = re.compile(r"\b([Aa])n(\s+\[)")
_UNSAFE = re.compile(r"[{}\[\]<>]")  # characters of the slot syntax, removed from captions
_TOKEN = re.compile(r"\[[^\]]+\]|[a-z0-9]+(?:'[a-z]+)?|[.,;:!?]")
NGRAMS = (1, 2, 3)
METHOD = "lexicon slots -> TF-IDF word 1-3-grams -> seeded k-means -> member nearest centroid"


@dataclass(frozen=True)
class Prototype:
    id: str
    text: str  # the bank's form, with [bracketed] slots
    cluster_captions: int  # captions whose pattern fell in this prototype's cluster
    cluster_patterns: int  # distinct patterns in the cluster


# --------------------------------------------------------------------------- structure


def render_structure(structure: str) -> str:
    """A :func:`~pedsynth.lexicon.slot_template` pattern in the bank's bracketed form.

    Adjacent slots of one description become one (``{upper_colour} {upper_type}`` ->
    ``[upper clothing description]``; hair slots also across "and"/","), the word "hair" after
    a hair slot goes into it, and "an" before a slot becomes "a".
    """
    pieces: list[tuple[str, str]] = []  # (text before, description)
    last = 0
    for m in _SLOT.finditer(structure):
        gap = structure[last : m.start()]
        desc = SLOT_DESCRIPTIONS.get(m[1], m[1].replace("_", " "))
        if pieces and pieces[-1][1] == desc and desc in _MERGING:
            pattern = _HAIR_GAP if desc == "hair description" else _SAME_GROUP_GAP
            if pattern.match(gap):
                last = m.end()
                continue
        pieces.append((gap, desc))
        last = m.end()
    tail = structure[last:]
    out = []
    for i, (gap, desc) in enumerate(pieces):
        if i and pieces[i - 1][1] == "hair description":
            gap = _HAIR_WORD.sub("", gap, count=1)
        out.append(gap + f"[{desc}]")
    if pieces and pieces[-1][1] == "hair description":
        tail = _HAIR_WORD.sub("", tail, count=1)
    text = " ".join(("".join(out) + tail).split())
    text = re.sub(r"\s+([.,;:!?])", r"\1", _ARTICLE.sub(r"\1\2", text))
    text = _SENTENCE_PRONOUN.sub(lambda m: m[1] + "[" + m[2].title() + "]", text)
    return text[:1].upper() + text[1:] if text[:1].isalpha() else text


def caption_pattern(caption: str) -> str | None:
    """The bank-form template of one caption; None when it names no attribute at all."""
    cleaned = " ".join(_UNSAFE.sub(" ", caption).split())
    if not cleaned:
        return None
    text = render_structure(slot_template(cleaned))
    return text if "[" in text else None


# --------------------------------------------------------------------------- features


def _tokens(pattern: str) -> list[str]:
    return _TOKEN.findall(pattern.lower())


def tfidf(patterns: list[str], max_features: int = 1024) -> np.ndarray:
    """L2-normalised TF-IDF rows (float32) of word n-grams; features by document frequency,
    most frequent first, ties by the n-gram; smooth idf ``ln((1+N)/(1+df)) + 1``."""
    grams = []
    for p in patterns:
        toks = _tokens(p)
        grams.append(
            Counter(" ".join(toks[i : i + n]) for n in NGRAMS for i in range(len(toks) - n + 1))
        )
    df: Counter[str] = Counter()
    for g in grams:
        df.update(g.keys())
    vocab = sorted(df, key=lambda g: (-df[g], g))[:max_features]
    index = {g: j for j, g in enumerate(vocab)}
    idf = np.array([np.log((1 + len(patterns)) / (1 + df[g])) + 1 for g in vocab], np.float32)
    x = np.zeros((len(patterns), len(vocab)), np.float32)
    for i, g in enumerate(grams):
        for gram, count in g.items():
            j = index.get(gram)
            if j is not None:
                x[i, j] = count
    x *= idf
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


# --------------------------------------------------------------------------- k-means


def _sq_dist(x: np.ndarray, c: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Squared distances of every row of ``x`` to every row of ``c``, in row chunks."""
    cc = (c * c).sum(1)
    out = np.empty((len(x), len(c)), np.float32)
    for s in range(0, len(x), chunk):
        xs = x[s : s + chunk]
        out[s : s + chunk] = (xs * xs).sum(1, keepdims=True) + cc - 2 * xs @ c.T
    return np.maximum(out, 0)


def kmeans(
    x: np.ndarray,
    k: int,
    weights: np.ndarray,
    *,
    seed: int,
    restarts: int = 4,
    iterations: int = 50,
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted k-means: (labels, centroids) of the best of ``restarts`` runs (lowest weighted
    inertia, the earlier run on a tie), each from a greedy k-means++ start: every new centre is
    the best (lowest potential) of ``2 + ln k`` candidates drawn by D² weighting, as
    scikit-learn does. All randomness comes from ``seed``."""
    rng = np.random.default_rng(seed)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for _ in range(restarts):
        labels, centres = _lloyd(x, _kmeans_pp(x, k, weights, rng), weights, iterations)
        d = _sq_dist(x, centres)[np.arange(len(x)), labels]
        inertia = float(np.round((weights * d).sum(), 6))
        if best is None or inertia < best[0]:
            best = (inertia, labels, centres)
    return best[1], best[2]


def _kmeans_pp(x: np.ndarray, k: int, weights: np.ndarray, rng: np.random.Generator) -> list:
    n = len(x)
    w = weights.astype(np.float64)
    trials = 2 + int(np.log(k))
    first = int(rng.choice(n, p=w / w.sum()))
    centres = [first]
    closest = _sq_dist(x, x[[first]])[:, 0].astype(np.float64)
    for _ in range(1, k):
        p = w * closest
        total = p.sum()
        if total <= 0:  # every point sits on a centre: take the lowest unused index
            taken = set(centres)
            centres.append(next(i for i in range(n) if i not in taken))
            continue
        candidates = rng.choice(n, size=trials, p=p / total)
        d = np.minimum(closest[:, None], _sq_dist(x, x[candidates]))
        pick = int(np.argmin((w[:, None] * d).sum(0)))
        centres.append(int(candidates[pick]))
        closest = d[:, pick]
    return centres


def _lloyd(
    x: np.ndarray, centres: list, weights: np.ndarray, iterations: int
) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd steps until no label changes; an emptied cluster restarts at the point farthest
    from its centroid."""
    n, w = len(x), weights.astype(np.float64)
    c = x[centres].copy()
    labels = np.full(n, -1)
    for _ in range(iterations):
        d = _sq_dist(x, c)
        new = d.argmin(1)
        if np.array_equal(new, labels):
            break
        labels = new
        for j in range(len(c)):
            members = labels == j
            if not members.any():
                far = int(np.argsort(-d[np.arange(n), labels], kind="stable")[0])
                labels[far] = j
                members = labels == j
            c[j] = (x[members] * w[members, None]).sum(0) / w[members].sum()
    return labels, c


# --------------------------------------------------------------------------- prototypes


def learn_prototypes(
    captions: Iterable[str | None], *, n: int = 1000, seed: int = 0, max_features: int = 1024
) -> tuple[list[Prototype], dict[str, int]]:
    """Up to ``n`` prototypes from ``captions`` (module docstring), and counts: ``captions``
    read, ``patterned`` (captions with a slot), ``patterns`` (distinct), ``clusters``."""
    if n < 1:
        raise ValueError("n must be at least 1")
    counts: Counter[str] = Counter()
    read = 0
    for caption in captions:
        if not caption or not caption.strip():
            continue
        read += 1
        pattern = caption_pattern(caption)
        if pattern is not None:
            counts[pattern] += 1
    patterns = sorted(counts)
    stats = {"captions": read, "patterned": sum(counts.values()), "patterns": len(patterns)}
    if not patterns:
        return [], stats | {"clusters": 0}
    weights = np.array([counts[p] for p in patterns], np.float64)
    k = min(n, len(patterns))
    if k == len(patterns):
        labels, reps = np.arange(k), list(range(k))
    else:
        x = tfidf(patterns, max_features)
        labels, centroids = kmeans(x, k, np.ones(len(patterns)), seed=seed)
        d = _sq_dist(x, centroids)[np.arange(len(x)), labels]
        reps = []
        for j in range(k):
            members = np.flatnonzero(labels == j)
            # patterns are sorted, so among equal distances the first member is the smallest
            reps.append(int(members[np.argmin(np.round(d[members], 6))]))
    clusters = []
    for j, rep in enumerate(reps):
        members = labels == j
        clusters.append((int(weights[members].sum()), int(members.sum()), patterns[rep]))
    clusters.sort(key=lambda c: (-c[0], c[2]))
    protos = [
        Prototype(f"p{i + 1:04d}", text, size, distinct)
        for i, (size, distinct, text) in enumerate(clusters)
    ]
    return protos, stats | {"clusters": k}


def template_file_text(prototypes: list[Prototype], provenance: Mapping[str, Any]) -> str:
    """A template file in ``templates.yaml``'s format, with a ``provenance`` mapping."""
    head = (
        "# Sentence-pattern prototypes learned from human captions (pedsynth learn-templates).\n"
        "# Use with caption.templates: <this file>. Slots are in square brackets.\n"
    )
    body = {
        "provenance": dict(provenance),
        "templates": [
            {"id": p.id, "text": p.text, "cluster_captions": p.cluster_captions} for p in prototypes
        ],
    }
    return head + yaml.safe_dump(body, sort_keys=False, allow_unicode=True, width=1000)


def learn_templates(source: str, out: str | Path, *, n: int = 1000, seed: int = 0) -> dict:
    """``pedsynth learn-templates``: prototypes from the train-split captions of ``source``
    (``FORMAT:PATH``, read with the catalogue reader) written to ``out``; returns a summary."""
    from pedsynth.prompts import load_templates
    from pedsynth.schemas.config import ConfigError, SourceConfig
    from pedsynth.tasks.readers import read_catalog

    catalog, _ = read_catalog(SourceConfig.parse(source))
    train = [
        c
        for split, caps in zip(
            catalog["split"].to_pylist(), catalog["captions"].to_pylist(), strict=True
        )
        if split == "train"
        for c in caps or []
        if isinstance(c, str)
    ]
    prototypes, stats = learn_prototypes(train, n=n, seed=seed)
    if not prototypes:
        raise ConfigError(f"{source}: no train-split caption names an attribute; nothing learned")
    provenance = {"source": source, "split": "train", "n": n, "seed": seed, **stats}
    provenance["method"] = METHOD
    atomic_write_bytes(template_file_text(prototypes, provenance).encode("utf-8"), out)
    bank = load_templates(out)  # what the caption stage will read
    return {"out": str(out), "templates": len(bank), "hash": bank.hash, **provenance}

"""Caption diversity: how many ways a set of captions says things, to compare caption sources.

Words are :func:`pedsynth.tasks.card_stats.caption_words` (lower-cased ``\\w+`` runs,
punctuation dropped), the same words the card's other caption statistics count.

- **distinct openings**: distinct first-three-word openings over the number of captions.
- **type/token ratio over a fixed-size sample** (:func:`sampled_ttr`): TTR falls as a text
  grows, so raw TTRs of sets of different sizes do not compare. The captions are put in a
  seeded order, their words concatenated and cut into consecutive windows of ``window`` words
  (1,000 by default; a trailing part window is dropped); the value is the mean TTR of the
  windows (mean segmental TTR). A set with fewer than ``window`` words gives the TTR of all its
  words, and ``windows`` = 0 says so.
- **Self-BLEU** (:func:`self_bleu`): the mean, over the captions of a seeded sample, of the
  sentence BLEU-4 of each caption against all the other sampled captions as references
  (clipped n-gram precisions for n = 1..4, geometric mean, brevity penalty from the closest
  reference length). No smoothing: a caption that shares no 4-gram with any other scores 0.
  Identical captions give 1, captions with disjoint vocabularies 0; lower is more diverse.
- **templates used**: distinct ``template_id`` values.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from pedsynth.tasks.card_stats import caption_words

TTR_WINDOW = 1000
BLEU_SAMPLE = 500
MAX_N = 4


def distinct_openings(captions: Sequence[str]) -> float:
    if not captions:
        return 0.0
    return len({" ".join(caption_words(c)[:3]) for c in captions}) / len(captions)


def _seeded_order(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).permutation(n).tolist()


def sampled_ttr(
    captions: Sequence[str], *, window: int = TTR_WINDOW, seed: int = 0
) -> tuple[float, int]:
    """(mean TTR over full ``window``-word windows, number of windows); module docstring."""
    words: list[str] = []
    for i in _seeded_order(len(captions), seed):
        words.extend(caption_words(captions[i]))
    full = len(words) // window
    if full == 0:
        return (len(set(words)) / len(words) if words else 0.0), 0
    ratios = [len(set(words[w * window : (w + 1) * window])) / window for w in range(full)]
    return sum(ratios) / full, full


def _ngrams(words: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def self_bleu(captions: Sequence[str], *, sample: int = BLEU_SAMPLE, seed: int = 0) -> float:
    """Mean BLEU-4 of each sampled caption against the other sampled ones (module docstring).

    For each n-gram the two largest counts over the sample (and whose they are) are kept, so a
    hypothesis's clip count against "all other captions" is read without a pass over them.
    """
    order = _seeded_order(len(captions), seed)[:sample]
    texts = [caption_words(captions[i]) for i in sorted(order)]
    texts = [t for t in texts if t]
    if len(texts) < 2:
        return 0.0
    counts = [[_ngrams(t, n) for n in range(1, MAX_N + 1)] for t in texts]
    # n-gram -> [(count, owner), (count, owner)]: the two largest counts in the sample
    top: list[dict[tuple[str, ...], list[tuple[int, int]]]] = [{} for _ in range(MAX_N)]
    for owner, per_n in enumerate(counts):
        for n, grams in enumerate(per_n):
            for gram, c in grams.items():
                best = top[n].setdefault(gram, [])
                best.append((c, owner))
                best.sort(reverse=True)
                del best[2:]
    lengths = np.array([len(t) for t in texts])
    scores = []
    for i, per_n in enumerate(counts):
        log_p = 0.0
        for n, grams in enumerate(per_n):
            total = sum(grams.values())
            clipped = 0
            for gram, c in grams.items():
                other = next((cnt for cnt, owner in top[n][gram] if owner != i), 0)
                clipped += min(c, other)
            if total == 0 or clipped == 0:
                log_p = -math.inf
                break
            log_p += math.log(clipped / total) / MAX_N
        if log_p == -math.inf:
            scores.append(0.0)
            continue
        others = np.delete(lengths, i)
        c = len(texts[i])
        gaps = np.abs(others - c)
        r = int(others[gaps == gaps.min()].min())  # closest reference length, ties: shorter
        bp = 1.0 if c > r else math.exp(1 - r / c)
        scores.append(bp * math.exp(log_p))
    return float(sum(scores) / len(scores))


@dataclass
class DiversitySample:
    """A bounded, seeded sample of a caption stream, the same whatever the batch sizes: each
    caption gets a key from (seed, its position in the stream) and the ``size`` smallest keys
    are kept. Also counts captions and distinct openings and templates over the whole stream."""

    size: int = 2000
    seed: int = 0
    count: int = 0
    openings: set[str] = field(default_factory=set)
    templates: set[str] = field(default_factory=set)
    _heap: list[tuple[int, int, str]] = field(default_factory=list)  # (-key, position, caption)

    def add(self, caption: str, template_id: str | None = None) -> None:
        position = self.count
        self.count += 1
        self.openings.add(" ".join(caption_words(caption)[:3]))
        if template_id:
            self.templates.add(template_id)
        digest = hashlib.blake2b(f"{self.seed}:{position}".encode(), digest_size=8).digest()
        item = (-int.from_bytes(digest, "big"), position, caption)
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, item)
        elif item > self._heap[0]:
            heapq.heapreplace(self._heap, item)

    @property
    def captions(self) -> list[str]:
        return [c for _, _, c in sorted(self._heap, key=lambda t: t[1])]

    def summary(self, *, window: int = TTR_WINDOW, bleu_sample: int = BLEU_SAMPLE) -> dict:
        caps = self.captions
        ttr, windows = sampled_ttr(caps, window=window, seed=self.seed)
        return {
            "captions": self.count,
            "distinct_openings": len(self.openings) / self.count if self.count else 0.0,
            "ttr": ttr,
            "ttr_windows": windows,
            "self_bleu": self_bleu(caps, sample=bleu_sample, seed=self.seed),
            "bleu_sample": min(bleu_sample, len(caps)),
            "templates_used": len(self.templates),
        }


def caption_diversity(
    captions: Iterable[str],
    template_ids: Iterable[str | None] | None = None,
    *,
    seed: int = 0,
    window: int = TTR_WINDOW,
    bleu_sample: int = BLEU_SAMPLE,
) -> dict:
    """All four measures of one caption set (``template_ids`` aligned with ``captions``)."""
    caps = list(captions)
    tids = list(template_ids) if template_ids is not None else [None] * len(caps)
    acc = DiversitySample(size=max(len(caps), 1), seed=seed)
    for c, t in zip(caps, tids, strict=True):
        acc.add(c, t)
    return acc.summary(window=window, bleu_sample=bleu_sample)

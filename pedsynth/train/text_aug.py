"""Text-side training methods: BSS caption sampling (LLM-DA) and NAM masking (MLLM4Text-ReID).

Both draw from an explicit ``numpy.random.Generator`` so a sample's text depends only on the
seed, epoch and sample index: the same run gives the same batches whatever the worker count.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# open_clip's vocabulary has no mask token. IRRA gives up the last BPE merge for `<|mask|>`;
# we use that same id (the rarest merge), so SOT (49406) and EOT (49407) keep their ids and
# open_clip's end-of-text pooling (argmax over ids) is unaffected.
CLIP_MASK_TOKEN = 49405
CLIP_FIRST_SPECIAL = 49406  # SOT; EOT is 49407; ids below this are ordinary tokens


def choose_caption(
    original: Sequence[str], augmented: Sequence[str], beta: float, rng: np.random.Generator
) -> tuple[str, bool]:
    """BSS: an augmented caption with probability ``beta`` (when there is one), else an original.

    Returns (caption, used_augmented). A sample without originals uses an augmented caption.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta = {beta}: must be in [0, 1]")
    if not original and not augmented:
        raise ValueError("a sample needs at least one caption")
    use_augmented = bool(augmented) and (not original or rng.random() < beta)
    pool = augmented if use_augmented else original
    return pool[int(rng.integers(len(pool)))], use_augmented


def nam_probabilities(noise: np.ndarray | None, length: int, p: float = 0.15) -> np.ndarray:
    """Per-token mask probabilities r' = clip(r − mean(r) + p, 0, 1); constant p without r.

    ``noise`` r must hold one level per text token (SOS/EOS excluded); a length mismatch
    (another tokenizer wrote it, or truncation) falls back to the constant rate for the
    tokens the levels do not cover.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p = {p}: must be in [0, 1]")
    if noise is None or len(noise) == 0:
        return np.full(length, p, dtype=np.float64)
    r = np.asarray(noise, dtype=np.float64)[:length]
    if not np.isfinite(r).all():
        return np.full(length, p, dtype=np.float64)
    shifted = np.clip(r - r.mean() + p, 0.0, 1.0)
    if len(shifted) < length:
        shifted = np.concatenate([shifted, np.full(length - len(shifted), p)])
    return shifted


def nam_mask(
    token_ids: np.ndarray,
    probabilities: np.ndarray,
    rng: np.random.Generator,
    *,
    mask_token: int = CLIP_MASK_TOKEN,
    vocab_size: int = CLIP_FIRST_SPECIAL,
    random_ids: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """BERT-style corruption of text tokens (no SOS/EOS/padding in ``token_ids``).

    Each token is selected with its own probability; a selected token becomes the mask token
    80% of the time, a random ordinary token 10% (drawn from ``random_ids`` = [low, high),
    by default [1, vocab_size − 1)), and stays itself 10%. Returns (new ids, selected mask).
    """
    low, high = random_ids or (1, vocab_size - 1)
    ids = np.asarray(token_ids).copy()
    selected = rng.random(len(ids)) < np.asarray(probabilities)[: len(ids)]
    action = rng.random(len(ids))
    to_mask = selected & (action < 0.8)
    to_random = selected & (action >= 0.8) & (action < 0.9)
    ids[to_mask] = mask_token
    ids[to_random] = rng.integers(low, high, size=int(to_random.sum()))
    return ids, selected

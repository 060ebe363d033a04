"""Text→image retrieval (and image→image re-identification) of a dual encoder on one split.

Queries are the split's original captions, the gallery its distinct images, preprocessed by the
shared person-crop definition (:func:`pedsynth.train.transforms.eval_transform`). Metrics are
IRRA's (:func:`~pedsynth.train.metrics.rank_metrics`), optionally after k-reciprocal re-ranking
and after a vision-language re-ranker (RAR).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from pedsynth.train.data import DataError, ImageReader, SplitIndex, decode_image
from pedsynth.train.datasets import GalleryDataset, tokenize_all
from pedsynth.train.metrics import (
    RankerFn,
    image_to_image_metrics,
    k_reciprocal_rerank,
    rank_metrics,
    rerank_with_model,
)
from pedsynth.train.model import DualEncoder


class LazyGallery:
    """Gallery images decoded on access, for a vision-language re-ranker."""

    def __init__(self, index: SplitIndex) -> None:
        self.index, self.reader = index, ImageReader()

    def __len__(self) -> int:
        return len(self.index.image_ids)

    def __getitem__(self, i: int) -> Any:
        return decode_image(self.reader.read(self.index.image_refs[i]), self.index.image_ids[i])


@torch.no_grad()
def encode_split(
    model: DualEncoder,
    index: SplitIndex,
    tokenizer: Any,
    *,
    image_size: tuple[int, int],
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    resize_mode: str = "pad",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Normalised (query text features, gallery image features, query caption indices)."""
    model.eval()
    queries = index.query_captions()
    tokens = tokenize_all(tokenizer, [index.captions[c] for c in queries])
    text = torch.cat(
        [
            model.encode_text(tokens[i : i + batch_size].to(device)).float()
            for i in range(0, len(tokens), batch_size)
        ]
    )
    gallery = GalleryDataset(index, image_size, resize_mode=resize_mode, mean=mean, std=std)
    loader = DataLoader(gallery, batch_size=batch_size, num_workers=num_workers)
    images = torch.cat([model.encode_image(b.to(device)).float() for b in loader])
    return (
        torch.nn.functional.normalize(text, dim=1).cpu(),
        torch.nn.functional.normalize(images, dim=1).cpu(),
        queries,
    )


def evaluate(
    model: DualEncoder,
    index: SplitIndex,
    tokenizer: Any,
    *,
    image_size: tuple[int, int],
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    resize_mode: str = "pad",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    rerank_k: int | None = None,
    rerank_weight: float = 0.05,
    ranker: RankerFn | None = None,
    ranker_top_k: int = 10,
    i2i: bool = False,
) -> dict[str, float]:
    """Text→image retrieval metrics on one split (R1, R5, R10, mAP, mINP in percent).

    With ``rerank_k``, also ``rerank_*`` metrics after k-reciprocal re-ranking. With
    ``ranker`` (a vision-language model behind :data:`~pedsynth.train.metrics.RankerFn`),
    also ``rar_*`` metrics after it reorders each query's top ``ranker_top_k``, plus its
    ``rar_parse_failure_rate``. With ``i2i``, also ``i2i_*`` metrics of image→image
    re-identification on the same gallery features
    (:func:`~pedsynth.train.metrics.image_to_image_metrics`: each image against the split's
    other images; pedsynth data has no camera ids, so only the query image itself is left out),
    with ``i2i_queries``; skipped when no identity has two images.
    """
    if not index.image_ids:
        raise DataError(f"split {index.name!r} is empty: nothing to evaluate")
    text, images, queries = encode_split(
        model,
        index,
        tokenizer,
        image_size=image_size,
        batch_size=batch_size,
        device=torch.device(device),
        resize_mode=resize_mode,
        mean=mean,
        std=std,
    )
    query_pids = [index.image_person[index.caption_image[c]] for c in queries]
    gallery_pids = index.image_person
    similarity = text @ images.T
    result = rank_metrics(similarity, query_pids, gallery_pids)
    if i2i and len(set(gallery_pids)) < len(gallery_pids):
        reid = image_to_image_metrics(images, gallery_pids)
        result |= {f"i2i_{n}": v for n, v in reid.items() if n != "gallery"}
    if rerank_k is not None:
        k = min(rerank_k, len(gallery_pids))
        reranked = k_reciprocal_rerank(text, images, k=k, weight=rerank_weight)
        result |= {
            f"rerank_{n}": v for n, v in rank_metrics(reranked, query_pids, gallery_pids).items()
        }
    if ranker is not None:
        texts = [index.captions[c] for c in queries]
        new, stats = rerank_with_model(
            similarity, texts, LazyGallery(index), ranker, top_k=ranker_top_k
        )
        result |= {f"rar_{n}": v for n, v in rank_metrics(new, query_pids, gallery_pids).items()}
        result |= {f"rar_{n}": v for n, v in stats.items()}
    return result

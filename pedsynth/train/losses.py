"""Training losses of the retriever, as plain functions over tensors.

- :func:`sdm_loss` — IRRA's similarity distribution matching.
- :func:`id_loss` — identity classification on both modalities with one shared classifier.
- :func:`cm_moco_loss` and :class:`MomentumQueues` — TextReID's cross-modal momentum contrast.
- :func:`batch_hard_triplet_loss` — the re-identification triplet loss on image features
  (with an identity loss on the image features alone: MLLMReID's ReID objective).
- :func:`weighted_losses` — the losses a config turns on, weighted, for one batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pedsynth.schemas.train import LossConfig


def sdm_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    person_ids: torch.Tensor,
    *,
    tau: float = 0.02,
    epsilon: float = 1e-8,
) -> torch.Tensor:
    """KL(softmax(cos/τ) ‖ identity-label distribution), image→text plus text→image (IRRA).

    The label distribution of a row spreads evenly over the batch items of the same identity,
    so several images or captions of one person in a batch are all positives.
    """
    image = F.normalize(image_features, dim=1)
    text = F.normalize(text_features, dim=1)
    pids = person_ids.reshape(-1, 1)
    labels = (pids == pids.T).float()
    label_distribution = labels / labels.sum(dim=1, keepdim=True)
    t2i = text @ image.T / tau
    i2t = t2i.T
    log_labels = torch.log(label_distribution + epsilon)
    i2t_loss = F.softmax(i2t, dim=1) * (F.log_softmax(i2t, dim=1) - log_labels)
    t2i_loss = F.softmax(t2i, dim=1) * (F.log_softmax(t2i, dim=1) - log_labels)
    return i2t_loss.sum(dim=1).mean() + t2i_loss.sum(dim=1).mean()


def id_loss(
    image_logits: torch.Tensor, text_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the shared identity classifier on image and on text features (IRRA)."""
    return F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)


def _contrast(
    queries: torch.Tensor,
    positive_keys: torch.Tensor,
    queue: torch.Tensor,
    queue_ids: torch.Tensor,
    ids: torch.Tensor,
    tau: float,
) -> torch.Tensor:
    """InfoNCE: each query against its own key and the queue minus its identity's entries."""
    positive = (queries * positive_keys).sum(dim=1, keepdim=True)
    negatives = queries @ queue.T
    same_identity = ids.reshape(-1, 1) == queue_ids.reshape(1, -1)
    negatives = negatives.masked_fill(same_identity, float("-inf"))
    logits = torch.cat([positive, negatives], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(queries), dtype=torch.long, device=ids.device))


def cm_moco_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    momentum_image_features: torch.Tensor,
    momentum_text_features: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    queue_ids: torch.Tensor,
    person_ids: torch.Tensor,
    *,
    tau: float = 0.07,
) -> torch.Tensor:
    """Cross-modal momentum contrast (TextReID): text queries against momentum image keys and
    the image queue, image queries against momentum text keys and the text queue.

    Queue entries of the query's own identity are removed from its negatives (they are not
    negatives). Queue slots never filled carry id -1 and zero features: they are masked out
    through ``queue_ids`` by :class:`MomentumQueues` (only filled slots are passed).
    """
    image = F.normalize(image_features, dim=1)
    text = F.normalize(text_features, dim=1)
    m_image = F.normalize(momentum_image_features, dim=1)
    m_text = F.normalize(momentum_text_features, dim=1)
    t2i = _contrast(text, m_image, image_queue, queue_ids, person_ids, tau)
    i2t = _contrast(image, m_text, text_queue, queue_ids, person_ids, tau)
    return t2i + i2t


def batch_hard_triplet_loss(
    features: torch.Tensor, person_ids: torch.Tensor, *, margin: float = 0.3
) -> torch.Tensor:
    """Batch-hard triplet loss (Hermans et al. 2017) on L2-normalised features.

    For each anchor: its farthest positive (same identity, itself excluded) and nearest
    negative, by Euclidean distance; loss = mean of max(0, d(a, p) − d(a, n) + margin) over
    the anchors that have both. A batch with no such anchor gives 0 (still in the graph).
    """
    f = F.normalize(features.float(), dim=1)
    squared = (f.pow(2).sum(1, keepdim=True) + f.pow(2).sum(1) - 2 * f @ f.T).clamp(min=1e-12)
    distance = squared.sqrt()
    ids = person_ids.reshape(-1, 1)
    same = ids == ids.T
    eye = torch.eye(len(ids), dtype=torch.bool, device=f.device)
    positive = same & ~eye
    negative = ~same
    usable = positive.any(1) & negative.any(1)
    if not bool(usable.any()):
        return f.sum() * 0.0
    hardest_positive = distance.masked_fill(~positive, float("-inf")).max(1).values
    hardest_negative = distance.masked_fill(~negative, float("inf")).min(1).values
    losses = F.relu(hardest_positive - hardest_negative + margin)
    return losses[usable].mean()


class MomentumQueues(nn.Module):
    """Feature and identity queues of CM-MoCo, kept as buffers so they live in checkpoints."""

    def __init__(self, dim: int, size: int = 2048) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("image_queue", torch.zeros(size, dim))
        self.register_buffer("text_queue", torch.zeros(size, dim))
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    def current(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image queue, text queue, ids) of the filled slots only."""
        n = int(self.filled)
        return self.image_queue[:n], self.text_queue[:n], self.ids[:n]

    @torch.no_grad()
    def push(self, image: torch.Tensor, text: torch.Tensor, ids: torch.Tensor) -> None:
        """Enqueue a batch of momentum features (normalised), overwriting the oldest entries."""
        n = len(ids)
        if n > self.size:
            image, text, ids, n = (
                image[-self.size :],
                text[-self.size :],
                ids[-self.size :],
                self.size,
            )
        start = int(self.pointer)
        slots = (torch.arange(n, device=ids.device) + start) % self.size
        self.image_queue[slots] = F.normalize(image.float(), dim=1)
        self.text_queue[slots] = F.normalize(text.float(), dim=1)
        self.ids[slots] = ids
        self.pointer.fill_((start + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))


@torch.no_grad()
def momentum_update(online: nn.Module, momentum: nn.Module, m: float = 0.999) -> None:
    """θ_momentum ← m·θ_momentum + (1 − m)·θ_online, parameter by parameter."""
    for p_online, p_momentum in zip(online.parameters(), momentum.parameters(), strict=True):
        p_momentum.mul_(m).add_(p_online.detach(), alpha=1 - m)


def weighted_losses(
    cfg: LossConfig,
    classifier: Callable[[torch.Tensor], torch.Tensor],
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    labels: torch.Tensor,
    keys: tuple[torch.Tensor, torch.Tensor] | None = None,
    queues: MomentumQueues | None = None,
) -> dict[str, torch.Tensor]:
    """The enabled losses of one batch, each already weighted. ``classifier`` is the shared
    identity head; ``keys`` are the momentum encoder's (image, text) features of the same
    batch, used by CM-MoCo with ``queues`` (enqueued by the caller after backward)."""
    image_feats, text_feats = image_feats.float(), text_feats.float()
    parts: dict[str, torch.Tensor] = {}
    if cfg.sdm:
        parts["sdm"] = sdm_loss(image_feats, text_feats, labels, tau=cfg.sdm_tau)
    if cfg.id:
        parts["id"] = cfg.id_weight * id_loss(
            classifier(image_feats), classifier(text_feats), labels
        )
    if cfg.image_id:
        parts["image_id"] = cfg.image_id_weight * F.cross_entropy(classifier(image_feats), labels)
    if cfg.image_triplet:
        parts["image_triplet"] = cfg.triplet_weight * batch_hard_triplet_loss(
            image_feats, labels, margin=cfg.triplet_margin
        )
    if keys is not None and queues is not None:
        image_queue, text_queue, queue_ids = queues.current()
        parts["cm_moco"] = cfg.moco_weight * cm_moco_loss(
            image_feats,
            text_feats,
            keys[0].float(),
            keys[1].float(),
            image_queue,
            text_queue,
            queue_ids,
            labels,
            tau=cfg.moco_tau,
        )
    return parts

"""The optimiser and its schedule (IRRA's): Adam over four parameter groups, a pure ``get_lr``.

Groups split the parameters two ways: new layers (the identity classifier) learn at
``head_lr_factor`` × the rate, and only matrices (``ndim >= 2``) get weight decay — biases,
norms and embeddings' scales do not. Each group carries its ``lr_factor`` so the loop sets every
group's rate from one ``get_lr(step)``.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch

from pedsynth.schemas.train import OptimConfig
from pedsynth.train.model import DualEncoder


def get_lr(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    warmup_factor: float = 0.1,
    min_lr: float = 0.0,
) -> float:
    """Learning rate at optimiser step ``step``: linear warm-up from ``warmup_factor·base_lr``
    to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return base_lr * (warmup_factor + (1 - warmup_factor) * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model: DualEncoder, cfg: OptimConfig) -> torch.optim.Adam:
    """Adam over (head or backbone) × (decayed or not) groups of the trainable parameters."""
    head_ids = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in head_ids, p.ndim >= 2)].append(p)
    return torch.optim.Adam(
        [
            {
                "params": params,
                "lr_factor": cfg.head_lr_factor if head else 1.0,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            for (head, decay), params in sorted(groups.items())
        ],
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Give every group ``lr`` × its ``lr_factor``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_factor"]


def base_lr_of(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's current rate (the first group's rate without its factor)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group["lr_factor"]

"""The trainer: one flat loop in the style of nanoGPT.

``train(cfg)`` builds data, model and optimiser (:func:`prepare`), resumes from
``OUT/checkpoints/last.*`` when there is one, runs epochs (:func:`train_epoch`), evaluates on
**val** after each (the best checkpoint is chosen on val, never on test), and ends by scoring
the best checkpoint on val and test into ``metrics.json``, with what training drew from the
shards (stored noise levels, hard negatives, augmented captions).

Data order and augmentation are keyed by (seed, epoch, sample), so a run resumed at an epoch
boundary computes exactly what an uninterrupted run computes. Checkpoints are in
:mod:`~pedsynth.train.checkpoint`, evaluation in :mod:`~pedsynth.train.evaluate`, the optimiser
and its schedule in :mod:`~pedsynth.train.optim`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pedsynth.atomic import atomic_write_bytes
from pedsynth.engines.clip_preprocess import mean_std_of
from pedsynth.engines.device import resolve_device
from pedsynth.schemas.config import ConfigError
from pedsynth.schemas.train import TrainConfig
from pedsynth.train import losses
from pedsynth.train.checkpoint import (
    load_module_tensors,
    load_trained_model,
    module_tensors,
    optimizer_tensors,
    read_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from pedsynth.train.data import DataError, SplitIndex, load_split
from pedsynth.train.datasets import BlockShuffleBatchSampler, DrawCounts, TrainDataset
from pedsynth.train.evaluate import evaluate
from pedsynth.train.metrics import RankerFn
from pedsynth.train.model import DualEncoder, MomentumEncoder, create_clip, image_size_of
from pedsynth.train.optim import base_lr_of, build_optimizer, get_lr, set_lr
from pedsynth.train.text_stream import WordTokenizer, build_text_stream

__all__ = ["Run", "load_trained_model", "prepare", "train", "train_epoch"]

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict[str, Any]], None]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _config_key(cfg: TrainConfig) -> dict:
    """What must match for a run folder to be resumed (everything but where it runs)."""
    return cfg.model_dump(mode="json", exclude={"num_workers", "threads", "out"})


@dataclass
class Run:
    """Everything one training run holds: built by :func:`prepare`, advanced by
    :func:`train_epoch` (``epoch`` is the next epoch to run)."""

    cfg: TrainConfig
    device: torch.device
    run_dir: Path
    model: DualEncoder
    momentum: MomentumEncoder | None
    queues: losses.MomentumQueues | None
    optimizer: torch.optim.Optimizer
    tokenizer: Any
    eval_kwargs: dict[str, Any]
    train_index: SplitIndex
    val_index: SplitIndex
    test_index: SplitIndex
    identities: list[str]
    train_rejects: int
    sampler: BlockShuffleBatchSampler
    loader: DataLoader
    total_steps: int
    warmup_steps: int
    epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)
    draws: dict[str, int] = field(default_factory=dict)

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def modules(self) -> dict[str, torch.nn.Module | None]:
        return {"model": self.model, "momentum": self.momentum, "queues": self.queues}


def prepare(cfg: TrainConfig) -> Run:
    """Index the data, build model, optimiser and loader, and resume from ``last`` if present."""
    if cfg.data is None:
        raise ConfigError("data: not set; give --data OUT (a pedsynth build) or FORMAT:PATH")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)

    train_index, train_rejects = load_split(cfg.data, "train")
    if not train_index.samples:
        raise DataError(f"{cfg.data}: the train split has no captioned images")
    val_index, _ = load_split(cfg.data, "val")
    test_index, _ = load_split(cfg.data, "test")
    identities = train_index.persons
    labels = {p: i for i, p in enumerate(identities)}

    clip, tokenizer = create_clip(cfg.model, device)
    image_size = tuple(cfg.model.image_size or image_size_of(clip))
    mean, std = mean_std_of(clip)
    text_stream = None
    if cfg.model.text_stream == "bigru":
        # TextReID: the word dictionary is built once here, from every training caption;
        # from now on texts are word ids of the stream's own tokenizer.
        text_stream, tokenizer = build_text_stream(clip, tokenizer, train_index.captions, cfg.model)
    model = DualEncoder(clip, len(identities), text_stream).to(device)
    momentum = queues = None
    if cfg.loss.cm_moco:
        momentum = MomentumEncoder(model.clip, model.text_stream).to(device)
        queues = losses.MomentumQueues(clip.visual.output_dim, cfg.loss.moco_queue).to(device)
    optimizer = build_optimizer(model, cfg.optim)

    dataset = TrainDataset(
        train_index,
        tokenizer,
        image_size=image_size,
        seed=cfg.seed,
        labels=labels,
        augment_cfg=cfg.augment,
        text_cfg=cfg.text,
        resize_mode=cfg.model.resize_mode,
        mean=mean,
        std=std,
    )
    sampler = BlockShuffleBatchSampler(
        train_index,
        cfg.batch_size,
        seed=cfg.seed,
        shuffle_blocks=cfg.shuffle_blocks,
        hard_negative_fraction=cfg.text.hard_negative_fraction if cfg.text.hard_negatives else 0,
    )
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=cfg.num_workers,
        persistent_workers=cfg.num_workers > 0,
        # spawn, not fork: the flow runs with Prefect's threads alive, and forking a threaded
        # process can deadlock.
        multiprocessing_context="spawn" if cfg.num_workers > 0 else None,
        pin_memory=device.type == "cuda",
    )
    steps_per_epoch = max(1, len(sampler) // cfg.grad_accum)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    run = Run(
        cfg=cfg,
        device=device,
        run_dir=Path(cfg.out),
        model=model,
        momentum=momentum,
        queues=queues,
        optimizer=optimizer,
        tokenizer=tokenizer,
        eval_kwargs={
            "tokenizer": tokenizer,
            "image_size": image_size,
            "batch_size": cfg.eval.batch_size,
            "device": device,
            "resize_mode": cfg.model.resize_mode,
            "mean": mean,
            "std": std,
            "i2i": cfg.eval.i2i,
        },
        train_index=train_index,
        val_index=val_index,
        test_index=test_index,
        identities=identities,
        train_rejects=train_rejects,
        sampler=sampler,
        loader=loader,
        total_steps=total_steps,
        warmup_steps=int(round(cfg.optim.warmup_epochs * steps_per_epoch)),
    )
    _resume(run)
    return run


def _resume(run: Run) -> None:
    found = read_checkpoint(run.ckpt_dir, "last")
    if found is None:
        return
    tensors, meta = found
    if meta["config_key"] != _config_key(run.cfg):
        raise ConfigError(
            f"{run.run_dir} holds a run with another config; choose another --out, or delete "
            "the folder to start over"
        )
    load_module_tensors(run.modules(), tensors)
    restore_optimizer(run.optimizer, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    run.epoch, run.step = meta["epoch"], meta["step"]
    run.history, run.best, run.draws = meta["history"], meta["best"], meta.get("draws", {})
    log.info("resumed %s at epoch %d (step %d)", run.run_dir, run.epoch, run.step)


def train_epoch(run: Run, epoch: int) -> dict[str, Any]:
    """One epoch (or what is left of the step budget); returns its report."""
    cfg, model, momentum, queues = run.cfg, run.model, run.momentum, run.queues
    optimizer, o = run.optimizer, run.cfg.optim
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if cfg.amp and run.device.type == "cuda"
        else contextlib.nullcontext
    )
    run.sampler.set_epoch(epoch)
    model.train()
    sums: dict[str, float] = defaultdict(float)
    drawn = DrawCounts(run.train_index)
    micro, samples, started = 0, 0, time.perf_counter()
    for batch in run.loader:
        images = batch["image"].to(run.device, non_blocking=True)
        text_tokens = batch["masked_text"].to(run.device, non_blocking=True)
        labels = batch["label"].to(run.device, non_blocking=True)
        with autocast():
            image_feats = model.encode_image(images)
            text_feats = model.encode_text(text_tokens)
            # CM-MoCo keys: one momentum-encoder pass per batch, used by the loss and then
            # enqueued, as MoCo (builder.py) and TextReID (moco_head) do. Those update the key
            # encoder at the start of each forward; here the same EMA update runs right after
            # each optimiser step, which is the same thing (the online encoder only changes at
            # optimiser steps), so these keys come from the key encoder MoCo would use.
            keys = momentum.encode(images, text_tokens) if momentum is not None else None
            parts = losses.weighted_losses(
                cfg.loss, model.classifier, image_feats, text_feats, labels, keys, queues
            )
        loss = sum(parts.values())
        (loss / cfg.grad_accum).backward()
        if keys is not None:
            # After backward: the loss's graph holds views of the queue, which push overwrites.
            queues.push(keys[0], keys[1], labels)
        for name, value in parts.items():
            sums[name] += float(value.detach())
        sums["loss"] += float(loss.detach())
        micro += 1
        samples += len(labels)
        drawn.add(batch, run.sampler.hard_slots)
        if micro % cfg.grad_accum:
            continue
        lr = get_lr(
            run.step,
            base_lr=o.lr,
            total_steps=run.total_steps,
            warmup_steps=run.warmup_steps,
            warmup_factor=o.warmup_factor,
            min_lr=o.min_lr,
        )
        set_lr(optimizer, lr)
        if o.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        run.step += 1
        if momentum is not None:
            losses.momentum_update(model.clip, momentum.clip, cfg.loss.moco_momentum)
            if model.text_stream is not None:
                losses.momentum_update(
                    model.text_stream, momentum.text_stream, cfg.loss.moco_momentum
                )
        if run.step >= run.total_steps:
            break
    seconds = time.perf_counter() - started
    for key, n in drawn.counts.items():
        run.draws[key] = run.draws.get(key, 0) + n
    summary = DrawCounts.summary(drawn.counts, nam=True, hard_negatives=True, bss=True)
    report: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": run.step,
        "lr": base_lr_of(optimizer),
        **{name: value / max(1, micro) for name, value in sorted(sums.items())},
        "samples_per_s": samples / seconds if seconds > 0 else 0.0,
        "augmented_share": summary["bss"]["augmented_share"],
    }
    if cfg.text.nam:
        report["stored_noise_share"] = summary["nam"]["stored_noise_share"]
    if cfg.text.hard_negatives:
        report["hard_negatives_stored"] = summary["hard_negatives"]["stored"]
    return report


def _meta(run: Run, epoch: int, history: list) -> dict:
    return {
        "config": run.cfg.model_dump(mode="json"),
        "config_key": _config_key(run.cfg),
        "epoch": epoch,
        "step": run.step,
        "identities": run.identities,
        "history": history,
    } | _stream_meta(run.tokenizer)


def _stream_meta(tokenizer: Any) -> dict[str, Any]:
    """The BiGRU text stream's dictionary words (its vectors are tensors), for restoring it."""
    if isinstance(tokenizer, WordTokenizer):
        return {"vocabulary": tokenizer.vocabulary}
    return {}


def _end_of_epoch(run: Run, epoch: int, report: dict[str, Any]) -> None:
    """Validate, keep the best-on-val checkpoint, write ``last``."""
    cfg = run.cfg
    if run.val_index.image_ids and ((epoch + 1) % cfg.eval.every_epochs == 0):
        val = evaluate(run.model, run.val_index, **run.eval_kwargs)
        report |= {f"val_{k}": v for k, v in val.items()}
        if not run.best or val["R1"] > run.best["val_R1"]:
            run.best = {"epoch": epoch + 1, "val_R1": val["R1"], "val_mAP": val["mAP"]}
            save_checkpoint(
                run.ckpt_dir,
                "best",
                module_tensors({"model": run.model}),
                _meta(run, epoch + 1, run.history + [report]),
            )
    run.history.append(report)
    tensors = module_tensors(run.modules())
    opt_tensors, opt_structure = optimizer_tensors(run.optimizer)
    tensors |= opt_tensors | {"rng.torch": torch.get_rng_state()}
    meta = _meta(run, epoch + 1, run.history) | {
        "optimizer": opt_structure,
        "best": run.best,
        "draws": dict(run.draws),
    }
    save_checkpoint(run.ckpt_dir, "last", tensors, meta)
    run.epoch = epoch + 1


def train(
    cfg: TrainConfig,
    *,
    on_epoch_end: EpochCallback | None = None,
    ranker: RankerFn | None = None,
) -> dict[str, Any]:
    """Train and evaluate; returns the final metrics (also written to ``OUT/metrics.json``).

    ``on_epoch_end`` receives each epoch's report (losses, lr, throughput, val metrics) after
    its checkpoint is written; an exception from it stops the run like a kill would.
    """
    if ranker is None and cfg.eval.rerank_model is not None:
        from pedsynth.train.engine_ranker import engine_ranker

        ranker = engine_ranker(cfg.eval.rerank_model, seed=cfg.seed)
    run = prepare(cfg)
    for epoch in range(run.epoch, cfg.epochs):
        if run.step >= run.total_steps:
            break
        report = train_epoch(run, epoch)
        _end_of_epoch(run, epoch, report)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in report.items()})
        if on_epoch_end is not None:
            on_epoch_end(report)
    return _finish(run, ranker)


def _finish(run: Run, ranker: RankerFn | None) -> dict[str, Any]:
    """Score the best-on-val checkpoint (the last one when there is no val split)."""
    cfg, model = run.cfg, run.model
    chosen = "last"
    found = read_checkpoint(run.ckpt_dir, "best") if run.best else None
    if found is not None:
        load_module_tensors({"model": model}, found[0])
        chosen = f"best (epoch {run.best['epoch']}, chosen on val R1)"
    else:
        last = read_checkpoint(run.ckpt_dir, "last")
        if last is not None:
            load_module_tensors({"model": model}, last[0])
    extra = {"rerank_k": cfg.eval.rerank_k, "rerank_weight": cfg.eval.rerank_weight}
    if not cfg.eval.rerank:
        extra = {}
    result: dict[str, Any] = {
        "name": cfg.name,
        "checkpoint": chosen,
        "epochs": len(run.history),
        "train_catalog_rejects": run.train_rejects,
        "draws": DrawCounts.summary(
            run.draws, nam=cfg.text.nam, hard_negatives=cfg.text.hard_negatives, bss=cfg.text.bss
        ),
        "config": cfg.model_dump(mode="json"),
        "history": run.history,
    }
    for split, index in (("val", run.val_index), ("test", run.test_index)):
        if index.image_ids:
            result[split] = evaluate(
                model,
                index,
                **run.eval_kwargs,
                **extra,
                ranker=ranker if split == "test" else None,
            )
            result[split]["queries"] = len(index.query_captions())
            result[split]["gallery"] = len(index.image_ids)
    atomic_write_bytes(json.dumps(result, indent=1).encode(), run.run_dir / "metrics.json")
    return result

"""The trainer: one flat loop in the style of nanoGPT.

``train(cfg)`` builds data, model and optimiser, resumes from ``OUT/checkpoints/last.*`` when
there is one, runs epochs, evaluates on **val** after each (the best checkpoint is chosen on val,
never on test), and ends by scoring the best checkpoint on val and test into ``metrics.json``.

Checkpoints carry no pickle: tensors (model, momentum encoder, queues, optimiser moments, RNG
state) go to a ``.safetensors`` file and everything else (resolved config, epoch, step,
optimiser hyper-parameters, history) to a JSON file written after it, which is the commit
marker. Data order and augmentation are keyed by (seed, epoch, sample), so a run resumed at
an epoch boundary computes exactly what an uninterrupted run computes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch.utils.data import DataLoader

from pedsynth.schemas.config import ConfigError
from pedsynth.schemas.train import TrainConfig
from pedsynth.tasks.shards import atomic_write_bytes, file_sha256
from pedsynth.train import losses
from pedsynth.train.data import (
    BlockShuffleBatchSampler,
    DataError,
    GalleryDataset,
    ImageReader,
    SplitIndex,
    TrainDataset,
    decode_image,
    load_split,
    tokenize_all,
)
from pedsynth.train.metrics import RankerFn, k_reciprocal_rerank, rank_metrics, rerank_with_model
from pedsynth.train.model import DualEncoder, MomentumEncoder, create_clip, image_size_of

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
EpochCallback = Callable[[dict[str, Any]], None]


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


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda': no CUDA device is available")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------
# evaluation


class _LazyGallery:
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
    loader = DataLoader(
        GalleryDataset(index, image_size), batch_size=batch_size, num_workers=num_workers
    )
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
    rerank_k: int | None = None,
    rerank_weight: float = 0.05,
    ranker: RankerFn | None = None,
    ranker_top_k: int = 10,
) -> dict[str, float]:
    """Text→image retrieval metrics on one split (R1, R5, R10, mAP, mINP in percent).

    With ``rerank_k``, also ``rerank_*`` metrics after k-reciprocal re-ranking. With
    ``ranker`` (a vision-language model behind :data:`~pedsynth.train.metrics.RankerFn`),
    also ``rar_*`` metrics after it reorders each query's top ``ranker_top_k``, plus its
    ``rar_parse_failure_rate``.
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
    )
    query_pids = [index.image_person[index.caption_image[c]] for c in queries]
    gallery_pids = index.image_person
    similarity = text @ images.T
    result = rank_metrics(similarity, query_pids, gallery_pids)
    if rerank_k is not None:
        k = min(rerank_k, len(gallery_pids))
        reranked = k_reciprocal_rerank(text, images, k=k, weight=rerank_weight)
        result |= {
            f"rerank_{n}": v for n, v in rank_metrics(reranked, query_pids, gallery_pids).items()
        }
    if ranker is not None:
        texts = [index.captions[c] for c in queries]
        new, stats = rerank_with_model(
            similarity, texts, _LazyGallery(index), ranker, top_k=ranker_top_k
        )
        result |= {f"rar_{n}": v for n, v in rank_metrics(new, query_pids, gallery_pids).items()}
        result |= {f"rar_{n}": v for n, v in stats.items()}
    return result


# --------------------------------------------------------------------------------------------
# checkpoints


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    layout: dict[str, dict[str, Any]] = {}
    for param_id, entries in state["state"].items():
        layout[str(param_id)] = {}
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{param_id}.{key}"] = value.detach().cpu().contiguous()
                layout[str(param_id)][key] = "tensor"
            else:
                layout[str(param_id)][key] = value
    return tensors, {"param_groups": state["param_groups"], "state": layout}


def _restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], structure: dict
) -> None:
    state: dict[int, dict[str, Any]] = {}
    for param_id, entries in structure["state"].items():
        state[int(param_id)] = {
            key: tensors[f"optim.{param_id}.{key}"] if value == "tensor" else value
            for key, value in entries.items()
        }
    groups = structure["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _model_tensors(modules: dict[str, torch.nn.Module | None]) -> dict[str, torch.Tensor]:
    tensors = {}
    for prefix, module in modules.items():
        if module is None:
            continue
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def _load_modules(modules: dict[str, torch.nn.Module | None], tensors: dict) -> None:
    for prefix, module in modules.items():
        if module is None:
            continue
        mine = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(mine, strict=True)


def save_checkpoint(
    folder: Path,
    name: str,
    tensors: dict[str, torch.Tensor],
    meta: dict[str, Any],
) -> Path:
    """Write ``name.safetensors`` then ``name.json`` (with the tensors' checksum), atomically."""
    weights = folder / f"{name}.safetensors"
    atomic_write_bytes(save(tensors, metadata={"format": str(CHECKPOINT_FORMAT)}), weights)
    meta = meta | {"format": CHECKPOINT_FORMAT, "weights_sha256": file_sha256(weights)}
    atomic_write_bytes(json.dumps(meta, indent=1).encode(), folder / f"{name}.json")
    return weights


def read_checkpoint(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], dict] | None:
    """(tensors, meta) of a complete checkpoint, or None when there is none."""
    meta_path, weights = folder / f"{name}.json", folder / f"{name}.safetensors"
    if not meta_path.exists() or not weights.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("weights_sha256") != file_sha256(weights):
        raise DataError(f"{weights}: does not match {meta_path.name} (a torn write?); delete both")
    return load_file(weights), meta


def load_trained_model(run_dir: str | Path, which: str = "best") -> tuple[DualEncoder, Any, dict]:
    """A trained model from a run folder: (model, tokenizer, checkpoint meta)."""
    found = read_checkpoint(Path(run_dir) / "checkpoints", which)
    if found is None:
        raise FileNotFoundError(f"{run_dir}: no {which} checkpoint")
    tensors, meta = found
    cfg = TrainConfig.model_validate(meta["config"])
    clip, tokenizer = create_clip(cfg.model.model_copy(update={"pretrained": None}))
    model = DualEncoder(clip, len(meta["identities"]))
    _load_modules({"model": model}, tensors)
    return model.eval(), tokenizer, meta


# --------------------------------------------------------------------------------------------
# the loop


def _config_key(cfg: TrainConfig) -> dict:
    """What must match for a run folder to be resumed (everything but where it runs)."""
    return cfg.model_dump(mode="json", exclude={"num_workers", "threads", "out"})


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
    if cfg.data is None:
        raise ConfigError("data: not set; give --data OUT (a pedsynth build) or FORMAT:PATH")
    if ranker is None and cfg.eval.rerank_model is not None:
        from pedsynth.train.engine_ranker import engine_ranker

        ranker = engine_ranker(cfg.eval.rerank_model, seed=cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    run_dir = Path(cfg.out)
    ckpt_dir = run_dir / "checkpoints"

    train_index, train_rejects = load_split(cfg.data, "train")
    if not train_index.samples:
        raise DataError(f"{cfg.data}: the train split has no captioned images")
    val_index, _ = load_split(cfg.data, "val")
    test_index, _ = load_split(cfg.data, "test")
    identities = train_index.persons
    labels = {p: i for i, p in enumerate(identities)}

    clip, tokenizer = create_clip(cfg.model, device)
    image_size = tuple(cfg.model.image_size or image_size_of(clip))
    model = DualEncoder(clip, len(identities)).to(device)
    momentum = queues = None
    if cfg.loss.cm_moco:
        momentum = MomentumEncoder(model.clip).to(device)
        queues = losses.MomentumQueues(clip.visual.output_dim, cfg.loss.moco_queue).to(device)

    head_ids = {id(p) for p in model.head_parameters()}
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = defaultdict(list)
    for p in model.parameters():
        if p.requires_grad:
            groups[(id(p) in head_ids, p.ndim >= 2)].append(p)
    o = cfg.optim
    optimizer = torch.optim.Adam(
        [
            {
                "params": params,
                "lr_factor": o.head_lr_factor if head else 1.0,
                "weight_decay": o.weight_decay if decay else 0.0,
            }
            for (head, decay), params in sorted(groups.items())
        ],
        lr=o.lr,
        betas=o.betas,
        eps=o.eps,
    )

    dataset = TrainDataset(
        train_index,
        tokenizer,
        image_size=image_size,
        seed=cfg.seed,
        labels=labels,
        augment_cfg=cfg.augment,
        text_cfg=cfg.text,
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
    warmup_steps = int(round(o.warmup_epochs * steps_per_epoch))

    start_epoch, step, history = 0, 0, []
    best: dict[str, Any] = {}
    modules = {"model": model, "momentum": momentum, "queues": queues}
    found = read_checkpoint(ckpt_dir, "last")
    if found is not None:
        tensors, meta = found
        if meta["config_key"] != _config_key(cfg):
            raise ConfigError(
                f"{run_dir} holds a run with another config; choose another --out, or delete "
                "the folder to start over"
            )
        _load_modules(modules, tensors)
        _restore_optimizer(optimizer, tensors, meta["optimizer"])
        torch.set_rng_state(tensors["rng.torch"])
        start_epoch, step = meta["epoch"], meta["step"]
        history, best = meta["history"], meta["best"]
        log.info("resumed %s at epoch %d (step %d)", run_dir, start_epoch, step)

    use_amp = cfg.amp and device.type == "cuda"
    autocast = (
        (lambda: torch.autocast("cuda", dtype=torch.bfloat16))
        if use_amp
        else contextlib.nullcontext
    )
    evaluate_kwargs = {
        "tokenizer": tokenizer,
        "image_size": image_size,
        "batch_size": cfg.eval.batch_size,
        "device": device,
    }

    for epoch in range(start_epoch, cfg.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)
        model.train()
        sums: dict[str, float] = defaultdict(float)
        micro, samples, started = 0, 0, time.perf_counter()
        augmented = 0
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True)
            text_tokens = batch["masked_text"].to(device, non_blocking=True)
            labels_t = batch["label"].to(device, non_blocking=True)
            with autocast():
                image_feats = model.encode_image(images)
                text_feats = model.encode_text(text_tokens)
                parts = _losses(
                    cfg,
                    model,
                    image_feats,
                    text_feats,
                    labels_t,
                    momentum,
                    queues,
                    images,
                    text_tokens,
                )
            loss = sum(parts.values())
            (loss / cfg.grad_accum).backward()
            for name, value in parts.items():
                sums[name] += float(value.detach())
            sums["loss"] += float(loss.detach())
            micro += 1
            samples += len(labels_t)
            augmented += int(batch["augmented"].sum())
            if micro % cfg.grad_accum:
                continue
            lr = get_lr(
                step,
                base_lr=o.lr,
                total_steps=total_steps,
                warmup_steps=warmup_steps,
                warmup_factor=o.warmup_factor,
                min_lr=o.min_lr,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_factor"]
            if o.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if momentum is not None:
                losses.momentum_update(model.clip, momentum.clip, cfg.loss.moco_momentum)
                with torch.no_grad():
                    m_image, m_text = momentum.encode(images, text_tokens)
                queues.push(m_image, m_text, labels_t)
            if step >= total_steps:
                break
        seconds = time.perf_counter() - started
        report: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "lr": optimizer.param_groups[0]["lr"] / optimizer.param_groups[0]["lr_factor"],
            **{name: value / max(1, micro) for name, value in sorted(sums.items())},
            "samples_per_s": samples / seconds if seconds > 0 else 0.0,
            "augmented_share": augmented / max(1, samples),
        }
        if val_index.image_ids and ((epoch + 1) % cfg.eval.every_epochs == 0):
            val = evaluate(model, val_index, **evaluate_kwargs)
            report |= {f"val_{k}": v for k, v in val.items()}
            if not best or val["R1"] > best["val_R1"]:
                best = {"epoch": epoch + 1, "val_R1": val["R1"], "val_mAP": val["mAP"]}
                save_checkpoint(
                    ckpt_dir,
                    "best",
                    _model_tensors({"model": model}),
                    _meta(cfg, epoch + 1, step, identities, history + [report]),
                )
        history.append(report)
        tensors = _model_tensors(modules)
        opt_tensors, opt_structure = _optimizer_tensors(optimizer)
        tensors |= opt_tensors | {"rng.torch": torch.get_rng_state()}
        meta = _meta(cfg, epoch + 1, step, identities, history) | {
            "optimizer": opt_structure,
            "best": best,
        }
        save_checkpoint(ckpt_dir, "last", tensors, meta)
        log.info("epoch %d: %s", epoch + 1, {k: round(v, 4) for k, v in report.items()})
        if on_epoch_end is not None:
            on_epoch_end(report)

    return _finish(
        cfg,
        run_dir,
        model,
        modules,
        val_index,
        test_index,
        best,
        history,
        train_rejects,
        evaluate_kwargs,
        ranker,
    )


def _meta(cfg: TrainConfig, epoch: int, step: int, identities: list[str], history: list) -> dict:
    return {
        "config": cfg.model_dump(mode="json"),
        "config_key": _config_key(cfg),
        "epoch": epoch,
        "step": step,
        "identities": identities,
        "history": history,
    }


def _losses(
    cfg: TrainConfig,
    model: DualEncoder,
    image_feats: torch.Tensor,
    text_feats: torch.Tensor,
    labels: torch.Tensor,
    momentum: MomentumEncoder | None,
    queues: losses.MomentumQueues | None,
    images: torch.Tensor,
    tokens: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The enabled losses of one batch, each already weighted."""
    image_feats, text_feats = image_feats.float(), text_feats.float()
    parts: dict[str, torch.Tensor] = {}
    if cfg.loss.sdm:
        parts["sdm"] = losses.sdm_loss(image_feats, text_feats, labels, tau=cfg.loss.sdm_tau)
    if cfg.loss.id:
        parts["id"] = cfg.loss.id_weight * losses.id_loss(
            model.classifier(image_feats), model.classifier(text_feats), labels
        )
    if momentum is not None and queues is not None:
        m_image, m_text = momentum.encode(images, tokens)
        image_queue, text_queue, queue_ids = queues.current()
        parts["cm_moco"] = cfg.loss.moco_weight * losses.cm_moco_loss(
            image_feats,
            text_feats,
            m_image.float(),
            m_text.float(),
            image_queue,
            text_queue,
            queue_ids,
            labels,
            tau=cfg.loss.moco_tau,
        )
    return parts


def _finish(
    cfg: TrainConfig,
    run_dir: Path,
    model: DualEncoder,
    modules: dict,
    val_index: SplitIndex,
    test_index: SplitIndex,
    best: dict,
    history: list,
    train_rejects: int,
    evaluate_kwargs: dict,
    ranker: RankerFn | None,
) -> dict[str, Any]:
    """Score the best-on-val checkpoint (the last one when there is no val split)."""
    chosen = "last"
    found = read_checkpoint(run_dir / "checkpoints", "best") if best else None
    if found is not None:
        _load_modules({"model": model}, found[0])
        chosen = f"best (epoch {best['epoch']}, chosen on val R1)"
    else:
        last = read_checkpoint(run_dir / "checkpoints", "last")
        if last is not None:
            _load_modules({"model": model}, last[0])
    extra = {"rerank_k": cfg.eval.rerank_k, "rerank_weight": cfg.eval.rerank_weight}
    if not cfg.eval.rerank:
        extra = {}
    result: dict[str, Any] = {
        "name": cfg.name,
        "checkpoint": chosen,
        "epochs": len(history),
        "train_catalog_rejects": train_rejects,
        "config": cfg.model_dump(mode="json"),
        "history": history,
    }
    for split, index in (("val", val_index), ("test", test_index)):
        if index.image_ids:
            result[split] = evaluate(
                model, index, **evaluate_kwargs, **extra, ranker=ranker if split == "test" else None
            )
            result[split]["queries"] = len(index.query_captions())
            result[split]["gallery"] = len(index.image_ids)
    atomic_write_bytes(json.dumps(result, indent=1).encode(), run_dir / "metrics.json")
    return result

"""Checkpoints without pickle: tensors in ``NAME.safetensors``, everything else in ``NAME.json``.

The tensors (model, momentum encoder, queues, optimiser moments, RNG state) are keyed
``<module>.<state-dict key>`` — ``model.clip.*`` is the open_clip model, ``model.classifier.*``
the identity head, ``model.text_stream.*`` the BiGRU text stream (its frozen word vectors
included; the words themselves are in the JSON's ``vocabulary``) — and
``optim.<param id>.<key>``. The JSON (resolved config, epoch, step,
identities, optimiser hyper-parameters, history, the tensors' sha256) is written after the
tensors, through :mod:`pedsynth.atomic`, so it is the commit marker: a checkpoint whose JSON
exists and matches its tensors is whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save

from pedsynth.atomic import atomic_write_bytes
from pedsynth.schemas.train import TrainConfig
from pedsynth.tasks.shards import file_sha256
from pedsynth.train.data import DataError
from pedsynth.train.model import DualEncoder, create_clip, embed_dim_of
from pedsynth.train.text_stream import restore_text_stream

CHECKPOINT_FORMAT = 1


def module_tensors(modules: dict[str, torch.nn.Module | None]) -> dict[str, torch.Tensor]:
    """The state dicts of ``modules`` (None skipped), keys prefixed with the module's name."""
    tensors = {}
    for prefix, module in modules.items():
        if module is None:
            continue
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value.detach().cpu().contiguous()
    return tensors


def load_module_tensors(
    modules: dict[str, torch.nn.Module | None], tensors: dict[str, torch.Tensor]
) -> None:
    """Inverse of :func:`module_tensors`; every key of a module must be there (strict)."""
    for prefix, module in modules.items():
        if module is None:
            continue
        mine = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        module.load_state_dict(mine, strict=True)


def optimizer_tensors(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The optimiser state split into tensors (``optim.*``) and a JSON-able structure."""
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


def restore_optimizer(
    optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], structure: dict[str, Any]
) -> None:
    """Inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict[str, Any]] = {}
    for param_id, entries in structure["state"].items():
        state[int(param_id)] = {
            key: tensors[f"optim.{param_id}.{key}"] if value == "tensor" else value
            for key, value in entries.items()
        }
    groups = structure["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])  # JSON gives a list; Adam wants a tuple
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    folder: Path, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> Path:
    """Write ``name.safetensors`` then ``name.json`` (with the tensors' sha256), atomically."""
    weights = folder / f"{name}.safetensors"
    data = save(tensors, metadata={"format": str(CHECKPOINT_FORMAT)})
    atomic_write_bytes(data, weights)
    meta = meta | {"format": CHECKPOINT_FORMAT, "weights_sha256": hashlib.sha256(data).hexdigest()}
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
    text_stream = None
    if cfg.model.text_stream == "bigru":
        if "vocabulary" not in meta:
            raise DataError(f"{run_dir}: a bigru checkpoint without its vocabulary")
        vector_dim = tensors["model.text_stream.word_vectors"].shape[1]
        text_stream, tokenizer = restore_text_stream(
            meta["vocabulary"], vector_dim, embed_dim_of(clip), cfg.model
        )
    model = DualEncoder(clip, len(meta["identities"]), text_stream)
    load_module_tensors({"model": model}, tensors)
    return model.eval(), tokenizer, meta

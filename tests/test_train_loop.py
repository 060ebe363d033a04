"""The trainer: schedule, checkpoints without pickle, resume equals an uninterrupted run,
best checkpoint chosen on val, CM-MoCo/BSS/NAM/hard negatives wired in and counted, one
momentum-encoder pass per step, the flow and CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from pedsynth.schemas.config import ConfigError
from pedsynth.schemas.train import TrainConfig, load_train_config
from pedsynth.train.loop import load_trained_model, prepare, train, train_epoch
from pedsynth.train.optim import get_lr
from tests.test_train_data import write_shards

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(procedural_small, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train-loop")
    return write_shards(procedural_small, out, rewrites=True, hard_negatives=True)


def tiny(data: Path, out: Path, **overrides) -> TrainConfig:
    base = load_train_config(
        REPO / "configs" / "train-tiny.yaml",
        data=str(data),
        out=str(out),
        overrides=["epochs=2", "batch_size=16", "num_workers=0", "threads=2"],
    )
    return base.model_copy(update=overrides)


def test_get_lr_warmup_then_cosine():
    kw = {"base_lr": 1.0, "total_steps": 110, "warmup_steps": 10, "warmup_factor": 0.1}
    assert get_lr(0, **kw) == pytest.approx(0.1)
    assert get_lr(5, **kw) == pytest.approx(0.55)
    assert get_lr(10, **kw) == pytest.approx(1.0)
    assert get_lr(60, **kw) == pytest.approx(0.5)
    assert get_lr(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert get_lr(60, **kw | {"min_lr": 0.2}) == pytest.approx(0.2 + 0.8 * 0.5)
    assert get_lr(0, **kw | {"warmup_steps": 0}) == pytest.approx(1.0)
    assert get_lr(500, **kw) == pytest.approx(0.0, abs=1e-12)  # past the end: stays at min_lr


class Stop(Exception):
    pass


def test_resume_after_a_kill_gives_the_same_metrics(data, tmp_path):
    full = train(tiny(data, tmp_path / "full"))

    def kill_after_first_epoch(report: dict) -> None:
        if report["epoch"] == 1:
            raise Stop

    cfg = tiny(data, tmp_path / "killed")
    with pytest.raises(Stop):
        train(cfg, on_epoch_end=kill_after_first_epoch)
    assert not (tmp_path / "killed" / "metrics.json").exists()
    resumed = train(cfg)
    # Same seed, order keyed by (seed, epoch, sample), exact optimiser state: identical numbers.
    assert resumed["test"] == full["test"] and resumed["val"] == full["val"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]

    # Checkpoints: safetensors + JSON, no pickle anywhere.
    ckpt = tmp_path / "full" / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "best.json",
        "best.safetensors",
        "last.json",
        "last.safetensors",
    ]
    meta = json.loads((ckpt / "last.json").read_text())
    originals, _ = _train_rows(data)
    steps_per_epoch = originals // 12  # batch 16 = 12 samples + 4 hard-negative slots
    assert meta["config"]["seed"] == 0 and meta["epoch"] == 2
    assert meta["step"] == 2 * steps_per_epoch
    with safe_open(ckpt / "last.safetensors", "pt") as f:
        keys = set(f.keys())
    assert any(k.startswith("optim.") for k in keys) and "rng.torch" in keys
    assert "model.classifier.weight" in keys

    # Best chosen on val, and the final metrics carry val and test.
    metrics = json.loads((tmp_path / "full" / "metrics.json").read_text())
    best_epoch = max(metrics["history"], key=lambda h: h["val_R1"])["epoch"]
    assert metrics["checkpoint"].startswith(f"best (epoch {best_epoch}")
    assert {"R1", "R5", "R10", "mAP", "mINP"} <= set(metrics["test"]) and "val" in metrics
    model, tokenizer, best_meta = load_trained_model(tmp_path / "full")
    assert best_meta["epoch"] == best_epoch and model.classifier.out_features > 1


def test_resume_refuses_a_run_folder_with_another_config(data, tmp_path):
    cfg = tiny(data, tmp_path / "run").model_copy(update={"epochs": 1, "max_steps": 2})
    train(cfg)
    with pytest.raises(ConfigError, match="another config"):
        train(cfg.model_copy(update={"seed": 5}))


def _train_rows(data: Path) -> tuple[int, int]:
    """(original captions, rewrite captions) of the train split, read from the Parquet."""
    table = pq.read_table(
        data / "data" / "train-00000-of-00001.parquet", columns=["caption_source"]
    )
    sources = table.column("caption_source").to_pylist()
    return sum(s in (None, "original") for s in sources), sources.count("rewrite")


def with_methods(cfg: TrainConfig, *, moco_queue: int = 64) -> TrainConfig:
    return cfg.model_copy(
        update={
            "loss": cfg.loss.model_copy(update={"cm_moco": True, "moco_queue": moco_queue}),
            "text": cfg.text.model_copy(update={"bss": True, "nam": True}),
        }
    )


def test_all_methods_on_together(data, tmp_path):
    cfg = with_methods(tiny(data, tmp_path / "all").model_copy(update={"epochs": 1}))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"rerank": True})})
    answers: list[int] = []

    def garbage_ranker(query: str, images: list) -> str:
        answers.append(len(images))
        return "no idea"

    result = train(cfg, ranker=garbage_ranker)
    epoch = result["history"][0]
    # The vision-language re-ranking hook ran on test; unparseable answers keep index order.
    assert answers and result["test"]["rar_parse_failure_rate"] == 1.0
    assert result["test"]["rar_R1"] == result["test"]["R1"]
    assert {"sdm", "id", "cm_moco"} <= set(epoch) and all(
        math.isfinite(epoch[k]) for k in ("sdm", "id", "cm_moco")
    )
    assert "rerank_R1" in result["test"]
    with safe_open(Path(cfg.out) / "checkpoints" / "last.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "queues.image_queue" in keys and any(k.startswith("momentum.") for k in keys)

    # What training drew, counted from its batches. The fixture: every train row has one
    # stored hard negative, every image one rewrite (noise levels without tokens, of another
    # length than its tokens); originals have no levels.
    originals, rewrites = _train_rows(data)
    batches = originals // 12  # batch 16 = 12 samples + round(16 × 0.25) hard-negative slots
    draws = json.loads((Path(cfg.out) / "metrics.json").read_text())["draws"]
    assert draws["items"] == 16 * batches
    assert draws["hard_negatives"] == {
        "slots": 4 * batches,
        "stored": 4 * batches,
        "random_fill": 0,
    }
    augmented = draws["bss"]["augmented"]
    assert draws["bss"]["by_source"] == {"rewrite": augmented}
    assert 0.1 < augmented / draws["items"] < 0.3  # BSS β = 0.2
    assert epoch["augmented_share"] == augmented / draws["items"]
    assert draws["nam"] == {
        "stored_noise": 0,
        "uniform": draws["items"],
        "no_stored_noise": draws["items"] - augmented,
        "misaligned_noise": augmented,
        "stored_noise_share": 0.0,
    }


def test_cm_moco_runs_the_momentum_encoder_once_per_step(data, tmp_path):
    cfg = with_methods(tiny(data, tmp_path / "moco").model_copy(update={"max_steps": 3}))
    run = prepare(cfg)
    passes = {"momentum_image": 0, "momentum_text": 0, "online_image": 0}
    keys: list[torch.Tensor] = []

    def counter(name: str):
        def hook(module, inputs, output) -> None:
            passes[name] += 1
            if name == "momentum_image":
                keys.append(output.detach())

        return hook

    run.momentum.clip.visual.register_forward_hook(counter("momentum_image"))
    run.momentum.clip.transformer.register_forward_hook(counter("momentum_text"))
    run.model.clip.visual.register_forward_hook(counter("online_image"))
    before = [p.detach().clone() for p in run.momentum.clip.parameters()]
    train_epoch(run, 0)
    assert run.step == 3
    assert passes == {"momentum_image": 3, "momentum_text": 3, "online_image": 3}
    # The queue holds exactly the keys of those three passes, in order (3 × 16 < 64 slots).
    image_queue, _, queue_ids = run.queues.current()
    assert len(queue_ids) == 48
    assert torch.allclose(image_queue, F.normalize(torch.cat(keys).float(), dim=1), atol=1e-6)
    # And the EMA update ran: the key encoder moved (slightly: m = 0.999).
    after = list(run.momentum.clip.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_one_line_error(data, tmp_path):
    from pedsynth.engines.device import DeviceError

    with pytest.raises(DeviceError) as err:
        prepare(tiny(data, tmp_path).model_copy(update={"device": "cuda"}))
    assert "'cuda'" in str(err.value) and "\n" not in str(err.value)


def test_config_errors_name_key_and_value(tmp_path):
    with pytest.raises(ConfigError, match=r"loss.sdm_tau = -1"):
        load_train_config(overrides=["loss.sdm_tau=-1"])
    with pytest.raises(ConfigError, match=r"bogus"):
        load_train_config(overrides=["bogus=1"])
    with pytest.raises(ConfigError, match="no loss is on"):
        load_train_config(overrides=["loss.sdm=false", "loss.id=false"])
    with pytest.raises(ConfigError, match="data: not set"):
        train(TrainConfig(out=str(tmp_path)))
    assert load_train_config(REPO / "configs" / "train-gpu.yaml").model.image_size == (384, 128)


def test_draws_line_says_what_each_switch_drew():
    from pedsynth.flows.train import draws_line

    draws = {
        "items": 64,
        "nam": {"stored_noise": 48, "uniform": 16, "stored_noise_share": 0.75},
        "hard_negatives": {"slots": 16, "stored": 12, "random_fill": 4},
        "bss": {"augmented": 13, "augmented_share": 0.203125, "by_source": {"rewrite": 13}},
    }
    assert draws_line(draws) == (
        "NAM used stored noise levels for 75% of captions (16 at the uniform rate); "
        "12 of 16 hard-negative slots held stored ones; BSS used augmented captions for 20%"
    )
    assert draws_line({"items": 64}) == "no text-side switch on"


def test_flow_publishes_artifacts_and_cli_validates(prefect_server, data, tmp_path):
    from prefect.client.orchestration import get_client

    from pedsynth.cli import main
    from pedsynth.flows.train import train_retriever

    out = tmp_path / "flow"
    result = train_retriever(
        config=str(REPO / "configs" / "train-tiny.yaml"),
        data=str(data),
        out=str(out),
        overrides=["epochs=1", "batch_size=16", "num_workers=0", "max_steps=3", "name=flowtest"],
    )
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "metrics.json").read_text())["test"] == result["test"]
    assert [h["step"] for h in result["history"]] == [3]  # max_steps=3
    test_images = pq.read_table(data / "data" / "test-00000-of-00001.parquet")["image_id"]
    assert result["test"]["gallery"] == len(pc.unique(test_images))

    import asyncio

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    found = asyncio.run(keys())
    assert {"train-flowtest-epochs", "train-flowtest-summary"} <= found

    assert main(["train", "--data", str(data), "--set", "optim.lr=lots"]) == 2

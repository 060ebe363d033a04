"""The ``train-retriever`` flow: wiring only.

Validates the config, runs the trainer (``pedsynth.train.loop.train``) as one task, publishes
each epoch's numbers as a Prefect table artifact and, at the end, a loss/R1 plot and the final
val/test metrics. Rerunning with the same ``out`` resumes from the last checkpoint.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pedsynth.schemas.train import TrainConfig, load_train_config

METRIC_KEYS = ("R1", "R5", "R10", "mAP", "mINP")


def _artifact_key(name: str, suffix: str) -> str:
    """Prefect keys allow lowercase letters, digits and dashes only."""
    clean = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"
    return f"train-{clean}-{suffix}"


def plot_curves(history: list[dict[str, Any]], path: Path) -> Path:
    """Training loss and val R1 per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, left = plt.subplots(figsize=(6, 3.5))
    left.plot(epochs, [h.get("loss", float("nan")) for h in history], "o-", color="tab:blue")
    left.set_xlabel("epoch")
    left.set_ylabel("training loss", color="tab:blue")
    if any("val_R1" in h for h in history):
        right = left.twinx()
        right.plot(epochs, [h.get("val_R1", float("nan")) for h in history], "s-", color="tab:red")
        right.set_ylabel("val R1 (%)", color="tab:red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@task(name="train-model", cache_policy=NO_CACHE)
def train_model(cfg: TrainConfig) -> dict[str, Any]:
    from pedsynth.train.loop import train

    key = _artifact_key(cfg.name, "epochs")
    rows: list[dict[str, Any]] = []

    def publish(report: dict[str, Any]) -> None:
        rows.append({k: round(v, 4) if isinstance(v, float) else v for k, v in report.items()})
        create_table_artifact(table=rows, key=key, description=f"{cfg.name}: per-epoch metrics")

    return train(cfg, on_epoch_end=publish)


@flow(name="train-retriever", log_prints=True)
def train_retriever(
    config: str | None = "configs/train-tiny.yaml",
    data: str | None = None,
    out: str | None = None,
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Train a dual-encoder retriever on a pedsynth build; returns the final metrics."""
    cfg = load_train_config(config, data=data, out=out, overrides=overrides)
    logger = get_run_logger()
    logger.info("train %r on %s → %s", cfg.name, cfg.data, cfg.out)
    result = train_model(cfg)
    plot = plot_curves(result["history"], Path(cfg.out) / "curves.png")
    image = base64.b64encode(plot.read_bytes()).decode()
    table = "| split | " + " | ".join(METRIC_KEYS) + " |\n|---|" + "---|" * len(METRIC_KEYS)
    for split in ("val", "test"):
        if split in result:
            values = " | ".join(f"{result[split][k]:.2f}" for k in METRIC_KEYS)
            table += f"\n| {split} | {values} |"
            if f"i2i_{METRIC_KEYS[0]}" in result[split]:  # image→image re-identification
                values = " | ".join(f"{result[split][f'i2i_{k}']:.2f}" for k in METRIC_KEYS)
                table += f"\n| {split} i2i | {values} |"
    create_markdown_artifact(
        key=_artifact_key(cfg.name, "summary"),
        markdown=(
            f"# {cfg.name}\n\ncheckpoint: {result['checkpoint']}\n\n{table}\n\n"
            f"drawn from the shards: {draws_line(result.get('draws', {}))}\n\n"
            f"![loss and val R1](data:image/png;base64,{image})"
        ),
    )
    logger.info("%s: %s", cfg.name, _one_line(result))
    logger.info("drawn from the shards: %s", draws_line(result.get("draws", {})))
    return result


def draws_line(draws: dict[str, Any]) -> str:
    """What training drew, per switch that is on (``metrics.json``'s ``draws``), in words."""
    parts = []
    if "nam" in draws:
        nam = draws["nam"]
        parts.append(
            f"NAM used stored noise levels for {nam['stored_noise_share']:.0%} of captions "
            f"({nam['uniform']} at the uniform rate)"
        )
    if "hard_negatives" in draws:
        hard = draws["hard_negatives"]
        parts.append(f"{hard['stored']} of {hard['slots']} hard-negative slots held stored ones")
    if "bss" in draws:
        parts.append(f"BSS used augmented captions for {draws['bss']['augmented_share']:.0%}")
    return "; ".join(parts) or "no text-side switch on"


def _one_line(result: dict[str, Any]) -> str:
    parts = []
    for split in ("val", "test"):
        if split in result:
            parts.append(f"{split} " + " ".join(f"{k} {result[split][k]:.2f}" for k in METRIC_KEYS))
    return "; ".join(parts) or "no val/test split"

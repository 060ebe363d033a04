"""Ablation on noisy captions: train with and without BSS, NAM and CM-MoCo, print one table.

Data: a procedural benchmark (CUHK-PEDES layout with ``attributes.json``). Per train image,
its first caption is the ``original`` row and its second a ``rewrite`` row (BSS's pool of
augmented captions; the procedural captions are independent descriptions, standing in for an
LLM rewrite). A ``corrupt`` share of the train captions — originals and rewrites alike, drawn
independently — get every colour word swapped for another colour of the vocabulary (a wrong
annotation). Token noise levels are the oracle a perfect score stage would give: 1 on the BPE
tokens of swapped words, 0 elsewhere. Val and test captions stay clean.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pedsynth.engines.clip_tokens import clip_token_strings
from pedsynth.schemas.config import ConfigError, IngestConfig, SourceConfig
from pedsynth.schemas.train import TrainConfig, load_train_config

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "+BSS": {"text.bss": True},
    "+NAM": {"text.nam": True},
    "+CM-MoCo": {"loss.cm_moco": True},
    "+all": {"text.bss": True, "text.nam": True, "loss.cm_moco": True},
}


def colour_words(attributes: dict[str, Any]) -> list[str]:
    """Every colour value of the benchmark's vocabulary (garment and hair colours)."""
    vocab = attributes["vocabulary"]
    return sorted({c for key, values in vocab.items() if key.endswith("colour") for c in values})


def corrupt_caption(
    caption: str, colours: list[str], rng: np.random.Generator
) -> tuple[str, list[bool]]:
    """Swap every colour word for a different colour; returns (text, swapped flag per word)."""
    words = caption.split()
    flags = []
    for i, word in enumerate(words):
        core = re.sub(r"[^a-z-]", "", word.lower())
        swapped = core in colours
        if swapped:
            other = [c for c in colours if c != core]
            words[i] = word.lower().replace(core, other[int(rng.integers(len(other)))])
        flags.append(swapped)
    return " ".join(words), flags


def word_noise(caption: str, flags: list[bool], tokenizer: Any) -> tuple[list[str], list[float]]:
    """CLIP BPE tokens of ``caption`` with noise 1.0 on the tokens of flagged words.

    Empty lists when word-by-word tokenisation does not reproduce the whole caption's tokens
    (the trainer then uses a constant masking rate).
    """
    ids: list[int] = []
    noise: list[float] = []
    for word, flag in zip(caption.split(), flags, strict=True):
        word_ids = tokenizer.encode(word)
        ids += word_ids
        noise += [1.0 if flag else 0.0] * len(word_ids)
    if ids != tokenizer.encode(caption):
        return [], []
    return clip_token_strings(tokenizer, ids), noise


def build_noisy_dataset(benchmark: str | Path, out: str | Path, corrupt: float, seed: int) -> Path:
    """Write ``OUT/data/{split}-*.parquet`` for the ablation (see the module docstring)."""
    from open_clip.tokenizer import SimpleTokenizer

    from pedsynth.tasks import ingest

    if not 0.0 <= corrupt <= 1.0:
        raise ConfigError(f"corrupt = {corrupt}: must be a share between 0 and 1")
    bench = Path(benchmark)
    attributes_file = bench / "attributes.json"
    if not attributes_file.exists():
        raise FileNotFoundError(
            f"{attributes_file} not found: the ablation needs a procedural "
            "benchmark (pedsynth sample-data)"
        )
    colours = colour_words(json.loads(attributes_file.read_text()))
    catalog, _ = ingest.read_catalog(SourceConfig(format="cuhk-pedes", path=str(bench)))
    pairs, _ = ingest.load_images(catalog, IngestConfig())
    tokenizer = SimpleTokenizer()
    rng = np.random.default_rng(seed)
    out = Path(out)
    (out / "data").mkdir(parents=True, exist_ok=True)
    for split in ("train", "val", "test"):
        table = pairs.filter(pc.equal(pairs["split"], split))
        if split == "train":
            rows = table.to_pylist()
            first: dict[str, str] = {}
            for row in rows:
                parent = first.setdefault(row["image_id"], row["pair_id"])
                if parent != row["pair_id"]:
                    row["caption_source"], row["parent_id"] = "rewrite", parent
                flags = [False] * len(row["caption"].split())
                if rng.random() < corrupt:
                    row["caption"], flags = corrupt_caption(row["caption"], colours, rng)
                tokens, noise = word_noise(row["caption"], flags, tokenizer)
                row["tokens"], row["token_noise"] = tokens or None, noise or None
            table = pa.Table.from_pylist(rows, schema=table.schema)
        pq.write_table(table, out / "data" / f"{split}-00000-of-00001.parquet", row_group_size=500)
    return out


def run_ablation(
    benchmark: str | Path,
    *,
    out: str | Path = "runs/ablation",
    config: str | Path | None = "configs/train-tiny.yaml",
    corrupt: float = 0.3,
    overrides: list[str] | None = None,
    variants: list[str] | None = None,
) -> str:
    """Build the noisy dataset, train each variant, write ``OUT/ablation.json``; return a
    Markdown table (val and test metrics of each variant's best-on-val checkpoint)."""
    from pedsynth.train.loop import train

    chosen = variants or list(VARIANTS)
    unknown = [v for v in chosen if v not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variant {unknown[0]!r}: one of {', '.join(VARIANTS)}")
    out = Path(out)
    base: TrainConfig = load_train_config(config, overrides=overrides)
    data = build_noisy_dataset(benchmark, out / "dataset", corrupt, base.seed)
    results: dict[str, dict[str, Any]] = {}
    for name in chosen:
        settings = [f"{k}={str(v).lower()}" for k, v in VARIANTS[name].items()]
        cfg = load_train_config(
            config,
            data=str(data),
            out=str(out / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")),
            overrides=[*(overrides or []), *settings],
        )
        result = train(cfg)
        results[name] = {split: result[split] for split in ("val", "test") if split in result}
    (out / "ablation.json").write_text(
        json.dumps({"corrupt": corrupt, "results": results}, indent=1)
    )
    return format_table(results, corrupt)


def format_table(results: dict[str, dict[str, Any]], corrupt: float) -> str:
    lines = [
        f"captions corrupted: {corrupt:.0%} (colour words swapped), clean val/test",
        "",
        "| variant | val R1 | test R1 | test R5 | test R10 | test mAP | test mINP |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        val = r.get("val", {}).get("R1", float("nan"))
        t = r.get("test", {})
        cells = " | ".join(
            f"{t.get(k, float('nan')):.1f}" for k in ("R1", "R5", "R10", "mAP", "mINP")
        )
        lines.append(f"| {name} | {val:.1f} | {cells} |")
    return "\n".join(lines)

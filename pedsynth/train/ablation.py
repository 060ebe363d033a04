"""Ablation on noisy captions: train with and without BSS, NAM, CM-MoCo and the BiGRU text
stream, each over several seeds, and print one table of mean ± std.

Data: a procedural benchmark (CUHK-PEDES layout with ``attributes.json``). Per train image,
its first caption is the ``original`` row and its second a ``rewrite`` row (BSS's pool of
augmented captions; the procedural captions are independent descriptions, standing in for an
LLM rewrite). A ``corrupt`` share of the train captions — originals and rewrites alike, drawn
independently — get every colour word swapped for another colour of the vocabulary (a wrong
annotation). Token noise levels are the oracle a perfect score stage would give: 1 on the BPE
tokens of swapped words, 0 elsewhere. Val and test captions stay clean.

The three filter rows (:mod:`pedsynth.train.filter_ablation`) train on clean originals plus one
rewrite each, a ``corrupt`` share of which state one wrong fact: unfiltered, filtered by the
embedding score only, and by embedding + attributes; the table says how many corrupted
rewrites each kept.
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
from pedsynth.train.filter_ablation import FILTER_ROWS, build_filter_datasets

VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": {},
    "+BSS(0.2)": {"text.bss": True, "text.bss_beta": 0.2},
    "+BSS(1.0)": {"text.bss": True, "text.bss_beta": 1.0},
    # NAM's per-token rates come from the rows' stored ``token_noise`` (here the oracle
    # levels; in a build, the score stage's), not from a constant p.
    "+NAM": {"text.nam": True},
    "+CM-MoCo": {"loss.cm_moco": True},
    "+BiGRU": {"model.text_stream": "bigru"},
    "+all": {"text.bss": True, "text.nam": True, "loss.cm_moco": True},
}
DEFAULT_VARIANTS = [
    "baseline",
    "+BSS(0.2)",
    "+BSS(1.0)",
    "+NAM",
    "+CM-MoCo",
    "+BiGRU",
    *FILTER_ROWS,
]
DEFAULT_SEEDS = (0, 1, 2)
MIN_TEST_IDENTITIES = 100
SUMMARY_METRICS = (
    ("val", "R1"),
    ("test", "R1"),
    ("test", "R5"),
    ("test", "R10"),
    ("test", "mAP"),
    ("test", "mINP"),
    ("test", "i2i_R1"),
    ("test", "i2i_mAP"),
)


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
    seeds: list[int] | tuple[int, ...] = DEFAULT_SEEDS,
    steps: int | None = None,
    min_test_identities: int = MIN_TEST_IDENTITIES,
    filter_builds: dict[str, str | Path] | None = None,
) -> str:
    """Build the noisy dataset, train each variant once per seed, write ``OUT/ablation.json``;
    return a Markdown table of mean ± std over the seeds.

    Seeds vary the training (initialisation, batch order, augmentation, masks); the corrupted
    dataset is built once (from the config's seed), so every row sees the same captions.
    ``steps`` caps each run's optimiser steps (``max_steps``). The test split must hold at
    least ``min_test_identities`` identities (generate the benchmark with enough of them).

    ``filter_builds`` maps a row label to a pedsynth build: each becomes a ``+filter (LABEL)``
    row trained on that build instead of the noisy dataset — e.g. two builds of the same
    source whose rewrites include corruptions, one filtered by the embedding score only and
    one by the attribute-aware check.
    """
    from pedsynth.train.loop import train

    chosen = list(DEFAULT_VARIANTS) if variants is None else list(variants)
    unknown = [v for v in chosen if v not in VARIANTS and v not in FILTER_ROWS]
    if unknown:
        known = ", ".join([*VARIANTS, *FILTER_ROWS])
        raise ConfigError(f"--variant {unknown[0]!r}: one of {known}")
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {seeds}: need one or more distinct seeds")
    out = Path(out)
    base: TrainConfig = load_train_config(config, overrides=overrides)
    rows: dict[str, tuple[str, list[str]]] = {}
    filters: dict[str, dict[str, Any]] = {}
    if any(name in FILTER_ROWS for name in chosen):
        filters = build_filter_datasets(benchmark, out / "filter-datasets", corrupt, base.seed)
    if any(name in VARIANTS for name in chosen):
        data = build_noisy_dataset(benchmark, out / "dataset", corrupt, base.seed)
    for name in chosen:
        if name in FILTER_ROWS:
            # Rewrites reach training through BSS's pool of augmented captions; without it
            # every filter row would train on the same originals.
            rows[name] = (filters[name]["data"], ["text.bss=true", "text.bss_beta=1.0"])
        else:
            settings = [f"{k}={str(v).lower()}" for k, v in VARIANTS[name].items()]
            rows[name] = (str(data), settings)
    for label, build in (filter_builds or {}).items():
        rows[f"+filter ({label})"] = (str(build), [])
    for name, (data, _) in rows.items():
        _check_test_identities(data, name, min_test_identities)
    results: dict[str, dict[str, Any]] = {}
    for name, (data, settings) in rows.items():
        runs: dict[str, dict[str, Any]] = {}
        for seed in seeds:
            extra = [f"seed={seed}"] + ([f"max_steps={steps}"] if steps else [])
            cfg = load_train_config(
                config,
                data=data,
                out=str(out / _slug(name) / f"seed-{seed}"),
                overrides=[*(overrides or []), *settings, *extra],
            )
            result = train(cfg)
            runs[str(seed)] = {split: result[split] for split in ("val", "test") if split in result}
        results[name] = {"data": data, "runs": runs, **aggregate(runs)}
        if name in filters:
            results[name]["dataset"] = {k: v for k, v in filters[name].items() if k != "data"}
    (out / "ablation.json").write_text(
        json.dumps({"corrupt": corrupt, "seeds": seeds, "results": results}, indent=1)
    )
    return format_table(results, corrupt, seeds)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _check_test_identities(data: str, row: str, minimum: int) -> None:
    from pedsynth.train.data import load_split

    test, _ = load_split(data, "test")
    found = len(set(test.image_person))
    if found < minimum:
        raise ConfigError(
            f"{row}: the test split of {data} has {found} identities, fewer than {minimum}; "
            "generate a larger benchmark (pedsynth sample-data --identities 1000) or lower "
            "--min-test-identities"
        )


def aggregate(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean and sample standard deviation (n − 1; 0 for one seed) of every split's metric."""
    mean: dict[str, float] = {}
    std: dict[str, float] = {}
    keys = sorted({f"{split}_{k}" for r in runs.values() for split, m in r.items() for k in m})
    for key in keys:
        split, _, metric = key.partition("_")
        values = [
            float(r[split][metric])
            for r in runs.values()
            if isinstance(r.get(split, {}).get(metric), int | float)
        ]
        if not values:
            continue
        mean[key] = float(np.mean(values))
        std[key] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std}


def format_table(
    results: dict[str, dict[str, Any]], corrupt: float, seeds: list[int] | None = None
) -> str:
    seeds = seeds or []
    header = " | ".join(f"{split} {m.replace('_', ' ')}" for split, m in SUMMARY_METRICS)
    lines = [
        f"captions corrupted: {corrupt:.0%} (colour words swapped), clean val/test; "
        f"mean ± std over {len(seeds)} seed(s) {seeds}",
        "",
        f"| variant | {header} |",
        "|---|" + "---:|" * len(SUMMARY_METRICS),
    ]
    for name, r in results.items():
        cells = []
        for split, metric in SUMMARY_METRICS:
            key = f"{split}_{metric}"
            if key in r.get("mean", {}):
                cells.append(f"{r['mean'][key]:.1f} ± {r['std'][key]:.1f}")
            else:
                cells.append("–")
        lines.append(f"| {name} | {' | '.join(cells)} |")
    kept = {name: r["dataset"] for name, r in results.items() if "dataset" in r}
    if kept:
        lines.append("")
        for name, d in kept.items():
            lines.append(
                f"{name}: {d['rewrites']} rewrites kept, {d['corrupted_rewrites']} of them "
                f"with one wrong fact, {d['paraphrases']} faithful"
            )
    return "\n".join(lines)

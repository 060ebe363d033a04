"""The ablation: caption corruption, oracle token noise, and one table from several runs."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from open_clip.tokenizer import SimpleTokenizer

from pedsynth.schemas.config import ConfigError
from pedsynth.train.ablation import (
    build_noisy_dataset,
    colour_words,
    corrupt_caption,
    run_ablation,
    word_noise,
)

COLOURS = ["black", "blue", "red"]


def test_corrupt_caption_swaps_every_colour_word():
    rng = np.random.default_rng(0)
    text, flags = corrupt_caption("A man in a red coat and black shoes.", COLOURS, rng)
    words = text.split()
    assert flags == [False, False, False, False, True, False, False, True, False]
    assert words[4] != "red" and words[4] in COLOURS and words[7] != "black"
    assert corrupt_caption("No colours here.", COLOURS, rng) == ("No colours here.", [False] * 3)


def test_word_noise_marks_the_tokens_of_swapped_words():
    tokens, noise = word_noise("a blue coat.", [False, True, False], SimpleTokenizer())
    # The ``tokens`` column's one format (what the score stage stores): no end-of-word marker.
    assert tokens == ["a", "blue", "coat", "."]
    assert noise == [0.0, 1.0, 0.0, 0.0]


def test_noisy_dataset_rates(procedural_small, tmp_path):
    out = build_noisy_dataset(procedural_small, tmp_path, corrupt=0.5, seed=0)
    train = pq.read_table(out / "data" / "train-00000-of-00001.parquet").to_pylist()
    sources = [r["caption_source"] for r in train]
    assert sources.count("original") == sources.count("rewrite") == len(train) // 2
    corrupted = [r for r in train if r["token_noise"] and max(r["token_noise"]) == 1.0]
    assert 0.3 < len(corrupted) / len(train) < 0.7
    test = pq.read_table(out / "data" / "test-00000-of-00001.parquet").to_pylist()
    assert all(r["token_noise"] is None for r in test)  # evaluation captions stay clean
    attributes = json.loads((procedural_small / "attributes.json").read_text())
    assert "red" in colour_words(attributes)
    with pytest.raises(ConfigError, match="corrupt = 2"):
        build_noisy_dataset(procedural_small, tmp_path, corrupt=2, seed=0)


def test_run_ablation_prints_one_table(procedural_small, tmp_path):
    table = run_ablation(
        procedural_small,
        out=tmp_path,
        corrupt=0.3,
        overrides=["epochs=1", "max_steps=2", "batch_size=16", "num_workers=0"],
        variants=["baseline", "+all"],
    )
    lines = table.splitlines()
    assert lines[0].startswith("captions corrupted: 30%")
    assert [line.split("|")[1].strip() for line in lines[4:]] == ["baseline", "+all"]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert set(saved["results"]) == {"baseline", "+all"}
    # NAM read the oracle levels: their tokens are the trainer's, so none fell back as misaligned.
    nam = json.loads((tmp_path / "all" / "metrics.json").read_text())["draws"]["nam"]
    assert nam["stored_noise"] > 0 and nam["misaligned_noise"] == 0
    with pytest.raises(ConfigError, match="--variant 'nope'"):
        run_ablation(procedural_small, out=tmp_path, variants=["nope"])

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


def test_run_ablation_rows_over_seeds_with_mean_and_std(procedural_small, tmp_path):
    from tests.test_train_data import write_shards

    clean = write_shards(procedural_small, tmp_path / "clean")
    table = run_ablation(
        procedural_small,
        out=tmp_path,
        corrupt=0.3,
        overrides=["epochs=1", "batch_size=16", "num_workers=0"],
        variants=["+NAM"],
        seeds=[0, 1],
        steps=1,
        min_test_identities=1,
        # The +filter hook: one row per build (embedding-only and attribute-aware in a real run).
        filter_builds={"attribute": clean},
    )
    lines = table.splitlines()
    assert lines[0].startswith("captions corrupted: 30%") and "2 seed(s) [0, 1]" in lines[0]
    assert [line.split("|")[1].strip() for line in lines[4:]] == [
        "+NAM",
        "+filter (attribute)",
    ]
    saved = json.loads((tmp_path / "ablation.json").read_text())
    nam = saved["results"]["+NAM"]
    assert set(nam["runs"]) == {"0", "1"}
    r1 = [nam["runs"][s]["test"]["R1"] for s in ("0", "1")]
    assert nam["mean"]["test_R1"] == pytest.approx((r1[0] + r1[1]) / 2)
    assert nam["std"]["test_R1"] == pytest.approx(abs(r1[0] - r1[1]) / 2**0.5)  # n - 1
    assert "test_i2i_mAP" in nam["mean"]
    cell = lines[4].split("|")[3].strip()  # test R1
    assert cell == f"{nam['mean']['test_R1']:.1f} ± {nam['std']['test_R1']:.1f}"
    assert saved["results"]["+filter (attribute)"]["data"] == str(clean)
    # Seeds changed the runs; each seed's run folder is its own.
    assert (tmp_path / "nam" / "seed-0" / "metrics.json").exists()
    assert (tmp_path / "nam" / "seed-1" / "metrics.json").exists()
    # NAM read the stored (oracle) levels, per token, not a constant rate.
    draws = json.loads((tmp_path / "nam" / "seed-0" / "metrics.json").read_text())["draws"]
    assert draws["nam"]["stored_noise"] > 0 and draws["nam"]["misaligned_noise"] == 0


def test_run_ablation_refuses_small_test_splits_and_unknown_rows(procedural_small, tmp_path):
    with pytest.raises(ConfigError, match="fewer than 100"):
        run_ablation(procedural_small, out=tmp_path, variants=["baseline"], steps=1)
    with pytest.raises(ConfigError, match="--variant 'nope'"):
        run_ablation(procedural_small, out=tmp_path, variants=["nope"])
    with pytest.raises(ConfigError, match="distinct seeds"):
        run_ablation(procedural_small, out=tmp_path, seeds=[1, 1])


def test_filter_datasets_keep_fewer_wrong_facts_with_the_attribute_check(
    procedural_small, tmp_path
):
    from pedsynth.train.filter_ablation import FILTER_ROWS, build_filter_datasets

    made = build_filter_datasets(procedural_small, tmp_path, corrupt=0.5, seed=0)
    assert set(made) == set(FILTER_ROWS)

    def train_rows(label):
        table = pq.read_table(f"{made[label]['data']}/data/train-00000-of-00001.parquet")
        return table.to_pylist()

    def split(label, name):
        return pq.read_table(f"{made[label]['data']}/data/{name}-00000-of-00001.parquet")

    everything = train_rows("+rewrites (unfiltered)")
    originals = [r for r in everything if r["caption_source"] == "original"]
    rewrites = [r for r in everything if r["caption_source"] == "rewrite"]
    assert len(rewrites) == len(originals)  # one rewrite per train caption
    wrong = {r["pair_id"] for r in rewrites if r["generator"] != "procedural:paraphrase"}
    assert 0.35 < len(wrong) / len(rewrites) < 0.65  # about the corrupt share
    assert {r["parent_id"] for r in rewrites} == {r["pair_id"] for r in originals}

    def kept_wrong(label):
        return sum(r["pair_id"] in wrong for r in train_rows(label))

    by_embedding, by_attributes = (
        kept_wrong("+filter (embedding)"),
        kept_wrong("+filter (attribute)"),
    )
    assert by_attributes < by_embedding <= len(wrong)
    assert by_attributes <= 0.1 * len(wrong)
    assert made["+filter (attribute)"]["corrupted_rewrites"] == by_attributes
    for label in FILTER_ROWS:  # every row is evaluated on the same clean captions
        for name in ("val", "test"):
            assert split(label, name).equals(split("+rewrites (unfiltered)", name))

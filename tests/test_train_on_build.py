"""Train on a real build: what the score and memory stages store is what the trainer reads.

The procedural benchmark is built with ``configs/offline-vision.yaml`` (score and memory on the
tiny random-weight CLIP), then trained on with NAM and hard negatives on. Checked against the
written Parquet, not against the trainer's own bookkeeping:
- the stored ``tokens`` are the trainer's tokens, and each token is masked at the rate its
  stored ``token_noise`` gives, r' = clip(r − mean(r) + p, 0, 1) (MLLM4Text-ReID), within
  sampling error;
- every hard-negative slot of the training batches holds an image listed in the stored
  ``hard_negatives`` of the caption it was drawn for;
- ``metrics.json`` reports those same draws.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pytest

from pedsynth.engines.clip_tokens import clip_token_strings
from pedsynth.schemas.train import TrainConfig, load_train_config
from pedsynth.train.datasets import NOISE_STORED
from pedsynth.train.loop import prepare, train

REPO = Path(__file__).resolve().parents[1]
DRAWS = 400  # NAM draws per caption: a rate's standard error is at most 0.025
TRAINED_STEPS = 4
MASK_CHANGES = 0.9  # BERT-style: of the selected tokens, 80 % masked + 10 % random change


@pytest.fixture(scope="module")
def build(prefect_server, procedural_small, tmp_path_factory) -> Path:
    from pedsynth.flows.build_dataset import build_dataset

    out = tmp_path_factory.mktemp("vision-build") / "out"
    build_dataset(
        config=str(REPO / "configs" / "offline-vision.yaml"),
        sources=[f"cuhk-pedes:{procedural_small}"],
        out=str(out),
    )
    return out


@pytest.fixture(scope="module")
def stored(build) -> dict[str, dict]:
    """The train rows of the build, by pair_id, as the Parquet holds them."""
    table = ds.dataset(build / "latest" / "data").to_table(
        columns=["pair_id", "image_id", "person_id", "tokens", "token_noise", "hard_negatives"],
        filter=ds.field("split") == "train",
    )
    return {row["pair_id"]: row for row in table.to_pylist()}


def nam_config(build: Path, out: Path) -> TrainConfig:
    return load_train_config(
        REPO / "configs" / "train-tiny.yaml",
        data=str(build),
        out=str(out),
        overrides=[
            "epochs=1",
            "batch_size=16",
            "num_workers=0",
            "threads=2",
            "text.nam=true",
            "text.hard_negatives=true",
        ],
    )


def test_the_build_stores_noise_levels_and_hard_negatives(stored):
    rows = list(stored.values())
    assert rows and all(len(r["tokens"]) == len(r["token_noise"]) > 0 for r in rows)
    assert all(r["hard_negatives"] for r in rows)


def test_masking_rate_follows_the_stored_token_noise(build, stored, tmp_path):
    cfg = nam_config(build, tmp_path / "run")
    run = prepare(cfg)
    dataset, index, p = run.loader.dataset, run.train_index, cfg.text.nam_p
    observed, expected = [], []
    for caption in index.samples[:12]:
        row = stored[index.caption_pair[caption]]
        r = np.asarray(row["token_noise"], dtype=np.float64)
        n = len(r)
        changed = np.zeros(n)
        for epoch in range(DRAWS):
            item = dataset.text(epoch, caption)
            assert item["noise"] == NOISE_STORED
            clean, masked = item["text"][1 : n + 1], item["masked_text"][1 : n + 1]
            changed += (clean != masked).numpy()
        # Alignment: the score stage's tokens are exactly the trainer's tokens of the caption.
        assert clip_token_strings(dataset.tokenizer, clean.tolist()) == row["tokens"]
        assert int(item["text"][n + 1]) == dataset.eot_token
        observed.append(changed / DRAWS)
        expected.append(MASK_CHANGES * np.clip(r - r.mean() + p, 0.0, 1.0))
    observed, expected = np.concatenate(observed), np.concatenate(expected)

    never = expected == 0  # r' clipped to 0: such a token is never masked
    assert (observed[never] == 0).all()
    q = expected[~never]
    z = (observed[~never] - q) / np.sqrt(q * (1 - q) / DRAWS)
    assert np.abs(z).max() < 5.0
    assert 0.6 < np.mean(z**2) < 1.6  # the spread a binomial draw has, no more
    # Higher-noise tokens are masked more often: a constant rate would fail both.
    high, low = q >= np.quantile(q, 0.75), q <= np.quantile(q, 0.25)
    assert observed[~never][high].mean() > 1.5 * observed[~never][low].mean()
    assert np.corrcoef(observed[~never], q)[0, 1] > 0.8


def test_batches_hold_the_stored_hard_negatives(build, stored, tmp_path):
    cfg = nam_config(build, tmp_path / "run")
    run = prepare(cfg)
    index, sampler = run.train_index, run.sampler
    assert sampler.hard_slots == 4  # round(16 × 0.25)
    sampler.set_epoch(0)
    hard, hard_in_first = 0, 0
    for number, batch in enumerate(run.loader):
        for caption, anchor in zip(
            batch["caption"].tolist(), batch["hard_negative_of"].tolist(), strict=True
        ):
            if anchor < 0:
                continue
            hard += 1
            anchor_row = stored[index.caption_pair[anchor]]
            image = index.image_ids[index.caption_image[caption]]
            assert image in anchor_row["hard_negatives"]
            assert index.image_person[index.caption_image[caption]] != anchor_row["person_id"]
        if number + 1 == TRAINED_STEPS:
            hard_in_first = hard
    assert hard == len(sampler) * sampler.hard_slots  # no slot fell back to a random sample

    # The first steps of that epoch, trained: metrics.json reports what their batches drew.
    cfg = cfg.model_copy(update={"max_steps": TRAINED_STEPS})
    result = train(cfg)
    saved = json.loads((Path(cfg.out) / "metrics.json").read_text())
    assert saved["draws"] == result["draws"]
    draws = result["draws"]
    slots = TRAINED_STEPS * sampler.hard_slots
    assert draws["hard_negatives"] == {"slots": slots, "stored": hard_in_first, "random_fill": 0}
    assert draws["items"] == TRAINED_STEPS * cfg.batch_size
    assert draws["nam"]["stored_noise"] == draws["items"]
    assert draws["nam"]["uniform"] == 0 and draws["nam"]["stored_noise_share"] == 1.0

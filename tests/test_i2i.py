"""Image→image re-identification in the evaluator (MLLMReID): every image of the split that has
another image of its identity is a query, the rest of the split is its gallery, scored by the
same ``rank_metrics`` as text→image."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from pedsynth.engines.clip_preprocess import mean_std_of
from pedsynth.train.data import load_split
from pedsynth.train.datasets import GalleryDataset
from pedsynth.train.evaluate import evaluate
from pedsynth.train.metrics import METRIC_NAMES, image_to_image_metrics, rank_metrics
from pedsynth.train.model import DualEncoder, create_clip
from tests.test_train_data import write_shards
from tests.test_train_loop import tiny

# Unit vectors (so cosines are plain dot products); identities A, A, B, B and one C.
FEATURES = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8], [-1.0, 0.0]])
PIDS = ["A", "A", "B", "B", "C"]


def test_hand_built_case():
    # Cosines: q0→(f1 .8 A, f3 .6, f2 0, f4 -1): hit at 1.  q1→(f3 .96 B, f0 .8 A): match 2nd.
    # q2→(f3 .8 B): hit at 1.  q3→(f1 .96 A, f2 .8 B): match 2nd.  C has one image: no query.
    m = image_to_image_metrics(FEATURES, PIDS)
    assert m["queries"] == 4 and m["gallery"] == 5
    assert m["R1"] == pytest.approx(50.0)
    assert m["R5"] == m["R10"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(100 * (1 + 1 / 2 + 1 + 1 / 2) / 4)  # one match each
    assert m["mINP"] == pytest.approx(75.0)


def test_same_camera_matches_are_junk_when_cameras_are_known():
    # q2 and q3 (B) share camera 0: neither keeps a true match, so neither is a query.
    m = image_to_image_metrics(FEATURES, PIDS, camera_ids=[0, 1, 0, 0, 0])
    assert m["queries"] == 2
    assert m["R1"] == pytest.approx(50.0) and m["mAP"] == pytest.approx(75.0)
    with pytest.raises(ValueError, match="no image has another image"):
        image_to_image_metrics(FEATURES[:3], ["A", "B", "C"])


def test_exclude_removes_items_from_ranking_and_relevance():
    sim = torch.tensor([[0.9, 0.5, 0.1]])
    # Without exclusion item 0 (same identity) is the match at rank 1; excluded, item 2 is
    # the only match and only item 1 is ranked above it.
    excluded = rank_metrics(sim, [1], [1, 0, 1], exclude=torch.tensor([[True, False, False]]))
    assert excluded["R1"] == 0.0 and excluded["mAP"] == pytest.approx(50.0)
    assert rank_metrics(sim, [1], [1, 0, 1])["R1"] == 100.0


def test_evaluator_i2i_equals_rank_metrics_on_hand_computed_features(procedural_small, tmp_path):
    data = write_shards(procedural_small, tmp_path)
    test, _ = load_split(str(data), "test")
    cfg = tiny(data, tmp_path / "run")
    torch.manual_seed(3)
    clip, tokenizer = create_clip(cfg.model)
    model = DualEncoder(clip, 1).eval()
    mean, std = mean_std_of(clip)
    size = tuple(cfg.model.image_size)
    metrics = evaluate(
        model, test, tokenizer, image_size=size, batch_size=7, mean=mean, std=std, i2i=True
    )

    # By hand: gallery features, then each query against the split minus itself.
    loader = DataLoader(GalleryDataset(test, size, mean=mean, std=std), batch_size=5)
    with torch.no_grad():
        feats = torch.cat([model.encode_image(b) for b in loader])
    feats = torch.nn.functional.normalize(feats, dim=1)
    pids = test.image_person
    per_query = []
    for q in range(len(pids)):
        others = [g for g in range(len(pids)) if g != q]
        if pids[q] not in [pids[g] for g in others]:
            continue
        row = (feats[q] @ feats[others].T)[None, :]
        per_query.append(rank_metrics(row, [pids[q]], [pids[g] for g in others]))
    assert metrics["i2i_queries"] == len(per_query) == len(pids)  # 3 images an identity
    for name in METRIC_NAMES:
        expected = sum(m[name] for m in per_query) / len(per_query)
        assert metrics[f"i2i_{name}"] == pytest.approx(expected, abs=1e-6), name
    # Text→image numbers are still there, and i2i can be switched off.
    assert {"R1", "mAP"} <= set(metrics)
    off = evaluate(model, test, tokenizer, image_size=size, mean=mean, std=std)
    assert not any(k.startswith("i2i") for k in off)
    assert Path(data).exists()

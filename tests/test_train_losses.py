"""Each loss against a small case computed by hand; BSS and NAM statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pedsynth.train.losses import (
    MomentumQueues,
    cm_moco_loss,
    id_loss,
    momentum_update,
    sdm_loss,
)
from pedsynth.train.text_aug import CLIP_MASK_TOKEN, choose_caption, nam_mask, nam_probabilities

EPS = 1e-8


def test_sdm_two_identities_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised inside
    # cos = identity matrix; with τ = 1 each row's softmax is [e, 1] / (e + 1).
    p, q = math.e / (math.e + 1), 1 / (math.e + 1)
    row = p * (math.log(p) - math.log(1 + EPS)) + q * (math.log(q) - math.log(EPS))
    expected = 2 * row  # mean over rows (equal) for each of the two directions
    got = sdm_loss(image, text, torch.tensor([7, 9]), tau=1.0)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_sdm_same_identity_uniform_prediction_is_zero():
    # One identity: the label distribution is [1/2, 1/2]; equal cosines predict exactly that.
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    text = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    got = sdm_loss(image, text, torch.tensor([4, 4]), tau=0.02)
    expected = 2 * 2 * 0.5 * (math.log(0.5) - math.log(0.5 + EPS))  # ≈ 0
    assert float(got) == pytest.approx(expected, abs=1e-6)


def test_sdm_default_tau_rewards_matching_pairs():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(6, 8), dim=1)
    ids = torch.arange(6)
    aligned = sdm_loss(feats, feats, ids)
    shuffled = sdm_loss(feats, feats[torch.randperm(6)], ids)
    assert float(aligned) < float(shuffled)


def test_id_loss_by_hand():
    image_logits = torch.tensor([[0.0, math.log(3.0)]])  # p(label 1) = 3/4
    text_logits = torch.tensor([[math.log(4.0), 0.0]])  # p(label 1) = 1/5
    got = id_loss(image_logits, text_logits, torch.tensor([1]))
    assert float(got) == pytest.approx(-math.log(3 / 4) - math.log(1 / 5), rel=1e-6)


def test_cm_moco_removes_same_identity_queue_entries():
    image = torch.tensor([[1.0, 0.0]])
    text = torch.tensor([[0.0, 1.0]])
    m_image = torch.tensor([[0.0, 1.0]])  # key of the text query: cos 1
    m_text = torch.tensor([[1.0, 0.0]])  # key of the image query: cos 1
    image_queue = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text_queue = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    queue_ids = torch.tensor([5, 7])  # entry 1 has the query's identity (7)
    got = cm_moco_loss(
        image, text, m_image, m_text, image_queue, text_queue, queue_ids, torch.tensor([7]), tau=1.0
    )
    # text query: positive cos 1, negatives: queue[0] (cos 0) only → -log(e / (e + 1)).
    # image query: positive cos 1, negatives: text_queue[0] (cos 0) only → same.
    assert float(got) == pytest.approx(-2 * math.log(math.e / (math.e + 1)), rel=1e-6)
    kept = cm_moco_loss(
        image, text, m_image, m_text, image_queue, text_queue, queue_ids, torch.tensor([1]), tau=1.0
    )
    # Other identity: both queue entries are negatives (cos 0 and cos 1).
    assert float(kept) == pytest.approx(-2 * math.log(math.e / (2 * math.e + 1)), rel=1e-6)


def test_momentum_queue_wraps_and_counts():
    queues = MomentumQueues(dim=2, size=3)
    assert queues.current()[2].numel() == 0
    queues.push(torch.ones(2, 2), torch.ones(2, 2), torch.tensor([1, 2]))
    queues.push(torch.ones(2, 2), torch.ones(2, 2), torch.tensor([3, 4]))
    image, _, ids = queues.current()
    assert ids.tolist() == [4, 2, 3]  # 4 overwrote the oldest (1)
    assert torch.allclose(image.norm(dim=1), torch.ones(3))
    assert int(queues.pointer) == 1


def test_momentum_update_by_hand():
    online, momentum = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    online.weight.data.fill_(1.0)
    momentum.weight.data.fill_(0.0)
    momentum_update(online, momentum, m=0.9)
    assert float(momentum.weight.detach()) == pytest.approx(0.1)


def test_bss_frequency_matches_beta():
    rng = np.random.default_rng(0)
    n = 20_000
    used = sum(choose_caption(["o1", "o2"], ["a1"], 0.2, rng)[1] for _ in range(n))
    assert abs(used / n - 0.2) < 0.015  # ~5 standard deviations
    assert not any(choose_caption(["o"], ["a"], 0.0, rng)[1] for _ in range(200))
    assert not any(choose_caption(["o"], [], 1.0, rng)[1] for _ in range(200))
    assert choose_caption([], ["a"], 0.0, rng) == ("a", True)
    with pytest.raises(ValueError, match="beta"):
        choose_caption(["o"], ["a"], 1.5, rng)


def test_nam_probabilities_formula():
    r = np.array([0.1, 0.2, 0.9])
    expected = np.clip(r - r.mean() + 0.15, 0, 1)
    assert np.allclose(nam_probabilities(r, 3), expected)
    assert np.allclose(nam_probabilities(None, 4), 0.15)
    assert np.allclose(nam_probabilities(r, 5), [*expected, 0.15, 0.15])  # uncovered tokens


def test_nam_mask_rate_matches_p_and_follows_noise():
    rng = np.random.default_rng(1)
    r = np.linspace(0.0, 0.3, 10)  # mean 0.15 → r' = r exactly
    probs = nam_probabilities(r, 10, p=0.15)
    ids = np.arange(100, 110)
    trials = 20_000
    selected = np.zeros(10)
    outcome = {"mask": 0, "same": 0, "random": 0}
    for _ in range(trials):
        new, chosen = nam_mask(ids, probs, rng)
        selected += chosen
        outcome["mask"] += int((new[chosen] == CLIP_MASK_TOKEN).sum())
        outcome["same"] += int((new[chosen] == ids[chosen]).sum())
        assert (new[~chosen] == ids[~chosen]).all()
    rates = selected / trials
    assert abs(rates.mean() - 0.15) < 0.01
    assert np.allclose(rates, probs, atol=0.02)  # follows r token by token
    assert np.corrcoef(rates, r)[0, 1] > 0.95
    total = selected.sum()
    assert abs(outcome["mask"] / total - 0.8) < 0.02
    assert abs(outcome["same"] / total - 0.1) < 0.02


def test_batch_hard_triplet_by_hand():
    from pedsynth.train.losses import batch_hard_triplet_loss

    f = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])  # unit vectors
    ids = torch.tensor([0, 0, 1, 1])
    # Distances: d01 √0.8, d02 √2, d03 2, d12 √0.4, d13 √3.2, d23 √2. Per anchor
    # max(0, hardest positive − hardest negative + 0.3):
    # a0: √0.8 − √2 + .3 < 0;  a1: √0.8 − √0.4 + .3;  a2: √2 − √0.4 + .3;  a3: √2 − √3.2 + .3 < 0
    expected = ((0.8**0.5 - 0.4**0.5 + 0.3) + (2**0.5 - 0.4**0.5 + 0.3)) / 4
    assert float(batch_hard_triplet_loss(f, ids, margin=0.3)) == pytest.approx(expected, abs=1e-5)
    # No anchor with a positive: zero, still differentiable.
    lonely = torch.randn(3, 4, requires_grad=True)
    zero = batch_hard_triplet_loss(lonely, torch.tensor([0, 1, 2]))
    zero.backward()
    assert float(zero.detach()) == 0.0 and lonely.grad is not None


@pytest.mark.parametrize("switch", ["image_id", "image_triplet"])
def test_image_reid_losses_are_finite_have_gradients_and_decrease(switch):
    from pedsynth.schemas.train import LossConfig
    from pedsynth.train.losses import weighted_losses

    torch.manual_seed(0)
    cfg = LossConfig(sdm=False, id=False, **{switch: True})
    image = torch.randn(8, 6, requires_grad=True)
    text = torch.randn(8, 6)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    classifier = torch.nn.Linear(6, 4)
    optimizer = torch.optim.SGD([image, *classifier.parameters()], lr=0.5)
    values = []
    for _ in range(20):
        parts = weighted_losses(cfg, classifier, image, text, labels)
        assert set(parts) == {switch}
        loss = parts[switch]
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        assert float(loss) == 0.0 or image.grad.abs().sum() > 0
        optimizer.step()
        values.append(float(loss))
    assert values[0] > 0 and values[-1] < values[0]

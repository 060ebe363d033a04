"""rank_metrics against hand-ranked cases and IRRA's own formulation; the two re-rankers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pedsynth.train.metrics import (
    k_reciprocal_rerank,
    parse_ranking,
    rank_metrics,
    rerank_with_model,
)


def irra_rank(similarity: torch.Tensor, q_pids: torch.Tensor, g_pids: torch.Tensor) -> dict:
    """IRRA's ``rank`` (utils/metrics.py), with a stable sort so ties are deterministic."""
    indices = torch.argsort(similarity, dim=1, descending=True, stable=True)
    matches = g_pids[indices].eq(q_pids.view(-1, 1))
    cmc = matches[:, :10].cumsum(1)
    cmc[cmc > 1] = 1
    cmc = cmc.float().mean(0) * 100
    num_rel = matches.sum(1)
    tmp = matches.cumsum(1)
    inp = [tmp[i][row.nonzero()[-1]] / (row.nonzero()[-1] + 1.0) for i, row in enumerate(matches)]
    tmp = torch.stack([tmp[:, i] / (i + 1.0) for i in range(tmp.shape[1])], 1) * matches
    return {
        "R1": float(cmc[0]),
        "R5": float(cmc[4]),
        "R10": float(cmc[9]),
        "mAP": float((tmp.sum(1) / num_rel).mean() * 100),
        "mINP": float(torch.cat(inp).mean() * 100),
    }


def test_hand_ranked_cases_with_ties_and_several_gallery_images():
    gallery = ["B", "A", "C", "A"]
    sim = np.array(
        [
            [0.9, 0.8, 0.7, 0.1],  # A: ranking B A C A → relevant at ranks 2 and 4
            [0.1, 0.2, 0.9, 0.3],  # C: C first
            [0.5, 0.5, 0.5, 0.5],  # B: all tied → gallery order → B first
            [0.5, 0.5, 0.5, 0.5],  # A: all tied → A at ranks 2 and 4
        ]
    )
    queries = ["A", "C", "B", "A"]
    m = rank_metrics(sim, queries, gallery)
    ap = [(1 / 2 + 2 / 4) / 2, 1.0, 1.0, (1 / 2 + 2 / 4) / 2]
    inp = [2 / 4, 1.0, 1.0, 2 / 4]
    assert m["R1"] == pytest.approx(50.0)
    assert m["R5"] == pytest.approx(100.0) and m["R10"] == pytest.approx(100.0)
    assert m["mAP"] == pytest.approx(100 * np.mean(ap))
    assert m["mINP"] == pytest.approx(100 * np.mean(inp))


def test_rank_beyond_five_counts_for_r10_only():
    sim = np.array([[-(i + 1.0) for i in range(12)]])  # gallery ranked in index order
    gallery = [0] * 6 + [1] + [0] * 5  # the only match at rank 7
    m = rank_metrics(sim, [1], gallery)
    assert (m["R1"], m["R5"], m["R10"]) == (0.0, 0.0, 100.0)
    assert m["mAP"] == pytest.approx(100 / 7) and m["mINP"] == pytest.approx(100 / 7)


def test_matches_irra_on_random_data_with_ties_numpy_and_torch():
    rng = np.random.default_rng(3)
    gallery = rng.integers(0, 40, 300)
    gallery[:40] = np.arange(40)
    queries = rng.integers(0, 40, 500)
    sim = np.round(rng.standard_normal((500, 300)), 1).astype(np.float32)  # many ties
    expected = irra_rank(
        torch.from_numpy(sim), torch.from_numpy(queries), torch.from_numpy(gallery)
    )
    for args in [
        (sim, queries, gallery),
        (torch.from_numpy(sim), torch.from_numpy(queries), torch.from_numpy(gallery)),
        (sim.astype(np.float64), queries.astype(str), gallery.astype(str)),
    ]:
        got = rank_metrics(*args)
        for key, value in expected.items():
            assert got[key] == pytest.approx(value, abs=1e-4), key


def test_query_without_gallery_match_is_a_clear_error():
    with pytest.raises(ValueError, match=r"1 of 2 queries have no gallery item.*id Z"):
        rank_metrics(np.zeros((2, 2)), ["A", "Z"], ["A", "B"])


def test_bad_shapes_and_values_are_clear_errors():
    with pytest.raises(ValueError, match="shape mismatch"):
        rank_metrics(np.zeros((2, 3)), [0, 1], [0, 1])
    with pytest.raises(ValueError, match="NaN"):
        rank_metrics(np.array([[np.nan, 0.0]]), [0], [0, 1])
    with pytest.raises(ValueError, match="matrix"):
        rank_metrics(np.zeros(3), [0], [0, 1, 2])


def _jaccard_reference(qf: torch.Tensor, gf: torch.Tensor, k: int, weight: float) -> torch.Tensor:
    """TextReID's loop-based formulation."""
    qg, gg = qf @ gf.T, gf @ gf.T
    q_nn = torch.argsort(qg, dim=1, descending=True, stable=True)[:, :k].tolist()
    g_nn = torch.argsort(gg, dim=1, descending=True, stable=True)[:, :k].tolist()
    jac = torch.tensor([[len(set(a) & set(b)) / len(set(a) | set(b)) for b in g_nn] for a in q_nn])
    return qg + weight * jac


def test_k_reciprocal_matches_set_based_jaccard():
    rng = np.random.default_rng(0)
    qf = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((7, 4))).float(), dim=1)
    gf = torch.nn.functional.normalize(torch.from_numpy(rng.standard_normal((9, 4))).float(), dim=1)
    got = k_reciprocal_rerank(qf, gf, k=3, weight=0.05)
    assert torch.allclose(got, _jaccard_reference(qf, gf, 3, 0.05), atol=1e-6)
    assert not torch.allclose(got, qf @ gf.T)  # the term does something


def test_k_reciprocal_hand_case():
    # Gallery: g0 and g1 close together, g2 far. Query near g0. k = 2.
    gf = torch.tensor([[1.0, 0.0], [0.96, 0.28], [0.0, 1.0]])
    qf = torch.tensor([[1.0, 0.0]])
    got = k_reciprocal_rerank(qf, gf, k=2, weight=0.5)
    # top2(q) = {g0, g1}; top2(g0) = {g0, g1}; top2(g1) = {g1, g0}; top2(g2) = {g2, g1}
    expected = torch.tensor([[1.0 + 0.5 * 1.0, 0.96 + 0.5 * 1.0, 0.0 + 0.5 * (1 / 3)]])
    assert torch.allclose(got, expected, atol=1e-6)
    with pytest.raises(ValueError, match="k = 4"):
        k_reciprocal_rerank(qf, gf, k=4)


def test_parse_ranking_good_partial_garbage():
    assert parse_ranking("3, 1, 2", 3).order == [2, 0, 1]
    assert parse_ranking("[2] > [3] > [1]", 3).complete
    partial = parse_ranking("Image 3 is best, then 3 again and 9", 3)
    assert partial.order == [2, 0, 1] and partial.parsed and not partial.complete
    garbage = parse_ranking("I cannot tell.", 3)
    assert garbage.order == [0, 1, 2] and not garbage.parsed


def test_rerank_with_model_keeps_index_order_on_failure_and_reports_rates():
    sim = torch.tensor([[0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1], [0.9, 0.8, 0.7, 0.1]])
    answers = {"good": "3, 2, 1", "garbage": "no idea", "boom": None}

    def ranker(query: str, images: list) -> str:
        assert len(images) == 3 and images[0] == "img0"
        if answers[query] is None:
            raise RuntimeError("model server down")
        return answers[query]

    new, stats = rerank_with_model(
        sim, ["good", "garbage", "boom"], [f"img{i}" for i in range(4)], ranker, top_k=3
    )
    order = torch.argsort(new, dim=1, descending=True, stable=True)
    assert order[0].tolist() == [2, 1, 0, 3]
    assert order[1].tolist() == [0, 1, 2, 3] and order[2].tolist() == [0, 1, 2, 3]
    assert stats["parse_failure_rate"] == pytest.approx(2 / 3)
    assert stats["error_rate"] == pytest.approx(1 / 3)
    m = rank_metrics(new, [2, 0, 0], [0, 1, 2, 3])
    assert m["R1"] == pytest.approx(100.0)

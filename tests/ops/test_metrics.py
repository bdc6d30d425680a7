"""Full-ranking metrics against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recstream.eval.metrics import evaluate, metrics_from_ranks, rank_cases, target_ranks

# 5 items, 3 users. Row 0: target item 2 (score .5) is below items 0 (.9) and 3 (.7) -> rank 2.
SCORES = np.array(
    [
        [0.9, 0.1, 0.5, 0.7, 0.2],
        [0.1, 0.2, 0.3, 0.4, 0.5],
        [0.3, 0.3, 0.3, 0.3, 0.3],
    ],
    dtype=np.float32,
)
TARGETS = np.array([2, 4, 1])


def test_ranks_by_hand() -> None:
    # row 1: target 4 is the best -> 0; row 2: all tied -> pessimistic, after the 4 others -> 4
    assert target_ranks(SCORES, TARGETS).tolist() == [2, 0, 4]


def test_exclusion_of_seen_items() -> None:
    # row 0 saw items 0 and 3 -> only items 1, 4 remain beside the target: rank 0
    # row 2 saw 0, 2, 3 -> ties with item 4 only -> rank 1
    # the target is never excluded even when listed as seen (repeat consumption): row 1
    ranks = target_ranks(SCORES, TARGETS, exclude=[np.array([0, 3]), np.array([4, 3]), [0, 2, 3]])
    assert ranks.tolist() == [0, 0, 1]


def test_torch_input_nan_and_inf() -> None:
    s = torch.tensor([[np.nan, 1.0, 2.0, np.inf], [np.nan, 0.0, 0.0, 0.0]])
    # row 0: target 2 is below +inf only; NaN ranks last -> rank 1
    # row 1: target is NaN -> below every finite item -> rank 3
    assert target_ranks(s, [2, 0]).tolist() == [1, 3]


def test_metric_values_by_hand() -> None:
    m = metrics_from_ranks(np.array([2, 0, 4]), ks=(1, 3))
    assert m["HR@1"] == pytest.approx(1 / 3)
    assert m["HR@3"] == pytest.approx(2 / 3)
    assert m["Recall@3"] == m["HR@3"]
    assert m["NDCG@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert m["NDCG@3"] == pytest.approx((1 / math.log2(4) + 1 / math.log2(2) + 0) / 3)
    assert m["MRR"] == pytest.approx((1 / 3 + 1 + 1 / 5) / 3)
    assert math.isnan(metrics_from_ranks(np.array([]))["MRR"])


def test_batched_scorer_matches_matrix() -> None:
    rng = np.random.default_rng(0)
    full = rng.random((37, 11))
    targets = rng.integers(0, 11, 37)
    hist = [rng.choice(11, size=rng.integers(0, 5), replace=False) for _ in range(37)]

    def score(users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        assert len(users) <= 8
        return full[users]

    batched = rank_cases(score, np.arange(37), hist, targets, batch_size=8)
    assert np.array_equal(batched, target_ranks(full, targets, hist))

    class Cases:
        users, histories = np.arange(37), hist

    Cases.targets = targets
    out = evaluate(score, Cases, ks=(10,), batch_size=8)
    assert out["n_cases"] == 37
    assert out["HR@10"] == pytest.approx(float((batched < 10).mean()))


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="targets"):
        target_ranks(SCORES, [0, 1])
    with pytest.raises(ValueError, match=r"\[batch, n_items\]"):
        target_ranks(np.zeros(5), [0])

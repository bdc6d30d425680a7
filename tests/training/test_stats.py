"""Intervals behind the quality table: over seeds, and paired over the same cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recstream.eval.stats import mean_ci95, ndcg_gains, paired_difference


def test_mean_ci95_matches_the_t_interval() -> None:
    mean, lo, hi = mean_ci95([0.10, 0.12, 0.11])
    assert mean == pytest.approx(0.11)
    # t(0.975, 2) = 4.3027, sd = 0.01, n = 3
    assert hi - mean == pytest.approx(4.3027 * 0.01 / np.sqrt(3), rel=1e-3)
    assert mean - lo == pytest.approx(hi - mean)
    single = mean_ci95([0.2])
    assert single[0] == 0.2 and np.isnan(single[1]) and np.isnan(single[2])


def test_ndcg_gains() -> None:
    np.testing.assert_allclose(ndcg_gains(np.array([0, 1, 9, 10, 500])), [1.0, 1 / np.log2(3), 1 / np.log2(11), 0, 0])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 60), min_size=3, max_size=80), st.integers(1, 4))
def test_paired_difference_against_itself_is_zero(ranks: list[int], n_seeds: int) -> None:
    r = [np.asarray(ranks)] * n_seeds
    p = paired_difference(r, r)
    assert p["diff"] == 0 and p["seeds_won"] == 0 and p["seeds_compared"] == n_seeds


def test_paired_difference_sees_a_consistent_win_and_counts_seeds() -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 40, size=400)
    better = [np.maximum(base - 3, 0), np.maximum(base - 2, 0), base + 1]  # third seed loses
    p = paired_difference(better, [base, base, base])
    assert p["diff"] > 0 and p["ci95"][0] > 0
    assert p["seeds_won"] == 2 and p["seeds_compared"] == 3 and p["n_cases"] == 400
    swapped = paired_difference([base] * 3, better)
    assert swapped["diff"] == pytest.approx(-p["diff"]) and swapped["ci95"][1] < 0


def test_paired_difference_refuses_different_cases() -> None:
    with pytest.raises(ValueError, match="different cases"):
        paired_difference([np.zeros(5)], [np.zeros(6)])

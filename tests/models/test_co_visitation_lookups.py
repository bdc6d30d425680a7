"""The co-visitation lookups read the CSR arrays directly (serving calls them four times a request);
they must give, to the bit, what scipy's sub-matrices give, so that a ranker trained before keeps
the features it learned from and offline figures do not move."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from hypothesis import given, settings
from hypothesis import strategies as st

from recstream.models.co_visitation import UNKNOWN, CoVisitation, _co_visit_window, _follow_window

N_ITEMS = 40
IDS = [f"i{n}" for n in range(N_ITEMS)]

items = st.integers(0, N_ITEMS - 1)
sequences = st.lists(st.lists(items, min_size=1, max_size=30).map(np.array), min_size=1, max_size=25)
histories = st.lists(st.integers(UNKNOWN, N_ITEMS - 1), max_size=60).map(lambda h: np.array(h, dtype=np.int64))
candidates = st.lists(items, max_size=50).map(lambda c: np.array(c, dtype=np.int64))


def _best_by_scipy(rows: sp.coo_matrix, weights: np.ndarray, n: int, exclude: np.ndarray) -> np.ndarray:
    items_, inverse = np.unique(rows.col, return_inverse=True)
    summed = np.bincount(inverse, weights=rows.data * weights[rows.row], minlength=len(items_))
    keep = ~np.isin(items_, exclude)
    items_, summed = items_[keep], summed[keep]
    return items_[np.lexsort((items_, -summed))][:n]


def _by_scipy(stat: CoVisitation, history: np.ndarray, cand: np.ndarray, n: int, exclude: np.ndarray) -> list:
    recent = _co_visit_window(history)
    follow, weights = _follow_window(history)
    scores = np.zeros(len(cand))
    follows = np.zeros(len(cand))
    top = follow_top = np.zeros(0, np.int64)
    if len(recent) and len(cand):
        scores = np.asarray(stat.sim[recent][:, cand].sum(axis=0), dtype=np.float64).ravel()
    if len(follow) and len(cand):
        follows = np.asarray(weights @ stat.follows[follow][:, cand].toarray(), dtype=np.float64).ravel()
    if len(recent) and n > 0:
        top = _best_by_scipy(stat.sim[recent].tocoo(), np.ones(len(recent)), n, exclude)
    if len(follow) and n > 0:
        follow_top = _best_by_scipy(stat.follows[follow].tocoo(), weights, n, exclude)
    return [scores, follows, top, follow_top]


@settings(max_examples=150, deadline=None)
@given(sequences, histories, candidates, st.integers(0, N_ITEMS + 5), candidates)
def test_lookups_equal_scipy_sub_matrices_to_the_bit(
    seqs: list[np.ndarray], history: np.ndarray, cand: np.ndarray, n: int, exclude: np.ndarray
) -> None:
    stat = CoVisitation.fit(seqs, IDS)
    ours = [
        stat.scores_idx(history, cand),
        stat.follow_scores_idx(history, cand),
        stat.top_idx(history, n, exclude),
        stat.follow_top_idx(history, n, exclude),
    ]
    for name, got, want in zip(
        ("scores", "follows", "top", "follow_top"), ours, _by_scipy(stat, history, cand, n, exclude), strict=True
    ):
        assert np.array_equal(got, want), (name, got, want)


def test_top_keeps_every_tie_at_the_cut_in_index_order() -> None:
    # items 1, 2 and 3 are each co-visited with 0 by one user alike: a tie that a cut at 2 must break by index
    stat = CoVisitation.fit([np.array([0, 3]), np.array([0, 1]), np.array([0, 2])], IDS)
    everything = stat.top_idx(np.array([0]), N_ITEMS)
    assert everything[:3].tolist() == [1, 2, 3]
    for n in range(1, 4):
        assert stat.top_idx(np.array([0]), n).tolist() == everything[:n].tolist()
    assert stat.top_idx(np.array([0]), 2, exclude=np.array([1])).tolist() == [2, 3]

"""Item-to-item co-visitation: which items the same users interacted with, as a ranker feature
and as a second candidate source beside the vector search.

A sequential model of item vectors misses what plain co-occurrence counting sees: on ml-100k,
adding log(1 + co-visitation) to the served two-tower's retrieval score (weight chosen on
validation) lifts validation NDCG@10 0.112 -> 0.130 and test 0.098 -> 0.104 (seed 0). The
similarity is the item-knn baseline's (cosine over distinct users, shrunk towards 0 for items with
few users in common, the `topk` strongest neighbours of each item kept), so the ranker can be
judged against that baseline with the same statistic in hand.

The statistic travels with the ranker weights that learned to use it (`co_visitation.npz` in the
ranker's version folder): the worker reads the file of the version Triton serves, the continual
trainer carries it to the versions it derives, and training, offline scoring and serving all call
`CoVisitation.scores_idx`.

Beside it the statistic holds which items *followed* which (`follows`, directed): an ID sequence
model such as SASRec learns the order of a user's items, which neither the session vector nor the
undirected similarity keeps. Summed over the session's last items with a recency decay
(`CoVisitation.follow_scores_idx`), it is the ranker's `follows` feature and a third candidate
source. Its window and decays were chosen on validation among 24 settings (fused with the served
ranker's score, ml-100k seeds 0 and 1); with it the ranker's validation NDCG@10 rose 0.1336 ->
0.1376, 0.1240 -> 0.1347 and 0.1295 -> 0.1334 (seeds 0, 1, 2; bench/README.md has the test figures).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import scipy.sparse as sp

#: Most recent history items a candidate's co-visitation is summed over (the session keeps 50).
CO_VISIT_WINDOW = 50
#: Neighbours kept per item, and the shrink term of the cosine (the item-knn baseline's values).
TOPK = 100
SHRINK = 10.0
#: An item "follows" another when it comes at most FOLLOW_LAGS positions later in a user's sequence,
#: weighted FOLLOW_LAG_DECAY ** (lag - 1); the feature sums over the session's last FOLLOW_WINDOW
#: items, the k-th most recent weighted FOLLOW_RECENCY_DECAY ** (k - 1). Chosen on validation
#: (ml-100k, seeds 0 and 1, lags 1/3/5/10 x window 1/3/10 x two normalisations).
FOLLOW_LAGS = 5
FOLLOW_LAG_DECAY = 0.7
FOLLOW_WINDOW = 10
FOLLOW_RECENCY_DECAY = 0.8


def binary_matrix(seqs: Sequence[np.ndarray], n_items: int) -> sp.csr_matrix:
    """[len(seqs), n_items] with 1 where the sequence holds the item (repeats count once)."""
    lens = [len(s) for s in seqs]
    rows = np.repeat(np.arange(len(seqs)), lens)
    cols = np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs]) if sum(lens) else np.zeros(0, np.int64)
    m = sp.csr_matrix((np.ones(len(cols), np.float32), (rows, cols)), shape=(len(seqs), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m


def topk_per_row(m: sp.csr_matrix, k: int) -> sp.csr_matrix:
    """Keep the k largest entries of each row."""
    m = m.tocsr()
    rows, cols, vals = [], [], []
    for r in range(m.shape[0]):
        lo, hi = m.indptr[r], m.indptr[r + 1]
        if hi == lo:
            continue
        d, c = m.data[lo:hi], m.indices[lo:hi]
        if hi - lo > k:
            keep = np.argpartition(-d, k)[:k]
            d, c = d[keep], c[keep]
        rows.append(np.full(len(c), r))
        cols.append(c)
        vals.append(d)
    if not rows:
        return sp.csr_matrix(m.shape, dtype=np.float32)
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=m.shape, dtype=np.float32
    )


def item_similarity(user_items: sp.spmatrix, topk: int = TOPK, shrink: float = SHRINK) -> sp.csr_matrix:
    """[n_items, n_items]: row h holds the items whose top-`topk` neighbours include h, so that
    `history_rows @ sim` scores every item by its similarity to the history (item-knn's score)."""
    x = sp.csc_matrix(user_items, dtype=np.float32)
    co = (x.T @ x).tocsr()  # item x item: users in common
    norms = np.sqrt(np.asarray(x.sum(axis=0)).ravel())
    co.setdiag(0)
    co.eliminate_zeros()
    co = co.tocoo()
    denom = norms[co.row] * norms[co.col] + shrink + 1e-8
    sim = sp.csr_matrix((co.data / denom, (co.row, co.col)), shape=co.shape)
    return topk_per_row(sim, topk).T.tocsr()


def follow_matrix(
    seqs: Sequence[np.ndarray], n_items: int, lags: int = FOLLOW_LAGS, decay: float = FOLLOW_LAG_DECAY
) -> sp.csr_matrix:
    """[n_items, n_items]: row a holds how often each item came within `lags` positions after a
    (weighted `decay ** (lag - 1)`), divided by the row's total + 1: the share of what follows a,
    shrunk for items with little to go on. The `TOPK` largest entries of each row are kept."""
    rows, cols, vals = [], [], []
    for s in seqs:
        s = np.asarray(s, dtype=np.int64)
        for lag in range(1, min(lags, len(s) - 1) + 1):
            rows.append(s[:-lag])
            cols.append(s[lag:])
            vals.append(np.full(len(s) - lag, decay ** (lag - 1), np.float32))
    if not rows:
        return sp.csr_matrix((n_items, n_items), dtype=np.float32)
    m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_items, n_items))
    m.sum_duplicates()
    totals = np.asarray(m.sum(axis=1)).ravel() + 1.0
    m = sp.diags(1.0 / totals) @ m
    return topk_per_row(m.tocsr(), TOPK)


class CoVisitation:
    """The similarity above over one catalogue's item ids, with string-keyed lookups for serving."""

    FILE = "co_visitation.npz"

    def __init__(self, item_ids: Sequence[str], sim: sp.csr_matrix, follows: sp.csr_matrix | None = None) -> None:
        """`follows` None: a statistic saved before it existed; its follows feature is 0."""
        n = len(item_ids)
        for name, m in (("similarity", sim), ("follows", follows)):
            if m is not None and m.shape != (n, n):
                raise ValueError(f"{name} is {m.shape}, expected {n} x {n} items")
        self.item_ids = [str(i) for i in item_ids]
        self.index = {item: i for i, item in enumerate(self.item_ids)}
        self.sim = sim.tocsr()
        self.follows = follows.tocsr() if follows is not None else None

    @classmethod
    def fit(cls, train_seqs: Sequence[np.ndarray], item_ids: Sequence[str]) -> CoVisitation:
        n = len(item_ids)
        return cls(item_ids, item_similarity(binary_matrix(train_seqs, n)), follow_matrix(train_seqs, n))

    def scores_idx(self, history: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """Summed similarity [len(cand)] of each candidate to the distinct items among the last
        CO_VISIT_WINDOW of `history` (item indices, oldest first)."""
        cand = np.asarray(cand, dtype=np.int64)
        recent = _co_visit_window(history)
        if not len(recent) or not len(cand):
            return np.zeros(len(cand), np.float64)
        columns, inverse = np.unique(cand, return_inverse=True)
        _, at, values = _entries_in(self.sim, recent, columns)
        summed = np.zeros(len(columns), np.float32)
        np.add.at(summed, at, values)  # float32, row by row: the sum a scipy sub-matrix gives, to the bit
        return summed[inverse].astype(np.float64)

    def follow_scores_idx(self, history: np.ndarray, cand: np.ndarray) -> np.ndarray:
        """How much each candidate [len(cand)] followed the last FOLLOW_WINDOW items of `history`
        (item indices, oldest first) in training, the k-th most recent weighted
        FOLLOW_RECENCY_DECAY ** (k - 1)."""
        cand = np.asarray(cand, dtype=np.int64)
        recent, weights = _follow_window(history)
        if self.follows is None or not len(recent) or not len(cand):
            return np.zeros(len(cand), np.float64)
        columns, inverse = np.unique(cand, return_inverse=True)
        row, at, values = _entries_in(self.follows, recent, columns)
        dense = np.zeros((len(recent), len(columns)), np.float32)
        dense[row, at] = values
        return np.asarray(weights @ dense[:, inverse], dtype=np.float64)

    def top_idx(self, history: np.ndarray, n: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """The `n` items (indices, best first) most co-visited with the last CO_VISIT_WINDOW of
        `history`, none of `exclude`; fewer when fewer have any co-visitation. Touches only the
        history rows' neighbours (at most TOPK each), not the whole catalogue."""
        recent = _co_visit_window(history)
        if n <= 0 or not len(recent):
            return np.zeros(0, np.int64)
        return _best(*_row_entries(self.sim, recent), np.ones(len(recent)), n, exclude, len(self.item_ids))

    def follow_top_idx(self, history: np.ndarray, n: int, exclude: np.ndarray | None = None) -> np.ndarray:
        """The `n` items (indices, best first) that most followed the last FOLLOW_WINDOW of
        `history` (the follows feature's value), none of `exclude`."""
        recent, weights = _follow_window(history)
        if n <= 0 or not len(recent) or self.follows is None:
            return np.zeros(0, np.int64)
        return _best(*_row_entries(self.follows, recent), weights, n, exclude, len(self.item_ids))

    def top(self, history: Sequence[str], n: int, exclude: Sequence[str] = ()) -> list[str]:
        """`top_idx` by item id (serving: the session's recent ids, the ids already retrieved)."""
        return self._top_by_id(self.top_idx, history, n, exclude)

    def follow_top(self, history: Sequence[str], n: int, exclude: Sequence[str] = ()) -> list[str]:
        """`follow_top_idx` by item id."""
        return self._top_by_id(self.follow_top_idx, history, n, exclude)

    def _top_by_id(
        self,
        top_idx: Callable[[np.ndarray, int, np.ndarray], np.ndarray],
        history: Sequence[str],
        n: int,
        exclude: Sequence[str],
    ) -> list[str]:
        hist = self._history_idx(history)
        skip = np.array([self.index[i] for i in exclude if i in self.index], dtype=np.int64)
        return [self.item_ids[i] for i in top_idx(hist, n, skip)]

    def scores(self, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """`scores_idx` by item id; items this statistic has never seen score 0 and add nothing."""
        return self._by_id(self.scores_idx, history, candidates)

    def follow_scores(self, history: Sequence[str], candidates: Sequence[str]) -> np.ndarray:
        """`follow_scores_idx` by item id (the session's recent ids, oldest first)."""
        return self._by_id(self.follow_scores_idx, history, candidates)

    def _by_id(
        self,
        score_idx: Callable[[np.ndarray, np.ndarray], np.ndarray],
        history: Sequence[str],
        candidates: Sequence[str],
    ) -> np.ndarray:
        hist = self._history_idx(history)
        known = np.array([self.index.get(c, -1) for c in candidates], dtype=np.int64)
        out = np.zeros(len(known), np.float64)
        mask = known >= 0
        if mask.any() and len(hist):
            out[mask] = score_idx(hist, known[mask])
        return out

    def _history_idx(self, history: Sequence[str]) -> np.ndarray:
        """Item indices of `history`, UNKNOWN for an item this statistic has never seen: it keeps its
        place in the windows (as an item without training data does offline) and adds nothing."""
        return np.array([self.index.get(i, UNKNOWN) for i in history], dtype=np.int64)

    def save(self, folder: Path) -> Path:
        path = Path(folder) / self.FILE
        arrays = {"item_ids": np.asarray(self.item_ids, dtype=np.str_), **_csr_arrays(self.sim, "")}
        if self.follows is not None:
            arrays |= _csr_arrays(self.follows, "follows_")
        np.savez_compressed(path, **arrays)
        return path

    @classmethod
    def load(cls, folder: Path) -> CoVisitation | None:
        """The statistic saved in `folder`, or None when there is none (a ranker trained without it)."""
        path = Path(folder) / cls.FILE
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as z:
            ids = z["item_ids"].tolist()
            shape = (len(ids), len(ids))
            sim = sp.csr_matrix((z["data"], z["indices"], z["indptr"]), shape=shape)
            follows = None
            if "follows_data" in z:
                follows = sp.csr_matrix((z["follows_data"], z["follows_indices"], z["follows_indptr"]), shape=shape)
        return cls(ids, sim, follows)


#: The index of an item the statistic has never seen (a history entry newer than its training).
UNKNOWN = -1


def _co_visit_window(history: np.ndarray) -> np.ndarray:
    """The distinct known items among the last CO_VISIT_WINDOW of `history`."""
    recent = np.unique(np.asarray(history, dtype=np.int64)[-CO_VISIT_WINDOW:])
    return recent[recent != UNKNOWN]


def _follow_window(history: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the known items among the last FOLLOW_WINDOW of `history`, most recent first; their weights,
    the k-th most recent entry FOLLOW_RECENCY_DECAY ** (k - 1), unknown entries counting)."""
    recent = np.asarray(history, dtype=np.int64)[-FOLLOW_WINDOW:][::-1]
    weights = FOLLOW_RECENCY_DECAY ** np.arange(len(recent), dtype=np.float64)
    known = recent != UNKNOWN
    return recent[known], weights[known]


def _row_entries(m: sp.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position in `rows`, column, value) of every stored entry of those rows, row by row in CSR
    order. Read off the CSR arrays: scipy's fancy indexing builds a sub-matrix per call, and those
    calls were most of a request's co-visitation time."""
    rows = np.asarray(rows, dtype=np.int64)
    starts = m.indptr[rows].astype(np.int64)
    lengths = m.indptr[rows + 1] - starts
    row = np.repeat(np.arange(len(rows)), lengths)
    offsets = np.arange(int(lengths.sum())) + np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return row, m.indices[offsets].astype(np.int64), m.data[offsets]


def _entries_in(m: sp.csr_matrix, rows: np.ndarray, columns: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(position in `rows`, position in `columns`, value) of the stored entries of those rows that
    fall in `columns` (distinct), row by row."""
    row, col, values = _row_entries(m, rows)
    position = np.full(m.shape[1], -1, dtype=np.int64)  # a catalogue-sized lookup beats a search
    position[columns] = np.arange(len(columns))
    at = position[col]
    hit = at >= 0
    return row[hit], at[hit], values[hit]


def _best(
    row: np.ndarray,
    col: np.ndarray,
    values: np.ndarray,
    row_weights: np.ndarray,
    n: int,
    exclude: np.ndarray | None,
    n_items: int,
) -> np.ndarray:
    """The `n` columns (best first) of the weighted sum of the entries (`_row_entries`), none of
    `exclude`. Ordered by score, ties by index: the first n are the same whatever n is asked, which
    serving (over-fetching for its filters) relies on."""
    summed = np.bincount(col, weights=values * row_weights[row], minlength=n_items)
    touched = np.zeros(n_items, dtype=bool)
    touched[col] = True
    if exclude is not None and len(exclude):
        exclude = np.asarray(exclude, dtype=np.int64)
        touched[exclude[(exclude >= 0) & (exclude < n_items)]] = False
    items = np.flatnonzero(touched)
    scores = summed[items]
    if n < len(items):  # only what can reach the first n (every tie at the n-th score) is sorted
        kept = scores >= np.partition(scores, len(scores) - n)[len(scores) - n]
        items, scores = items[kept], scores[kept]
    return items[np.lexsort((items, -scores))][:n].astype(np.int64)


def _csr_arrays(m: sp.csr_matrix, prefix: str) -> dict[str, np.ndarray]:
    return {
        f"{prefix}data": m.data.astype(np.float32),
        f"{prefix}indices": m.indices.astype(np.int32),
        f"{prefix}indptr": m.indptr.astype(np.int64),
    }

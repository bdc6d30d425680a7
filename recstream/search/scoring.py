"""Search scores over the whole catalogue: BM25 (bm25s), dense dot products, and their fusion.

Every signal is standardised per query (z-score over the catalogue) before a weighted sum, so one
weight means the same thing for BM25's unbounded scores, cosine similarities and log-popularity
(convex combination after normalisation; Bruch et al., TOIS 2023, find it at least as good as
reciprocal-rank fusion once the weight is tuned). Reciprocal-rank fusion is kept as the
tuning-free baseline (Cormack et al., SIGIR 2009; what Qdrant's query API does with Fusion.RRF).
"""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np

#: The RRF constant of Cormack et al. (and Qdrant's default).
RRF_K = 60


class BM25Index:
    """BM25 (Lucene variant, English stop words) over item texts; unknown query words score 0."""

    def __init__(self, texts: Sequence[str], k1: float = 1.2, b: float = 0.75) -> None:
        self.n_items = len(texts)
        corpus = bm25s.tokenize(list(texts), stopwords="en", show_progress=False)
        self._bm25: bm25s.BM25 | None = None
        if corpus.vocab:  # bm25s cannot index a corpus without a single word (e.g. titles of stop words)
            self._bm25 = bm25s.BM25(k1=k1, b=b)
            self._bm25.index(corpus, show_progress=False)

    def scores(self, queries: Sequence[str]) -> np.ndarray:
        """float32 [len(queries), n_items]."""
        out = np.zeros((len(queries), self.n_items), np.float32)
        if self._bm25 is None:
            return out
        tokens = bm25s.tokenize(list(queries), stopwords="en", return_ids=False, show_progress=False)
        for row, words in enumerate(tokens):
            if words:
                out[row] = self._bm25.get_scores(words)
        return out


def standardise(scores: np.ndarray) -> np.ndarray:
    """Per-row z-score; a constant row becomes zeros (it carries no preference)."""
    s = np.asarray(scores, np.float32)
    mean = s.mean(axis=1, keepdims=True)
    std = s.std(axis=1, keepdims=True)
    return np.where(std > 0, (s - mean) / np.maximum(std, 1e-12), 0.0).astype(np.float32)


def fuse(parts: Sequence[tuple[float, np.ndarray]]) -> np.ndarray:
    """Weighted sum of standardised signals (weights of 0 are skipped)."""
    active = [(w, s) for w, s in parts if w]
    if not active:
        raise ValueError("fuse needs at least one signal with a non-zero weight")
    out = np.zeros_like(np.asarray(active[0][1], np.float32))
    for w, s in active:
        out += np.float32(w) * standardise(s)
    return out


def reciprocal_rank_fusion(signals: Sequence[np.ndarray], k: int = RRF_K) -> np.ndarray:
    """sum over signals of 1 / (k + rank), ranks 1-based per row (ties broken by item index)."""
    out = np.zeros_like(np.asarray(signals[0], np.float32))
    rows = np.arange(out.shape[0])[:, None]
    for s in signals:
        order = np.argsort(-np.asarray(s), axis=1, kind="stable")
        ranks = np.empty_like(order)
        ranks[rows, order] = np.arange(1, order.shape[1] + 1)[None, :]
        out += 1.0 / (k + ranks)
    return out

"""Candidates, the ranking context and the in-process ranker used when no learned ranker is served.

The heuristic is deliberately simple and explainable: a weighted sum of query similarity, session
similarity and category affinity, each reported in `reasons` so a result says why it was ranked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass
class Candidate:
    item_id: str
    retrieval_score: float
    vector: np.ndarray | None = None
    category: str | None = None
    payload: dict = field(default_factory=dict)
    popularity: float = 0.0  # distinct users who interacted with it so far (a ranker feature)
    trending: float = 0.0  # of those, interactions on the days recstream.recommend.trending.trend_days(request)


@dataclass
class RankContext:
    """What the ranker knows about the request besides the candidates."""

    query_vec: np.ndarray | None = None
    session_vec: np.ndarray | None = None
    affinity: dict[str, float] = field(default_factory=dict)  # category -> share (sums to 1)
    recent_items: list[str] = field(default_factory=list)  # the last CO_VISIT_WINDOW, oldest first
    recent_categories: list[str] = field(default_factory=list)  # oldest first
    max_popularity: float = 1.0


class Ranker(Protocol):
    """Scores candidates; `version` is reported as the result's model_version."""

    version: str

    def score(self, ctx: RankContext, candidates: list[Candidate]) -> np.ndarray: ...


@dataclass
class HeuristicRanker:
    """In-process fallback ranker: explainable weighted signals, no model needed."""

    w_query: float = 0.55
    w_session: float = 0.30
    w_affinity: float = 0.15
    version: str = "heuristic-v1"

    def features(self, ctx: RankContext, candidates: list[Candidate]) -> dict[str, np.ndarray]:
        n = len(candidates)
        vecs = _stack([c.vector for c in candidates])
        out = {
            "query": np.zeros(n, np.float32),
            "session": np.zeros(n, np.float32),
            "category": np.array([ctx.affinity.get(c.category or "", 0.0) for c in candidates], np.float32),
        }
        if vecs is not None and ctx.query_vec is not None:
            out["query"] = vecs @ ctx.query_vec.astype(np.float32)
        if vecs is not None and ctx.session_vec is not None:
            out["session"] = vecs @ ctx.session_vec.astype(np.float32)
        if ctx.query_vec is None and vecs is None:
            out["query"] = np.array([c.retrieval_score for c in candidates], np.float32)
        return out

    def score(self, ctx: RankContext, candidates: list[Candidate]) -> np.ndarray:
        if not candidates:
            return np.zeros(0, np.float32)
        f = self.features(ctx, candidates)
        w_query = self.w_query if ctx.query_vec is not None else 0.0
        w_session = self.w_session if ctx.session_vec is not None else 0.0
        if ctx.query_vec is None and ctx.session_vec is None:
            w_query = 1.0  # nothing personal: keep retrieval order
        return w_query * f["query"] + w_session * f["session"] + self.w_affinity * f["category"]

    def reasons(self, ctx: RankContext, candidates: list[Candidate]) -> list[dict[str, float]]:
        """Per candidate, the weighted contribution of each signal (rounded for the wire)."""
        if not candidates:
            return []
        f = self.features(ctx, candidates)
        weights = {
            "query": self.w_query if ctx.query_vec is not None else 0.0,
            "session": self.w_session if ctx.session_vec is not None else 0.0,
            "category": self.w_affinity,
        }
        return [
            {k: round(float(weights[k] * f[k][i]), 4) for k in f if weights[k] and f[k][i]}
            for i in range(len(candidates))
        ]


def _stack(vectors: list[np.ndarray | None]) -> np.ndarray | None:
    if not vectors or any(v is None for v in vectors):
        return None
    return np.stack(vectors).astype(np.float32)

"""A ranker that returns NaN (a diverged version, a NaN input) is answered from retrieval: the
answer used to carry the NaN, written as null, which every client refused to decode (a 504)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest
from pydantic import ValidationError

from recstream.config import Settings
from recstream.contracts.events import RankedItem, RecommendationRequest, RecommendationResult
from recstream.recommend.scoring import Candidate, RankContext
from streams.rankers import InProcessRanker
from streams.recommend_context import Pending
from streams.recommend_ranking import rank


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_non_finite_ranker_scores_are_answered_from_retrieval() -> None:
    rng = np.random.default_rng(0)
    vecs = _unit(rng, 6)
    vecs[3] = np.nan  # one candidate's vector is broken: the heuristic's score of it is NaN
    rctx = RankContext(
        query_vec=None,
        session_vec=vecs[0],
        affinity={"Drama": 1.0},
        recent_items=["x"],
        recent_categories=["Drama"],
        max_popularity=10.0,
    )
    cands = [Candidate(f"i{i}", 0.1 * i, vecs[i + 1], "Drama", {}, float(i)) for i in range(5)]
    ranker = InProcessRanker()
    assert not np.isfinite(ranker.score(rctx, cands, 1.0)).all()
    p = Pending(ev=None, req=RecommendationRequest(user_id="u1"), rctx=rctx, candidates=cands, degraded=None)
    asyncio.run(rank(SimpleNamespace(ranker=ranker, settings=Settings()), [p]))
    assert p.degraded == "ranker_nonfinite" and p.version == "retrieval"
    assert np.isfinite(p.scores).all()


def test_answers_refuse_non_finite_numbers_where_they_are_made() -> None:
    """Refused by the consumer's schema but accepted by the producer's: now both refuse."""
    with pytest.raises(ValidationError):
        RankedItem(item_id="i1", score=float("nan"), position=0)
    with pytest.raises(ValidationError):
        RecommendationResult(request_id="r1", user_id="u1", model_version="v", items=[], latency_ms=float("inf"))

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


class DivergedTritonRanker:
    """Triton's interface (a batch per call), answering what a diverged version answers: NaN."""

    max_batch = 8
    version = "ranker-v9"

    def score_many(self, jobs, timeout_s: float):
        return [np.full(len(cands), np.nan, np.float32) for _, cands in jobs], self.version


def test_a_batched_rankers_nan_answer_is_the_retrieval_order_not_an_empty_list() -> None:
    """The Triton path had set the list's order from the NaN scores before the check: the degraded
    answer kept that order, and diversifying by NaN picked nothing (an empty answer)."""
    from recstream.recommend.rerank import diversify

    rng = np.random.default_rng(1)
    vecs = _unit(rng, 6)
    rctx = RankContext(
        query_vec=None, session_vec=vecs[0], affinity={}, recent_items=[], recent_categories=[], max_popularity=1.0
    )
    cands = [Candidate(f"i{i}", 1.0 - 0.1 * i, vecs[i + 1], f"c{i}", {}, 1.0) for i in range(5)]
    p = Pending(ev=None, req=RecommendationRequest(user_id="u1", k=3), rctx=rctx, candidates=cands, degraded=None)
    ctx = SimpleNamespace(ranker=DivergedTritonRanker(), settings=Settings())
    asyncio.run(rank(ctx, [p]))
    assert p.degraded == "ranker_nonfinite" and p.order is None
    # what finish() diversifies by: the order if any, else the scores (retrieval's, here)
    by = p.order if p.order is not None else p.scores
    picked = diversify(p.candidates, by, 3)
    assert [c.item_id for c, _ in picked] == ["i0", "i1", "i2"]

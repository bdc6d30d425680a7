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
    RankedItem(item_id="i1", score=0.5, position=0, propensity=1.0)  # the same, finite: accepted
    with pytest.raises(ValidationError):
        RankedItem(item_id="i1", score=float("nan"), position=0, propensity=1.0)
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


def test_a_search_with_a_nan_query_vector_is_answered_degraded_not_dead_lettered() -> None:
    """A diverged text encoder's NaN query vector left the fused score finite (the dense part drops
    out) but copied NaN cosines into the candidates: the answer could not be built (NaN refused),
    so the request was dead-lettered and its caller waited for its deadline."""
    from recstream.recommend.rerank import diversify
    from recstream.search.served import HybridSearch, SearchWeights

    rng = np.random.default_rng(2)
    n = 12
    vectors = _unit(rng, n)
    texts = [f"item {w}" for w in rng.choice(["red car", "blue hat", "green car"], n)]
    ids = [f"i{k}" for k in range(n)]
    search = HybridSearch(ids, vectors, texts, np.zeros(n), SearchWeights(lexical=1.0))
    rctx = RankContext(
        query_vec=np.full(384, np.nan, np.float32),
        session_vec=None,
        affinity={},
        recent_items=[],
        recent_categories=[],
        max_popularity=1.0,
    )
    cands = [Candidate(ids[k], 0.5, vectors[k], "c", {}, 0.0) for k in range(n)]
    req = RecommendationRequest(user_id="u1", kind="search", query="red car", k=3)
    p = Pending(ev=None, req=req, rctx=rctx, candidates=cands, degraded=None)
    p.hybrid, p.lexical = search, search.lexical("red car")
    asyncio.run(rank(SimpleNamespace(ranker=InProcessRanker(), settings=Settings()), [p]))
    assert p.degraded == "retrieval_nonfinite" and np.isfinite(p.scores).all()
    assert all(np.isfinite(c.retrieval_score) for c in p.candidates)
    picked = diversify(p.candidates, p.scores, 3)
    assert len(picked) == 3
    RankedItem(item_id=picked[0][0].item_id, score=float(picked[0][1]), position=0, propensity=1.0)  # publishable

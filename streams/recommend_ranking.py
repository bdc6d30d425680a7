"""Recommender stage 3, the list: ranker scores (one Triton call per `ranker.max_batch` requests) or
the hybrid search's fused score, then diversification, the exploration policy and the ranking log."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from recstream.contracts.events import PoolCandidate, RankedItem, RankingLog, RecommendationResult
from recstream.models.sequence_fusion import fused_scores
from recstream.recommend.rerank import diversify as diversify_list
from recstream.recommend.rerank import new_item_slot_factor, place_new_items
from recstream.recommend.scoring import Candidate
from recstream.telemetry import STAGE_LATENCY
from streams.context import StreamContext
from streams.inference import ModelUnavailable
from streams.rankers import InProcessRanker
from streams.recommend_context import Pending, Timer

log = logging.getLogger(__name__)


GREEDY_PROPENSITY = 1.0


# An exploring policy draws k slots from the best EXPLORE_POOL_FACTOR * k diversified candidates.
EXPLORE_POOL_FACTOR = 2


@dataclass
class Answer:
    result: RecommendationResult
    degraded_reason: str | None
    # Builds what the answer was drawn from and scored with (ranking-log topic); called only after
    # every answer of the batch is published, so logging never delays an answer.
    ranking_log: Callable[[], RankingLog] | None = None


def score_searches(searches: list[Pending]) -> None:
    """Hybrid-search scores (the fused score offline evaluation tunes) with each signal as a reason."""
    for p in searches:
        try:
            c = p.candidates
            vectors = np.stack([x.vector for x in c]) if c else np.zeros((0, 384), np.float32)
            popularity = np.array([x.popularity for x in c])
            ids = [x.item_id for x in c]
            scored = p.hybrid.score(p.rctx.query_vec, p.rctx.session_vec, p.lexical, ids, vectors, popularity)
            p.scores, p.reasons = scored.scores, scored.reasons
            # a search's retrieval_score is the query's cosine with the item, as without the hybrid
            for x, cos in zip(c, scored.cosines, strict=True):
                x.retrieval_score = float(cos)
        except Exception as exc:
            p.error = exc


async def rank(ctx: StreamContext, prepared: list[Pending]) -> None:
    """Scores for every prepared request: in-process one by one, on Triton one call per
    `ranker.max_batch` requests (the calls of one batch run concurrently in the thread pool);
    searches that the hybrid search retrieved are scored by it."""
    t0 = time.perf_counter()
    ranker = ctx.ranker
    score_searches([p for p in prepared if p.degraded is None and p.hybrid is not None])
    todo = [p for p in prepared if p.degraded is None and p.hybrid is None]
    timeout_s = ctx.settings.triton_timeout_s
    if isinstance(ranker, InProcessRanker):
        for p in todo:
            try:
                p.scores = ranker.score(p.rctx, p.candidates, timeout_s)
                p.reasons = ranker.impl.reasons(p.rctx, p.candidates)
                p.version = ranker.version
            except Exception as exc:
                p.error = exc
    elif todo:
        size = max(1, getattr(ranker, "max_batch", 1))
        chunks = [todo[i : i + size] for i in range(0, len(todo), size)]
        # All but the first chunk go to the thread pool (concurrent calls: Triton's dynamic batcher
        # takes them together); the first is called right here. answer_batch runs on the request
        # consumer's own loop, which has nothing else to do meanwhile, and a thread hop costs a
        # scheduling delay on an oversubscribed box (the gRPC wait releases the GIL either way).
        rest = [
            asyncio.ensure_future(ctx.in_thread(ranker.score_many, [(p.rctx, p.candidates) for p in chunk], timeout_s))
            for chunk in chunks[1:]
        ]
        first: Any
        try:
            first = ranker.score_many([(p.rctx, p.candidates) for p in chunks[0]], timeout_s)
        except Exception as exc:
            first = exc
        results = [first, *await asyncio.gather(*rest, return_exceptions=True)]
        for chunk, res in zip(chunks, results, strict=True):
            if isinstance(res, ModelUnavailable):
                log.warning("ranker unavailable, answering %d requests from retrieval scores: %s", len(chunk), res)
                for p in chunk:
                    p.degraded = "ranker_unavailable"
            elif isinstance(res, BaseException):
                for p in chunk:
                    p.error = res
            else:
                scores, version = res
                factor = new_item_factor(ctx.settings.new_item_slot_factor, ranker)
                for p, sc in zip(chunk, scores, strict=True):
                    p.scores, p.version = sc, version
                    # The order fuses the sequence model's scores (as its version says), then places
                    # candidates nobody has interacted with by retrieval (as offline, at their slot
                    # times `new_item_factor`, or not at all where the version chose so); the scores
                    # published and logged stay the ranker's logits.
                    by = sc if p.sequence_scores is None else fused_scores(sc, p.sequence_scores, p.sequence_weight)
                    if factor is None:
                        p.order = by
                    else:
                        p.order = place_new_items(by, [c.popularity == 0 for c in p.candidates], factor)
    for p in prepared:
        broken = [c for c in p.candidates if not math.isfinite(c.retrieval_score)]
        if p.error is None and broken:
            # a diverged text encoder's NaN query vector: its cosines order nothing either, and an
            # answer carrying them could not be published; such candidates fall back to 0
            for c in broken:
                c.retrieval_score = 0.0
            if p.degraded is None:
                log.warning("non-finite retrieval scores; %s answered degraded", p.req.request_id)
                p.degraded = "retrieval_nonfinite"
        if p.degraded is None and p.error is None and p.scores is not None and not np.isfinite(p.scores).all():
            # a diverged version's NaN logits order nothing, and an answer carrying them could not be
            # decoded by its client (JSON has no NaN): answered from retrieval, counted, logged
            scorer = "hybrid search" if p.hybrid is not None else f"ranker {p.version}"
            log.warning("%s gave non-finite scores; %s answered from retrieval", scorer, p.req.request_id)
            p.degraded = "search_nonfinite" if p.hybrid is not None else "ranker_nonfinite"
    for p in prepared:
        if p.degraded is not None:
            p.order = None  # the ranker's order (fused, new items placed) goes with its scores
            p.scores = np.array([c.retrieval_score for c in p.candidates], np.float32)
            p.version = "retrieval"
            p.reasons = [{"retrieval": round(c.retrieval_score, 4)} for c in p.candidates]
    elapsed = time.perf_counter() - t0
    for _ in prepared:
        STAGE_LATENCY.labels(stage="rank").observe(elapsed)


def new_item_factor(setting: float | None, ranker: object) -> float | None:
    """`recstream.recommend.rerank.new_item_slot_factor` for the served ranker (the heuristic one has no
    version to say: it places new items)."""
    return new_item_slot_factor(getattr(ranker, "places_new_items", True), setting)


def finish(ctx: StreamContext, p: Pending) -> Answer:
    """Diversify, apply the exploration policy, and build the result of one ranked request."""
    timer = Timer()
    req, candidates, logits = p.req, p.candidates, p.scores
    assert logits is not None
    # diversify by the ordering scores, then report each item's own logit
    scores = p.order if p.order is not None else logits
    logit_of = {c.item_id: float(x) for c, x in zip(candidates, logits, strict=True)}
    reasons = p.reasons if p.reasons is not None else [{} for _ in candidates]
    reason_of = {c.item_id: r for c, r in zip(candidates, reasons, strict=True)}
    policy = ctx.policy
    feedback = ctx.policy_feedback
    pool: list[tuple[Candidate, float]] = []
    # A search shows what it asked for: no category cap (as bench-search scores it); lists do.
    diversify = partial(diversify_list, max_share=1.0, penalty=0.0) if p.hybrid is not None else diversify_list
    if policy.name == "greedy" or p.hybrid is not None or (feedback is not None and p.degraded is not None):
        # Degraded answers carry retrieval scores and hybrid searches fused search scores, not ranker
        # logits: a learning policy must neither rank by them nor learn from what they showed, and a
        # search is not a ranker's answer to explore around, so these answers are greedy.
        slots = [(c, logit_of[c.item_id], GREEDY_PROPENSITY) for c, _ in diversify(candidates, scores, req.k)]
    elif feedback is not None:
        # A policy that learns click lifts needs a base click probability on the ranker's logit scale
        # and the slots it showed, so the feedback joiner can report each outcome back
        # (ctx.policy_feedback). The base follows the served order (`served_order_logits`), so with no
        # evidence the policy shows what the greedy list would. It chooses k of a diversified pool:
        # the category cap bounds the pool, and the lifts it learned may concentrate the k shown on
        # fewer categories.
        pool = _with_logits(diversify(candidates, scores, min(len(candidates), EXPLORE_POOL_FACTOR * req.k)), logit_of)
        by_id = {c.item_id: (c, s) for c, s in pool}
        base_of = dict(zip([c.item_id for c in candidates], served_order_logits(scores, logits), strict=True))
        base = np.array([base_of[c.item_id] for c, _ in pool], dtype=np.float64)
        ids, groups = [c.item_id for c, _ in pool], [c.category for c, _ in pool]
        shown = feedback.rank(req.request_id, ids, base, req.k, ctx.rng, groups) if pool else []
        slots = [(*by_id[sh.item_id], sh.propensity) for sh in shown]
    else:
        # The policy perturbs the diversified order (logits = -rank) of a pool the category cap has
        # shaped, and logs the probability of each shown slot for IPS/off-policy use.
        pool = _with_logits(diversify(candidates, scores, min(len(candidates), EXPLORE_POOL_FACTOR * req.k)), logit_of)
        by_id = {c.item_id: (c, s) for c, s in pool}
        rank_logits = -np.arange(len(pool), dtype=np.float64)
        shown = policy.rank([c.item_id for c, _ in pool], rank_logits, req.k, ctx.rng) if pool else []
        slots = [(*by_id[sh.item_id], sh.propensity) for sh in shown]
    items = [
        RankedItem(
            item_id=c.item_id,
            score=float(s),
            position=i,
            propensity=prop,
            retrieval_score=float(c.retrieval_score),
            category=c.category,
            reasons=reason_of.get(c.item_id, {}),
        )
        for i, (c, s, prop) in enumerate(slots)
    ]
    timer.lap("rerank")
    ranking_log = None
    mode = ctx.settings.ranking_log
    if p.degraded is None and p.hybrid is None and mode != "off":  # the logs are the ranker's answers
        if pool and policy.stochastic:
            greedy = _with_logits(diversify(candidates, scores, req.k), logit_of)
            ranking_log = partial(_ranking_log, ctx, p, pool, greedy)
        elif mode == "all" and slots and getattr(ctx.ranker, "inputs", None) is not None:
            # Feature logging: the greedy answer with the inputs it was scored from (the trainer's
            # examples of this answer then use exactly those, not a rebuild of them).
            shown_scored = [(c, s) for c, s, _ in slots]
            ranking_log = partial(_ranking_log, ctx, p, shown_scored, shown_scored)
    result = RecommendationResult(
        request_id=req.request_id,
        user_id=req.user_id,
        session_id=req.session_id,
        kind=req.kind,
        items=items,
        model_version=p.version,
        degraded=p.degraded is not None,
        policy=policy.name,
    )
    return Answer(result, p.degraded, ranking_log)


def served_order_logits(order: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """The ranker's logits handed out along the served order: the n-th item of the order (fused with
    the sequence model, new items placed) gets the n-th largest logit. A policy that learns lifts on
    top of a base click probability then starts from the order the greedy list serves, on the
    ranker's scale; by the items' own logits it would undo the fusion and the new-item placement."""
    order = np.asarray(order, dtype=np.float64)
    out = np.empty(len(order), dtype=np.float64)
    out[np.argsort(-order, kind="stable")] = np.sort(np.asarray(logits, dtype=np.float64))[::-1]
    return out


def _with_logits(picked: list[tuple[Candidate, float]], logit_of: dict[str, float]) -> list[tuple[Candidate, float]]:
    return [(c, logit_of[c.item_id]) for c, _ in picked]


def _ranking_log(
    ctx: StreamContext, p: Pending, pool: list[tuple[Candidate, float]], greedy: list[tuple[Candidate, float]]
) -> RankingLog:
    """What a stochastic answer drew from; with the learned ranker also its inputs as served (the
    context vector and each pool candidate's features), so another model version can rescore it."""
    inputs = getattr(ctx.ranker, "inputs", None)
    # The greedy answer's items are scored too (a category cap may reach past the pool).
    scored = pool + [(c, s) for c, s in greedy if c.item_id not in {x.item_id for x, _ in pool}]
    context, features = (None, None) if inputs is None else inputs(p.rctx, [c for c, _ in scored])
    row = {c.item_id: n for n, (c, _) in enumerate(scored)}
    return RankingLog(
        request_id=p.req.request_id,
        user_id=p.req.user_id,
        session_id=p.req.session_id,
        model_version=p.version,
        policy_spec=ctx.settings.exploration_policy,
        k=p.req.k,
        pool=_logged(pool, features, row),
        greedy=_logged(greedy, features, row),
        context=None if context is None else _rounded(context),
    )


def _rounded(values: np.ndarray) -> list[float]:
    """Six decimals: logged inputs reproduce the served logits to ~1e-5 at a third of the JSON size."""
    return np.round(np.asarray(values, dtype=np.float64), 6).tolist()


def _logged(
    scored: list[tuple[Candidate, float]], features: np.ndarray | None, row: dict[str, int]
) -> list[PoolCandidate]:
    return [
        PoolCandidate(
            item_id=c.item_id,
            score=float(s),
            category=c.category,
            features=None if features is None else _rounded(features[row[c.item_id]]),
        )
        for c, s in scored
    ]

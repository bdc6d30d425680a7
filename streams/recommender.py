"""The recommender processor: a batch of requests -> RecommendationResults on the recommendations
topic, keyed by user. Its trip runs down three stage modules, each called once per batch:
streams.recommend_context (session, query and session vectors) -> streams.recommend_retrieval
(candidates) -> streams.recommend_ranking (scores, diversification, exploration); this module
publishes the answers and then their ranking logs.

Requests and behaviour are both keyed by user_id with 4 partitions, so the sessions table partition
a request needs is local to the worker that gets the request. Every stage is timed in
STAGE_LATENCY. Degraded mode: when Triton cannot answer within settings.triton_timeout_s (or its
circuit breaker is open after a failure) the answer is built from retrieval scores alone, flagged
degraded with model_version='retrieval'; a request is never held back waiting for Triton.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from recstream.contracts.events import RankingLog, RecommendationRequest
from recstream.kafka.serde import encode
from recstream.telemetry import DEGRADED, STAGE_LATENCY
from streams.context import StreamContext
from streams.recommend_context import (
    Pending,
    Timer,
    age_s,
    cached_queries,
    embed_queries,
    encode_sessions,
    plan_request,
)
from streams.recommend_ranking import finish, rank
from streams.recommend_retrieval import retrieve
from streams.state import search_queries

log = logging.getLogger(__name__)


async def answer_batch(ctx: StreamContext, decoded: list[tuple[Any, RecommendationRequest]]) -> None:
    """Answer and publish a batch of (event, request): one encoder call for its new query texts, one
    store call for its vector searches, ONE ranker call per `ranker.max_batch` requests, then re-rank
    and publish each."""
    if not decoded:  # every message of the batch was dead-lettered
        return
    timer = Timer()
    if age_s(decoded[0][0]) > ctx.settings.triton_timeout_s:
        # Already past the model budget while queued (overload): don't add a Triton wait.
        query_vecs, encoder_error = cached_queries(ctx, [m for _, m in decoded]), "over_budget"
    else:
        query_vecs, encoder_error = await embed_queries(ctx, [m for _, m in decoded])
    timer.lap("embed")
    prepared: list[Pending] = []
    for ev, req in decoded:
        try:
            over_budget = age_s(ev) > ctx.settings.triton_timeout_s
            prepared.append(plan_request(ctx, ev, req, query_vecs, encoder_error, over_budget=over_budget))
        except Exception as exc:  # one bad request must not stop the partition
            _failed(ctx, ev, exc)
    encode_sessions(ctx, prepared)
    timer.lap("session_encode")
    try:
        await retrieve(ctx, prepared)
    except Exception as exc:  # the store failed for the batch: dead-letter its requests, keep going
        for p in prepared:
            _failed(ctx, p.ev, exc)
        return
    await rank(ctx, prepared)
    logs = [_publish(ctx, p) for p in prepared]
    timer.lap("answer_batch")
    for p, build in zip(prepared, logs, strict=True):
        if build is not None:
            _send_log(ctx, p, build)


def _failed(ctx: StreamContext, ev, exc: BaseException) -> None:
    log.error("request failed at %s[%d]@%d", ev.topic, ev.partition, ev.offset, exc_info=exc)
    ctx.dead_letter(ev, repr(exc), "processing")


def _publish(ctx: StreamContext, p: Pending) -> Callable[[], RankingLog] | None:
    """Publish one answer; returns its ranking-log builder, if it is to be logged."""
    ev, req = p.ev, p.req
    try:
        if p.error is not None:
            raise p.error
        answer = finish(ctx, p)
        result = answer.result.model_copy(update={"latency_ms": round((time.time() - ev.timestamp) * 1000, 3)})
        t0 = time.perf_counter()
        ctx.send("recommendations", req.user_id.encode(), encode(result))
        if req.query:
            search_queries(ctx).remember(req.request_id, req.query)
        STAGE_LATENCY.labels(stage="publish").observe(time.perf_counter() - t0)
        if answer.degraded_reason:
            DEGRADED.labels(reason=answer.degraded_reason).inc()
        STAGE_LATENCY.labels(stage="request_e2e_at_publish").observe(max(0.0, time.time() - ev.timestamp))
        return answer.ranking_log
    except Exception as exc:  # one bad request must not stop the partition
        _failed(ctx, ev, exc)
        return None


def _send_log(ctx: StreamContext, p: Pending, build: Callable[[], RankingLog]) -> None:
    """The answer is out already: a log that cannot be built is reported, never dead-letters it."""
    t0 = time.perf_counter()
    try:
        ctx.send("ranking-log", p.req.user_id.encode(), encode(build()), bulk=True)
    except Exception:
        log.exception("ranking log of request %s not published", p.req.request_id)
    STAGE_LATENCY.labels(stage="ranking_log").observe(time.perf_counter() - t0)

"""Recommender stage 1, a request's context: the session it is answered from, its query vector
(one Triton call per batch for new query texts) and its session vector (one session-encoder call)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recstream.contracts.events import RecommendationRequest
from recstream.models.co_visitation import CO_VISIT_WINDOW
from recstream.recommend.candidates import build_filter
from recstream.recommend.scoring import Candidate, RankContext
from recstream.telemetry import STAGE_LATENCY
from streams.context import StreamContext
from streams.inference import ModelUnavailable
from streams.rankers import InProcessRanker
from streams.session_vectors import session_history
from streams.state import read_session

log = logging.getLogger(__name__)


class Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        STAGE_LATENCY.labels(stage=stage).observe(now - self.t)
        self.t = now


def age_s(ev) -> float:
    """Seconds since the request was produced (Kafka CreateTime)."""
    return max(0.0, time.time() - ev.timestamp)


def cached_queries(ctx: StreamContext, requests: list[RecommendationRequest]) -> dict[str, np.ndarray]:
    out = {}
    for req in requests:
        if req.query:
            vec = ctx.embedder.cached(req.query)
            if vec is not None:
                out[req.query] = vec
    return out


async def embed_queries(
    ctx: StreamContext, requests: list[RecommendationRequest]
) -> tuple[dict[str, np.ndarray], str | None]:
    """Vectors for the batch's search texts (cache first, one Triton call for the rest)."""
    vecs: dict[str, np.ndarray] = {}
    todo: list[str] = []
    if any(req.query for req in requests):
        ctx.embedder.follow_version()
    for req in requests:
        if req.query and req.query not in vecs:
            hit = ctx.embedder.cached(req.query)
            if hit is not None:
                vecs[req.query] = hit
            elif req.query not in todo:
                todo.append(req.query)
    if not todo:
        return vecs, None
    try:
        # Called here, not in the pool: this loop (the request consumer's own) has nothing else to run.
        out = ctx.embedder.encode(todo, ctx.settings.triton_timeout_s)
    except ModelUnavailable as exc:
        log.warning("query embedding unavailable, answering degraded: %s", exc)
        return vecs, "encoder_unavailable"
    vecs.update(zip(todo, out, strict=True))
    return vecs, None


def encode_sessions(ctx: StreamContext, prepared: list[Pending]) -> None:
    """Session vectors of the batch from the trained session encoder, in ONE Triton call: the
    transformer over each session's item vectors (as stored), which is what retrieval and the
    ranker were trained on. Without the model (or with item vectors it was not trained with) the
    decayed sum stays; when the call fails, the answers are flagged degraded (the ranker would see
    a context it was not trained on)."""
    encoder = ctx.session_encoder
    if encoder is None:
        return
    ready = ctx.session_vectors
    version = ready.version()
    if version is None:  # the store's vectors are not a trained item encoder's: keep the decayed sum
        return
    todo = []
    for p in prepared:
        if p.history is None or not len(p.history) or p.degraded is not None:
            continue
        vec = ready.lookup(p.req.user_id, p.session, version)  # precomputed for exactly this state
        if vec is not None:
            p.rctx.session_vec = vec
        else:
            todo.append(p)
    if not todo:
        return
    try:
        # Called here, not in the pool: this loop (the request consumer's own) has nothing else to run.
        vectors = encoder.encode([p.history for p in todo], ctx.settings.triton_timeout_s, version)
    except ModelUnavailable as exc:
        log.warning("session encoder unavailable, answering %d requests degraded: %s", len(todo), exc)
        for p in todo:
            p.degraded = "session_encoder_unavailable"
        return
    for p, vec in zip(todo, vectors, strict=True):
        p.rctx.session_vec = vec
        ready.store(p.req.user_id, p.session, version, vec)


@dataclass
class Pending:
    """One request between retrieval and publishing."""

    ev: Any
    req: RecommendationRequest
    rctx: RankContext
    candidates: list[Candidate]
    degraded: str | None
    scores: np.ndarray | None = None
    version: str = ""
    reasons: list[dict[str, float]] | None = None
    error: BaseException | None = None
    filt: Any = None
    hits: list[Any] = field(default_factory=list)
    history: np.ndarray | None = None  # the session's item vectors, oldest first (session encoder input)
    order: np.ndarray | None = None  # what the list is ordered by, when not the scores themselves
    session: Any = None  # the SessionState the request was answered from
    hybrid: Any = None  # recstream.search.served.HybridSearch a search is scored by (None: the ranker)
    lexical: np.ndarray | None = None  # the search's BM25 scores over the hybrid snapshot
    # the sequence model's score of each hit / candidate (NaN: unknown to it) and its weight in the order
    sequence_scores: np.ndarray | None = None
    sequence_weight: float = 0.0


def plan_request(
    ctx: StreamContext,
    ev,
    req: RecommendationRequest,
    query_vecs: dict[str, np.ndarray],
    encoder_error: str | None,
    over_budget: bool = False,
) -> Pending:
    """Session context, filter and retrieval plan of one request (candidates come in retrieve)."""
    timer = Timer()
    session = read_session(ctx, req.user_id)
    filt = build_filter(req, session)
    session_vec = session.embedding() if session is not None else None
    lookup = ctx.tables.get("_item_lookup")
    encoder = ctx.session_encoder
    encodes = encoder is not None and ctx.session_vectors.version() is not None
    history, recent_categories = (
        session_history(ctx, session, encoder.max_history if encodes else 0) if session is not None else (None, [])
    )
    recent = session.recent[-CO_VISIT_WINDOW:] if session is not None else []
    rctx = RankContext(
        query_vec=query_vecs.get(req.query) if req.query else None,
        session_vec=session_vec,
        affinity=session.affinity_share() if session is not None else {},
        recent_items=recent,
        recent_categories=recent_categories,
        max_popularity=float(lookup.max_popularity) if lookup is not None else 1.0,
    )
    degraded: str | None = None
    if req.query and rctx.query_vec is None:
        degraded = encoder_error or "encoder_unavailable"
    elif over_budget and not isinstance(ctx.ranker, InProcessRanker):
        # The request waited past settings.triton_timeout_s in the queue: answer now from retrieval
        # rather than queue another Triton call behind an overloaded server.
        degraded = "over_budget"
    timer.lap("context")
    return Pending(ev, req, rctx, [], degraded, filt=filt, history=history, session=session)


async def read_store(ctx: StreamContext, fn, *args):
    """Store reads: inline in local mode (the in-process index answers in ~1 ms, a thread hop would
    cost as much); through the thread pool in server mode, where it is a network call."""
    if ctx.store.mode == "local":
        return fn(*args)
    return await ctx.in_thread(fn, *args)

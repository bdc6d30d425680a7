"""Requests -> session context -> query embedding (Triton) -> Qdrant retrieval -> ranker -> re-rank ->
RecommendationResult on the recommendations topic, keyed by user.

Requests and behaviour are both keyed by user_id with 4 partitions, so the sessions table partition
a request needs is local to the worker that gets the request. Every stage is timed in
STAGE_LATENCY. Degraded mode: when Triton cannot answer within settings.triton_timeout_s (or its
circuit breaker is open after a failure) the answer is built from retrieval scores alone, flagged
degraded with model_version='retrieval'; a request is never held back waiting for Triton.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from recstream.contracts.events import (
    PoolCandidate,
    RankedItem,
    RankingLog,
    RecommendationRequest,
    RecommendationResult,
)
from recstream.kafka.serde import encode
from recstream.models.co_visitation import CO_VISIT_WINDOW
from recstream.recommend.candidates import build_filter
from recstream.recommend.lexical import lexical_score
from recstream.recommend.rerank import diversify as diversify_list
from recstream.recommend.rerank import keep_new_items_in_place
from recstream.recommend.scoring import Candidate, RankContext
from recstream.telemetry import DEGRADED, STAGE_LATENCY
from streams.context import StreamContext
from streams.inference import InProcessRanker, ModelUnavailable
from streams.session_vectors import session_history
from streams.state import read_session

log = logging.getLogger(__name__)

#: Candidates retrieved per request: what the ranker reorders (its rerank_depth), at least 5x k.
CANDIDATE_FACTOR = 5
#: Degraded search scans this many filtered items lexically (no query vector available).
LEXICAL_SCAN = 2000
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


class _Timer:
    def __init__(self) -> None:
        self.t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        STAGE_LATENCY.labels(stage=stage).observe(now - self.t)
        self.t = now


async def answer_batch(ctx: StreamContext, decoded: list[tuple[Any, RecommendationRequest]]) -> None:
    """Answer and publish a batch of (event, request): one encoder call for its new query texts, one
    store call for its vector searches, ONE ranker call per `ranker.max_batch` requests, then re-rank
    and publish each."""
    if not decoded:  # every message of the batch was dead-lettered
        return
    timer = _Timer()
    if _age_s(decoded[0][0]) > ctx.settings.triton_timeout_s:
        # Already past the model budget while queued (overload): don't add a Triton wait.
        query_vecs, encoder_error = _cached_queries(ctx, [m for _, m in decoded]), "over_budget"
    else:
        query_vecs, encoder_error = await _embed_queries(ctx, [m for _, m in decoded])
    timer.lap("embed")
    prepared: list[_Pending] = []
    for ev, req in decoded:
        try:
            over_budget = _age_s(ev) > ctx.settings.triton_timeout_s
            prepared.append(_context(ctx, ev, req, query_vecs, encoder_error, over_budget=over_budget))
        except Exception as exc:  # one bad request must not stop the partition
            _failed(ctx, ev, exc)
    _encode_sessions(ctx, prepared)
    timer.lap("session_encode")
    try:
        await _retrieve(ctx, prepared)
    except Exception as exc:  # the store failed for the batch: dead-letter its requests, keep going
        for p in prepared:
            _failed(ctx, p.ev, exc)
        return
    await _rank(ctx, prepared)
    logs = [_publish(ctx, p) for p in prepared]
    timer.lap("answer_batch")
    for p, build in zip(prepared, logs, strict=True):
        if build is not None:
            _send_log(ctx, p, build)


def _failed(ctx: StreamContext, ev, exc: BaseException) -> None:
    msg = ev.message
    log.error("request failed at %s[%d]@%d", msg.topic, msg.partition, msg.offset, exc_info=exc)
    ctx.dead_letter(ev, repr(exc), "processing")


def _publish(ctx: StreamContext, p: _Pending) -> Callable[[], RankingLog] | None:
    """Publish one answer; returns its ranking-log builder, if it is to be logged."""
    ev, req = p.ev, p.req
    try:
        if p.error is not None:
            raise p.error
        answer = _finish(ctx, p)
        result = answer.result.model_copy(update={"latency_ms": round((time.time() - ev.message.timestamp) * 1000, 3)})
        t0 = time.perf_counter()
        ctx.send("recommendations", req.user_id.encode(), encode(result))
        if req.query:
            ctx.search_queries.remember(req.request_id, req.query)
        STAGE_LATENCY.labels(stage="publish").observe(time.perf_counter() - t0)
        if answer.degraded_reason:
            DEGRADED.labels(reason=answer.degraded_reason).inc()
        STAGE_LATENCY.labels(stage="request_e2e_at_publish").observe(max(0.0, time.time() - ev.message.timestamp))
        return answer.ranking_log
    except Exception as exc:  # one bad request must not stop the partition
        _failed(ctx, ev, exc)
        return None


def _send_log(ctx: StreamContext, p: _Pending, build: Callable[[], RankingLog]) -> None:
    """The answer is out already: a log that cannot be built is reported, never dead-letters it."""
    t0 = time.perf_counter()
    try:
        ctx.send("ranking-log", p.req.user_id.encode(), encode(build()), bulk=True)
    except Exception:
        log.exception("ranking log of request %s not published", p.req.request_id)
    STAGE_LATENCY.labels(stage="ranking_log").observe(time.perf_counter() - t0)


async def _embed_queries(
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


def _encode_sessions(ctx: StreamContext, prepared: list[_Pending]) -> None:
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


def _age_s(ev) -> float:
    """Seconds since the request was produced (Kafka CreateTime)."""
    return max(0.0, time.time() - ev.message.timestamp)


def _cached_queries(ctx: StreamContext, requests: list[RecommendationRequest]) -> dict[str, np.ndarray]:
    out = {}
    for req in requests:
        if req.query:
            vec = ctx.embedder.cached(req.query)
            if vec is not None:
                out[req.query] = vec
    return out


@dataclass
class _Pending:
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


def _context(
    ctx: StreamContext,
    ev,
    req: RecommendationRequest,
    query_vecs: dict[str, np.ndarray],
    encoder_error: str | None,
    over_budget: bool = False,
) -> _Pending:
    """Session context, filter and retrieval plan of one request (candidates come in _retrieve)."""
    timer = _Timer()
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
    return _Pending(ev, req, rctx, [], degraded, filt=filt, history=history, session=session)


def _limit(ctx: StreamContext, req: RecommendationRequest) -> int:
    """Candidates to retrieve: as many as the ranker was trained to reorder, and 5x k."""
    return max(ctx.ranker.rerank_depth, CANDIDATE_FACTOR * req.k)


async def _retrieve(ctx: StreamContext, pending: list[_Pending]) -> None:
    """Candidates for every request of a batch: the vector searches in one store call
    (VectorStore.search_many), lexical and cold-start scans one by one."""
    t0 = time.perf_counter()
    store = ctx.store
    searches: list[tuple[_Pending, np.ndarray]] = []
    live = ctx.hybrid_search if any(p.req.query and p.rctx.query_vec is not None for p in pending) else None
    hybrid = live.current() if live is not None else None
    for p in pending:
        req, rctx = p.req, p.rctx
        limit = _limit(ctx, req)
        if hybrid is not None and req.query and rctx.query_vec is not None and p.degraded is None:
            # the served search: one vector search for the fused dense + session terms, plus BM25's best
            version = ctx.embedder.version or live.version
            p.hybrid, p.lexical, p.version = hybrid, hybrid.lexical(req.query), f"{version}+hybrid"
            searches.append((p, hybrid.retrieval_vector(rctx.query_vec, rctx.session_vec)))
        elif req.query and rctx.query_vec is None:  # degraded search: no query vector
            hits = await _read(ctx, store.scroll, LEXICAL_SCAN, p.filt)
            for h in hits:
                h.score = lexical_score(req.query, h.payload)
            p.hits = sorted(hits, key=lambda h: -h.score)[:limit]
        else:
            vec = rctx.query_vec if rctx.query_vec is not None else rctx.session_vec
            if vec is not None:
                searches.append((p, vec))
            else:  # a cold user with no session and no query: any eligible items
                p.hits = await _read(ctx, store.scroll, limit, p.filt)
    if searches:
        found = await _read(ctx, store.search_many, [(vec, _limit(ctx, p.req), p.filt) for p, vec in searches])
        for (p, _), hits in zip(searches, found, strict=True):
            p.hits = hits
            if p.hybrid is not None:
                p.hits += await _lexical_hits(ctx, p, {h.item_id for h in hits})
        await _co_visited_hits(ctx, [(p, vec) for p, vec in searches if p.hybrid is None and not p.req.query])
    lookup = ctx.tables.get("_item_lookup")
    popularity = lookup.popularity if lookup is not None else {}
    for p in pending:
        ids = [h.item_id for h in p.hits]
        trending = lookup.trending(ids, p.req.ts_ms / 1000.0) if lookup is not None else [0] * len(ids)
        p.candidates = [
            Candidate(
                h.item_id,
                h.score,
                h.vector,
                h.payload.get("category"),
                h.payload,
                float(popularity.get(h.item_id, 0)),
                float(trend),
            )
            for h, trend in zip(p.hits, trending, strict=True)
        ]
        p.hits = []
    elapsed = time.perf_counter() - t0
    for _ in pending:
        STAGE_LATENCY.labels(stage="retrieve").observe(elapsed)


async def _co_visited_hits(ctx: StreamContext, searched: list[tuple[_Pending, np.ndarray]]) -> None:
    """The ranker's second candidate source (`recstream.models.ranker.candidate_slate`): the last
    `co_visitation_candidates` slots of a recommendation's list go to the items most co-visited with
    the session that the vector search did not bring and the filter allows, each with its cosine to
    the search vector as its retrieval score. One store read for the batch."""
    slots = ctx.ranker.co_visitation_candidates
    stat = ctx.ranker.co_visitation() if slots else None
    if stat is None:
        return
    wanted: list[tuple[_Pending, np.ndarray, int, list[str]]] = []
    for p, vec in searched:
        if not p.rctx.recent_items or not p.hits:
            continue
        keep = max(0, len(p.hits) - slots)
        exclude = [h.item_id for h in p.hits[:keep]] + list(p.filt.exclude_ids)
        # twice the slots: business filters (stock, category, price) are checked on the payloads below
        wanted.append((p, vec, keep, stat.top(p.rctx.recent_items, 2 * slots, exclude)))
    ids = sorted({i for *_, top in wanted for i in top})
    found = await _read(ctx, ctx.store.retrieve, ids) if ids else {}
    for p, vec, keep, top in wanted:
        extra = [found[i] for i in top if i in found and p.filt.allows(i, found[i].payload)][:slots]
        unit = vec / max(float(np.linalg.norm(vec)), 1e-12)
        for hit in extra:
            hit.score = float(hit.vector @ unit / max(float(np.linalg.norm(hit.vector)), 1e-12))
        chosen = {h.item_id for h in extra}
        fill = [h for h in p.hits[keep:] if h.item_id not in chosen][: slots - len(extra)]
        p.hits = p.hits[:keep] + fill + extra


async def _lexical_hits(ctx: StreamContext, p: _Pending, have: set[str]) -> list[Any]:
    """BM25's best items a vector search did not return, that the request's filter allows."""
    ids = [i for i in p.hybrid.lexical_top(p.lexical, _limit(ctx, p.req)) if i not in have]
    if not ids:
        return []
    found = await _read(ctx, ctx.store.retrieve, ids)
    return [found[i] for i in ids if i in found and p.filt.allows(i, found[i].payload)]


def _score_searches(searches: list[_Pending]) -> None:
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


async def _rank(ctx: StreamContext, prepared: list[_Pending]) -> None:
    """Scores for every prepared request: in-process one by one, on Triton one call per
    `ranker.max_batch` requests (the calls of one batch run concurrently in the thread pool);
    searches that the hybrid search retrieved are scored by it."""
    t0 = time.perf_counter()
    ranker = ctx.ranker
    _score_searches([p for p in prepared if p.degraded is None and p.hybrid is not None])
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
                for p, sc in zip(chunk, scores, strict=True):
                    p.scores, p.version = sc, version
                    # Candidates nobody has interacted with keep their retrieval slot (as offline):
                    # that orders the list; the scores published and logged stay the ranker's logits.
                    p.order = keep_new_items_in_place(sc, [c.popularity == 0 for c in p.candidates])
    for p in prepared:
        if p.degraded is not None:
            p.scores = np.array([c.retrieval_score for c in p.candidates], np.float32)
            p.version = "retrieval"
            p.reasons = [{"retrieval": round(c.retrieval_score, 4)} for c in p.candidates]
    elapsed = time.perf_counter() - t0
    for _ in prepared:
        STAGE_LATENCY.labels(stage="rank").observe(elapsed)


def _finish(ctx: StreamContext, p: _Pending) -> Answer:
    """Diversify, apply the exploration policy, and build the result of one ranked request."""
    timer = _Timer()
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
        # A policy that learns click lifts needs the ranker's logits (its base click probability) and
        # the slots it showed, so the feedback joiner can report each outcome back (ctx.policy_feedback).
        # It chooses k of a diversified pool: the category cap bounds the pool, and the lifts it
        # learned may concentrate the k shown on fewer categories.
        pool = _with_logits(diversify(candidates, scores, min(len(candidates), EXPLORE_POOL_FACTOR * req.k)), logit_of)
        by_id = {c.item_id: (c, s) for c, s in pool}
        logits = np.array([s for _, s in pool], dtype=np.float64)
        ids, groups = [c.item_id for c, _ in pool], [c.category for c, _ in pool]
        shown = feedback.rank(req.request_id, ids, logits, req.k, ctx.rng, groups) if pool else []
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


def _with_logits(picked: list[tuple[Candidate, float]], logit_of: dict[str, float]) -> list[tuple[Candidate, float]]:
    return [(c, logit_of[c.item_id]) for c, _ in picked]


def _ranking_log(
    ctx: StreamContext, p: _Pending, pool: list[tuple[Candidate, float]], greedy: list[tuple[Candidate, float]]
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


async def _read(ctx: StreamContext, fn, *args):
    """Store reads: inline in local mode (the in-process index answers in ~1 ms, a thread hop would
    cost as much); through the thread pool in server mode, where it is a network call."""
    if ctx.store.mode == "local":
        return fn(*args)
    return await ctx.in_thread(fn, *args)

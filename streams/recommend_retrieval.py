"""Recommender stage 2, candidates: the batch's vector searches in one store call, the co-visited
items the ranker was trained with, the sequence model's best, BM25's best for a hybrid search,
lexical and cold-start scans."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np

from recstream.contracts.events import RecommendationRequest
from recstream.recommend.lexical import lexical_score
from recstream.recommend.scoring import Candidate
from recstream.telemetry import STAGE_LATENCY
from streams.context import StreamContext
from streams.inference import ModelUnavailable
from streams.rankers import InProcessRanker
from streams.recommend_context import Pending, read_store

log = logging.getLogger(__name__)


#: Candidates retrieved per request: what the ranker reorders (its rerank_depth), at least 5x k.
CANDIDATE_FACTOR = 5


#: Degraded search scans this many filtered items lexically (no query vector available).
LEXICAL_SCAN = 2000


def candidate_limit(ctx: StreamContext, req: RecommendationRequest) -> int:
    """Candidates to retrieve: as many as the ranker was trained to reorder, and 5x k."""
    return max(ctx.ranker.rerank_depth, CANDIDATE_FACTOR * req.k)


async def retrieve(ctx: StreamContext, pending: list[Pending]) -> None:
    """Candidates for every request of a batch: the vector searches in one store call
    (VectorStore.search_many), lexical and cold-start scans one by one."""
    t0 = time.perf_counter()
    store = ctx.store
    asked = ask_sequence_model(ctx, pending)
    searches: list[tuple[Pending, np.ndarray]] = []
    live = ctx.hybrid_search if any(p.req.query and p.rctx.query_vec is not None for p in pending) else None
    hybrid = live.current() if live is not None else None
    for p in pending:
        req, rctx = p.req, p.rctx
        limit = candidate_limit(ctx, req)
        if hybrid is not None and req.query and rctx.query_vec is not None and p.degraded is None:
            # the served search: one vector search for the fused dense + session terms, plus BM25's best
            version = ctx.embedder.version or live.version
            p.hybrid, p.lexical, p.version = hybrid, hybrid.lexical(req.query), f"{version}+hybrid"
            searches.append((p, hybrid.retrieval_vector(rctx.query_vec, rctx.session_vec)))
        elif req.query and rctx.query_vec is None:  # degraded search: no query vector
            p.hits = await degraded_search(ctx, p, limit)
        else:
            vec = rctx.query_vec if rctx.query_vec is not None else rctx.session_vec
            if vec is not None:
                searches.append((p, vec))
            else:  # a cold user with no session and no query: any eligible items
                p.hits = await read_store(ctx, store.scroll, limit, p.filt)
    recommended: list[tuple[Pending, np.ndarray]] = []
    if searches:
        found = await read_store(
            ctx, store.search_many, [(vec, candidate_limit(ctx, p.req), p.filt) for p, vec in searches]
        )
        for (p, _), hits in zip(searches, found, strict=True):
            p.hits = hits
            if p.hybrid is not None:
                p.hits += await lexical_hits(ctx, p, {h.item_id for h in hits})
        recommended = [(p, vec) for p, vec in searches if p.hybrid is None and not p.req.query]
        await co_visited_hits(ctx, recommended)
    # awaited even when nothing was searched: the call was started for the batch
    await sequence_hits(ctx, recommended, asked)
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


async def co_visited_hits(ctx: StreamContext, searched: list[tuple[Pending, np.ndarray]]) -> None:
    """The ranker's other candidate sources (`recstream.models.ranker.candidate_slate`): the last
    `co_visitation_candidates + follows_candidates` slots of a recommendation's list go to, first,
    the items most co-visited with the session and, then, those that most followed its last items,
    that the vector search did not bring and the filter allows, each with its cosine to the search
    vector as its retrieval score. One store read for the batch."""
    n_co, n_follow = ctx.ranker.co_visitation_candidates, ctx.ranker.follows_candidates
    slots = n_co + n_follow
    stat = ctx.ranker.co_visitation() if slots else None
    if stat is None:
        return
    wanted: list[tuple[Pending, np.ndarray, int, list[str], list[str]]] = []
    for p, vec in searched:
        if not p.rctx.recent_items or not p.hits:
            continue
        keep = max(0, len(p.hits) - slots)
        exclude = [h.item_id for h in p.hits[:keep]] + list(p.filt.exclude_ids)
        # twice the slots: business filters (stock, category, price) are checked on the payloads below
        co = stat.top(p.rctx.recent_items, 2 * n_co, exclude) if n_co else []
        follows = stat.follow_top(p.rctx.recent_items, 2 * n_follow + n_co, exclude) if n_follow else []
        wanted.append((p, vec, keep, co, follows))
    ids = sorted({i for *_, co, follows in wanted for i in (*co, *follows)})
    found = await read_store(ctx, ctx.store.retrieve, ids) if ids else {}
    for p, vec, keep, co, follows in wanted:
        ok = {i for i in (*co, *follows) if i in found and p.filt.allows(i, found[i].payload)}
        allowed = [i for i in co if i in ok][:n_co]
        allowed += [i for i in follows if i in ok and i not in allowed][:n_follow]
        extra = _scored_by(vec, [found[i] for i in allowed])
        chosen = set(allowed)
        fill = [h for h in p.hits[keep:] if h.item_id not in chosen][: slots - len(extra)]
        p.hits = p.hits[:keep] + fill + extra


def _scored_by(vec: np.ndarray, hits: list[Any]) -> list[Any]:
    """Copies of hits another source brought, each with its cosine to the search vector as its
    retrieval score (a copy per request: requests of one batch share the hits read for them)."""
    unit = vec / max(float(np.linalg.norm(vec)), 1e-12)
    return [replace(h, score=float(h.vector @ unit / max(float(np.linalg.norm(h.vector)), 1e-12))) for h in hits]


def ask_sequence_model(ctx: StreamContext, pending: list[Pending]) -> tuple[list[Pending], Any] | None:
    """Start the batch's sequence-model call (one Triton call) in the thread pool, so that its round
    trip overlaps the vector search instead of following it; None when no request needs it, or when
    the served version neither adds candidates nor weighs in (its fusion chose the ranker alone)."""
    scorer = ctx.sequence_scorer
    if scorer is None or isinstance(ctx.ranker, InProcessRanker):
        return None
    scorer.follow_version()  # a time check; reads the repository at most every VERSION_CHECK_S
    if scorer.fusion is None or not scorer.fusion.active:
        return None
    asked = [p for p in pending if not p.req.query and p.rctx.recent_items and p.degraded is None]
    if not asked:
        return None
    recent = [p.rctx.recent_items for p in asked]
    return asked, asyncio.ensure_future(ctx.in_thread(scorer.score, recent, ctx.settings.triton_timeout_s))


async def sequence_hits(
    ctx: StreamContext, searched: list[tuple[Pending, np.ndarray]], asked: tuple[list[Pending], Any] | None
) -> None:
    """The sequence model's part of a list (`recstream.training.ranker.ranked_slates` offline): its
    best `fusion.candidates` items that the list does not hold and the filter allows join it, and
    every hit gets its score for the fused order. One Triton call (`ask_sequence_model`) and one
    store read for the batch; when the model is unavailable the lists go without it (counted in
    triton_errors_total)."""
    from recstream.models.sequence_fusion import sequence_candidates

    if asked is None:
        return
    pendings, call = asked
    try:
        answer = await call
    except ModelUnavailable as exc:
        log.warning("sequence model unavailable, %d lists go without it: %s", len(pendings), exc)
        return
    row = {id(p): r for r, p in enumerate(pendings)}
    todo = [(p, vec, row[id(p)]) for p, vec in searched if id(p) in row and p.hits]
    fusion = answer.fusion
    wanted: list[list[str]] = []
    for p, _, r in todo:
        if not fusion.candidates:
            wanted.append([])
            continue
        taken = [*(h.item_id for h in p.hits), *p.filt.exclude_ids, *p.rctx.recent_items]
        exclude = np.array([answer.row_of.get(i, -1) for i in taken], dtype=np.int64)
        # twice the slots: business filters (stock, category, price) are checked on the payloads below
        rows = sequence_candidates(answer.scores[r], exclude, 2 * fusion.candidates)
        wanted.append([answer.ids[i] for i in rows])
    ids = sorted({i for w in wanted for i in w})
    found = await read_store(ctx, ctx.store.retrieve, ids) if ids else {}
    for (p, vec, r), want in zip(todo, wanted, strict=True):
        allowed = [i for i in want if i in found and p.filt.allows(i, found[i].payload)][: fusion.candidates]
        p.hits = p.hits + _scored_by(vec, [found[i] for i in allowed])
        p.sequence_scores = answer.of(r, [h.item_id for h in p.hits])
        p.sequence_weight = fusion.weight


async def degraded_search(ctx: StreamContext, p: Pending, limit: int) -> list[Any]:
    """A search without a query vector: BM25's best items the filter allows over the whole
    catalogue snapshot, or, before a snapshot exists, token overlap over the first LEXICAL_SCAN
    filtered items. Items that match no query word are not results (a query matching nothing
    answered k arbitrary items)."""
    snapshot = ctx.lexical_search.current()
    if snapshot is not None and snapshot.bm25 is not None:
        scores = snapshot.lexical(p.req.query)
        hits = await _stored_and_allowed(ctx, p, snapshot.lexical_top(scores, limit, p.filt))
        for h in hits:
            h.score = float(scores[snapshot.row_of[h.item_id]])
        return hits
    hits = await read_store(ctx, ctx.store.scroll, LEXICAL_SCAN, p.filt)
    for h in hits:
        h.score = lexical_score(p.req.query, h.payload)
    return sorted((h for h in hits if h.score > 0), key=lambda h: -h.score)[:limit]


async def lexical_hits(ctx: StreamContext, p: Pending, have: set[str]) -> list[Any]:
    """BM25's best items a vector search did not return, that the request's filter allows."""
    ids = p.hybrid.lexical_top(p.lexical, candidate_limit(ctx, p.req), p.filt)
    return await _stored_and_allowed(ctx, p, [i for i in ids if i not in have])


async def _stored_and_allowed(ctx: StreamContext, p: Pending, ids: list[str]) -> list[Any]:
    """The store's current hits for `ids`, in order, that the filter still allows: the snapshot
    BM25 ranked may be a few seconds old (a deleted or changed item)."""
    if not ids:
        return []
    found = await read_store(ctx, ctx.store.retrieve, ids)
    return [found[i] for i in ids if i in found and p.filt.allows(i, found[i].payload)]

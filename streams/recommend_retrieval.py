"""Recommender stage 2, candidates: the batch's vector searches in one store call, the co-visited
items the ranker was trained with, BM25's best for a hybrid search, lexical and cold-start scans."""

from __future__ import annotations

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
            hits = await read_store(ctx, store.scroll, LEXICAL_SCAN, p.filt)
            for h in hits:
                h.score = lexical_score(req.query, h.payload)
            p.hits = sorted(hits, key=lambda h: -h.score)[:limit]
        else:
            vec = rctx.query_vec if rctx.query_vec is not None else rctx.session_vec
            if vec is not None:
                searches.append((p, vec))
            else:  # a cold user with no session and no query: any eligible items
                p.hits = await read_store(ctx, store.scroll, limit, p.filt)
    if searches:
        found = await read_store(
            ctx, store.search_many, [(vec, candidate_limit(ctx, p.req), p.filt) for p, vec in searches]
        )
        for (p, _), hits in zip(searches, found, strict=True):
            p.hits = hits
            if p.hybrid is not None:
                p.hits += await lexical_hits(ctx, p, {h.item_id for h in hits})
        await co_visited_hits(ctx, [(p, vec) for p, vec in searches if p.hybrid is None and not p.req.query])
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
        unit = vec / max(float(np.linalg.norm(vec)), 1e-12)
        # a copy per request: requests of one batch share the hits read for them
        extra = [
            replace(h, score=float(h.vector @ unit / max(float(np.linalg.norm(h.vector)), 1e-12)))
            for h in (found[i] for i in allowed)
        ]
        chosen = set(allowed)
        fill = [h for h in p.hits[keep:] if h.item_id not in chosen][: slots - len(extra)]
        p.hits = p.hits[:keep] + fill + extra


async def lexical_hits(ctx: StreamContext, p: Pending, have: set[str]) -> list[Any]:
    """BM25's best items a vector search did not return, that the request's filter allows."""
    ids = [i for i in p.hybrid.lexical_top(p.lexical, candidate_limit(ctx, p.req)) if i not in have]
    if not ids:
        return []
    found = await read_store(ctx, ctx.store.retrieve, ids)
    return [found[i] for i in ids if i in found and p.filt.allows(i, found[i].payload)]

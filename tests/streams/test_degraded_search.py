"""A search while the text encoder cannot be reached (no query vector): BM25 over the whole
catalogue snapshot with the request's filter, over a real Qdrant store in local mode."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from recstream.config import Settings
from recstream.contracts.events import RecommendationRequest
from recstream.recommend.candidates import CandidateFilter
from recstream.recommend.scoring import RankContext
from streams.context import StreamContext
from streams.recommend_context import Pending
from streams.recommend_retrieval import LEXICAL_SCAN, degraded_search


def _search(ctx: StreamContext, query: str, filt: CandidateFilter | None = None, limit: int = 20) -> list[str]:
    req = RecommendationRequest(user_id="u", kind="search", query=query, k=5)
    p = Pending(None, req, RankContext(), [], None, filt=filt or CandidateFilter(in_stock_only=False))
    return [h.item_id for h in asyncio.run(degraded_search(ctx, p, limit))]


def test_a_degraded_search_finds_any_item_of_the_catalogue_in_any_script(tmp_path: Path) -> None:
    """The catalogue is larger than the old scan (the first 2,000 items in store order: the rest
    could never be found), one title is Cyrillic and one accented (the ASCII tokenizer split
    "Amélie" and dropped Cyrillic altogether), and a query that matches nothing gets nothing
    (it got k arbitrary items, every score 0)."""
    n = LEXICAL_SCAN + 500
    ids = [f"m{i}" for i in range(n)]
    titles = [f"Common film number {i}" for i in range(n)]
    titles[-1], titles[-2] = "Москва слезам не верит", "Le Fabuleux Destin d'Amélie Poulain"
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(n, 384)).astype(np.float32)
    ctx = StreamContext(
        settings=Settings(qdrant_path=tmp_path / "qdrant", run_dir=tmp_path / "run"), worker="w", agents=()
    )
    payloads = [
        {"item_id": i, "title": t, "category": "Drama" if k % 2 else "Comedy"}
        for k, (i, t) in enumerate(zip(ids, titles, strict=True))
    ]
    ctx.store.upsert(payloads, vectors)
    try:
        assert _search(ctx, "москва")[0] == ids[-1]
        assert _search(ctx, "Amélie")[0] == ids[-2]
        assert _search(ctx, "zzzz qqqq") == []
        drama = _search(ctx, "common film", CandidateFilter(in_stock_only=False, categories=("Drama",)), limit=50)
        assert len(drama) == 50 and all(int(i[1:]) % 2 for i in drama)  # the filter before the cut
    finally:
        ctx.store.close()

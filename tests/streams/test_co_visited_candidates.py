"""The ranker's other candidate sources (co-visited items, then followers of the session's last items)
as the worker builds them (streams.recommend_retrieval) equal the slate offline training and
evaluation use (recstream.models.ranker.candidate_slate), over a real Qdrant store in local mode;
business filters apply to those items too."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from recstream.config import Settings
from recstream.contracts.events import RecommendationRequest
from recstream.models.co_visitation import CoVisitation
from recstream.models.ranker import candidate_slate
from recstream.recommend.candidates import CandidateFilter
from recstream.recommend.scoring import RankContext
from recstream.vectorstore import VectorStore
from streams.recommend_context import Pending
from streams.recommend_retrieval import co_visited_hits

N_ITEMS, DEPTH, SLOTS = 80, 20, 6


@dataclass
class _Ranker:
    """The two things the worker asks of a served ranker version for this stage."""

    stat: CoVisitation
    co_visitation_candidates: int = SLOTS
    follows_candidates: int = 0

    def co_visitation(self) -> CoVisitation:
        return self.stat


@dataclass
class _Context:
    ranker: _Ranker
    store: VectorStore


def _setup(tmp_path: Path) -> tuple[VectorStore, np.ndarray, CoVisitation, list[str]]:
    rng = np.random.default_rng(0)
    ids = [f"m{i}" for i in range(N_ITEMS)]
    vectors = rng.normal(size=(N_ITEMS, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = VectorStore(Settings(qdrant_path=tmp_path / "qdrant"))
    store.upsert([{"item_id": i, "in_stock": n % 7 != 3} for n, i in enumerate(ids)], vectors)
    # users take items in groups of 4 (n, n+20, n+40, n+60): co-visitation is unrelated to the vectors
    seqs = [np.array([g, g + 20, g + 40, g + 60])[rng.permutation(4)] for g in rng.integers(0, 20, size=300)]
    return store, vectors, CoVisitation.fit(seqs, ids), ids


def _served_slate(
    store: VectorStore,
    stat: CoVisitation,
    session: np.ndarray,
    recent: list[str],
    filt: CandidateFilter,
    slots: tuple[int, int] = (SLOTS, 0),
) -> Pending:
    """One recommendation's candidates as the worker gathers them: the vector search, then the
    co-visited and follows slots."""
    req = RecommendationRequest(user_id="u", k=4)
    p = Pending(None, req, RankContext(session_vec=session, recent_items=recent), [], None, filt=filt)
    p.hits = store.search(session, DEPTH, filt)
    asyncio.run(co_visited_hits(_Context(_Ranker(stat, *slots), store), [(p, session)]))
    return p


@pytest.mark.parametrize("slots", [(SLOTS, 0), (3, 4), (0, 5)], ids=["co-visited", "both", "follows"])
def test_the_worker_builds_the_offline_slate(tmp_path: Path, slots: tuple[int, int]) -> None:
    store, vectors, stat, ids = _setup(tmp_path)
    try:
        session = np.asarray(vectors[:3].mean(0))
        for history in ([0, 21, 42], [5], [13, 33, 53, 2, 8]):
            recent = [ids[i] for i in history]
            filt = CandidateFilter(in_stock_only=False, exclude_ids=frozenset(recent))
            p = _served_slate(store, stat, session, recent, filt, slots)

            scores = vectors @ (session / np.linalg.norm(session))
            offline = [ids[i] for i in candidate_slate(scores, np.array(history), DEPTH, stat, *slots)]
            assert [h.item_id for h in p.hits] == offline
            served = {h.item_id: h.score for h in p.hits}
            np.testing.assert_allclose([served[i] for i in offline], scores[[ids.index(i) for i in offline]], atol=1e-5)
            extra = offline[DEPTH - sum(slots) :]
            assert len(set(extra) & {ids[g % 20 + k] for g in history for k in (0, 20, 40, 60)}) > 0
    finally:
        store.close()


def test_co_visited_items_pass_the_request_filter(tmp_path: Path) -> None:
    store, vectors, stat, _ = _setup(tmp_path)
    try:
        recent = ["m0", "m21"]
        filt = CandidateFilter(in_stock_only=True, exclude_ids=frozenset(recent))
        session = np.asarray(vectors[0])
        for slots, top in (((SLOTS, 0), stat.top), ((0, SLOTS), stat.follow_top)):
            p = _served_slate(store, stat, session, recent, filt, slots)
            assert len(p.hits) == DEPTH and len({h.item_id for h in p.hits}) == DEPTH
            assert all(filt.allows(h.item_id, h.payload) for h in p.hits)
            found = store.retrieve(top(recent, N_ITEMS, recent))
            allowed = {i for i, hit in found.items() if filt.allows(i, hit.payload)}
            assert 0 < len(allowed) <= SLOTS and allowed <= {h.item_id for h in p.hits}
    finally:
        store.close()

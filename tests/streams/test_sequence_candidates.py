"""The sequence model's part of a list as the worker builds it (streams.recommend_retrieval.sequence_hits)
equals what offline evaluation and `make train`'s choice use (recstream.training.ranker.ranked_slates:
the slate, then the model's best items outside it and the history), over a real Qdrant store in
local mode; the request's filter applies to them too, and an unavailable model costs nothing but them.

The model's scores come from the class Triton's sequence_scorer loads (its Triton parity:
tests/models/test_served_models.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from recstream.config import Settings
from recstream.contracts.events import RecommendationRequest
from recstream.models.ranker import candidate_slate
from recstream.models.sequence import SASRecNet, SequenceNetConfig, SequenceScorer
from recstream.models.sequence_fusion import SequenceFusion, left_pad, sequence_candidates
from recstream.recommend.candidates import CandidateFilter
from recstream.recommend.scoring import RankContext
from recstream.vectorstore import VectorStore
from streams.inference import ModelUnavailable, SequenceScores
from streams.recommend_context import Pending
from streams.recommend_retrieval import ask_sequence_model, sequence_hits

N_ITEMS, DEPTH, EXTRA = 60, 15, 5
UNTRAINED = (4, 11)


class _Ranker:
    """A learned ranker's handle (the worker adds sequence candidates only for one)."""


class _Scorer:
    """TritonSequenceScorer's answer, from the in-process class its Triton model loads."""

    def __init__(self, model: SequenceScorer, down: bool = False) -> None:
        self.model, self.down = model, down
        self.calls = 0

    @property
    def fusion(self) -> SequenceFusion:
        return self.model.fusion

    def follow_version(self) -> None:
        """One version here."""

    def score(self, recent: list[list[str]], timeout_s: float) -> SequenceScores:
        self.calls += 1
        if self.down:
            raise ModelUnavailable("sequence_scorer: down")
        rows = [np.array([self.model.row_of[i] for i in r if i in self.model.row_of]) for r in recent]
        scores = self.model.score_padded(left_pad(rows, self.model.max_len))
        return SequenceScores(scores, self.model.item_ids, self.model.row_of, self.model.fusion)


@dataclass
class _Context:
    sequence_scorer: _Scorer
    store: VectorStore
    settings: Settings
    ranker: _Ranker

    async def in_thread(self, fn, *args):
        return fn(*args)


def _setup(tmp_path: Path) -> tuple[VectorStore, np.ndarray, SequenceScorer, list[str]]:
    rng = np.random.default_rng(0)
    ids = [f"m{i}" for i in range(N_ITEMS)]
    vectors = rng.normal(size=(N_ITEMS, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = VectorStore(Settings(qdrant_path=tmp_path / "qdrant"))
    store.upsert([{"item_id": i, "in_stock": n % 7 != 3} for n, i in enumerate(ids)], vectors)
    torch.manual_seed(0)
    trained = np.ones(N_ITEMS, bool)
    trained[list(UNTRAINED)] = False
    net = SASRecNet(N_ITEMS, SequenceNetConfig(dim=16, layers=1, heads=2, max_len=10))
    return store, vectors, SequenceScorer(net, ids, trained, SequenceFusion(candidates=EXTRA, weight=2.0)), ids


def _served(tmp_path: Path, store, scorer, session, recent, filt, down: bool = False) -> Pending:
    return _served_by(_Scorer(scorer, down), tmp_path, store, session, recent, filt)


def _served_by(scorer: _Scorer, tmp_path: Path, store, session, recent, filt) -> Pending:
    req = RecommendationRequest(user_id="u", k=4)
    p = Pending(None, req, RankContext(session_vec=session, recent_items=recent), [], None, filt=filt)
    p.hits = store.search(session, DEPTH, filt)
    ctx = _Context(scorer, store, Settings(qdrant_path=tmp_path / "q2"), _Ranker())

    async def gather() -> None:
        asked = ask_sequence_model(ctx, [p])  # started before the vector search, as in retrieve
        await sequence_hits(ctx, [(p, session)], asked)

    asyncio.run(gather())
    return p


def test_the_worker_adds_the_offline_sequence_candidates(tmp_path: Path) -> None:
    store, vectors, scorer, ids = _setup(tmp_path)
    try:
        for history in ([0, 21, 42], [5], [13, 33, 53, 2, 8, 4]):
            session = np.asarray(vectors[history].mean(0))
            recent = [ids[i] for i in history]
            filt = CandidateFilter(in_stock_only=False, exclude_ids=frozenset(recent))
            p = _served(tmp_path, store, scorer, session, recent, filt)
            scores = vectors @ (session / np.linalg.norm(session))
            top = candidate_slate(scores, np.array(history), DEPTH)
            seq = scorer.score_index([np.array(history)])[0]
            offline = np.concatenate([top, sequence_candidates(seq, np.concatenate([history, top]), EXTRA)])
            assert [h.item_id for h in p.hits] == [ids[i] for i in offline]
            # every hit carries its cosine to the session and the model's score (none for untrained items)
            np.testing.assert_allclose([h.score for h in p.hits], scores[offline], atol=1e-5)
            np.testing.assert_allclose(p.sequence_scores, seq[offline], atol=1e-5)
            assert p.sequence_weight == 2.0
            assert not {ids[i] for i in UNTRAINED} & {h.item_id for h in p.hits[DEPTH:]}
    finally:
        store.close()


def test_sequence_candidates_pass_the_request_filter(tmp_path: Path) -> None:
    store, vectors, scorer, ids = _setup(tmp_path)
    try:
        history = [0, 21, 42]
        recent = [ids[i] for i in history]
        filt = CandidateFilter(in_stock_only=True, exclude_ids=frozenset(recent))
        p = _served(tmp_path, store, scorer, np.asarray(vectors[history].mean(0)), recent, filt)
        extra = p.hits[DEPTH:]
        assert len(extra) == EXTRA
        assert all(h.payload["in_stock"] for h in extra)
        assert not {h.item_id for h in extra} & set(recent)
    finally:
        store.close()


def test_without_the_model_the_list_is_the_slate(tmp_path: Path) -> None:
    store, vectors, scorer, ids = _setup(tmp_path)
    try:
        recent = [ids[0], ids[21]]
        session = np.asarray(vectors[[0, 21]].mean(0))
        p = _served(tmp_path, store, scorer, session, recent, CandidateFilter(exclude_ids=frozenset(recent)), down=True)
        assert len(p.hits) == DEPTH and p.sequence_scores is None
    finally:
        store.close()


def test_a_version_that_chose_the_ranker_alone_is_not_called(tmp_path: Path) -> None:
    """Fusion (0, 0): no candidates and no weight, so the worker spends no Triton call on it."""
    store, vectors, scorer, ids = _setup(tmp_path)
    try:
        scorer.fusion = SequenceFusion(candidates=0, weight=0.0)
        asked = _Scorer(scorer)
        recent = [ids[0], ids[21]]
        filt = CandidateFilter(exclude_ids=frozenset(recent))
        p = _served_by(asked, tmp_path, store, np.asarray(vectors[[0, 21]].mean(0)), recent, filt)
        assert asked.calls == 0 and len(p.hits) == DEPTH and p.sequence_scores is None
        scorer.fusion = SequenceFusion(candidates=0, weight=1.0)  # a weight alone is worth the call
        p = _served_by(asked, tmp_path, store, np.asarray(vectors[[0, 21]].mean(0)), recent, filt)
        assert asked.calls == 1 and len(p.hits) == DEPTH and p.sequence_scores is not None
    finally:
        store.close()


@pytest.mark.parametrize("weight", [0.0, 2.0])
def test_offline_slates_carry_the_same_scores(weight: float) -> None:
    """ranked_slates' order is the fused one, and with weight 0 the ranker's own."""
    from recstream.models.sequence_fusion import fused_scores
    from recstream.training.ranker import RankedSlate

    rng = np.random.default_rng(1)
    ranker, seq = rng.normal(size=12), rng.normal(size=12)
    slate = RankedSlate(np.arange(12), ranker, np.zeros(12, bool), seq, weight)
    want = np.argsort(-(fused_scores(ranker, seq, weight) if weight else ranker), kind="stable")
    np.testing.assert_array_equal(slate.order(), want)


def test_operators_can_switch_the_sequence_model_off(tmp_path: Path) -> None:
    """SEQUENCE_MODEL=false: the worker never asks Triton for it (no call, no probe), whatever it serves."""
    from streams.context import StreamContext

    ctx = StreamContext(Settings(qdrant_path=tmp_path / "q", sequence_model=False), "w", ())
    assert ctx.sequence_scorer is None
    assert ask_sequence_model(ctx, []) is None

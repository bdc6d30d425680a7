"""Several requests in one Triton ranker call (streams.rankers.TritonRanker.score_many), through a real
tritonserver: the scores equal one call per request (padding to the longest candidate list changes
nothing), empty candidate lists are fine, and a batch over the model's max_batch_size is refused."""

from __future__ import annotations

import numpy as np
import pytest

from recstream.config import Settings
from recstream.recommend.scoring import Candidate, RankContext
from streams.rankers import TritonRanker

pytestmark = [pytest.mark.triton]


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, 384)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _job(rng: np.random.Generator, n: int, query: bool) -> tuple[RankContext, list[Candidate]]:
    vecs = _unit(rng, n + 2)
    cats = ["Drama", "Comedy", "Horror"]
    ctx = RankContext(
        query_vec=vecs[0] if query else None,
        session_vec=vecs[1],
        affinity={"Drama": 0.7, "Horror": 0.3},
        recent_items=["1", "2"],
        recent_categories=["Drama", "Horror", "Drama"],
        max_popularity=40.0,
    )
    cands = [
        Candidate(f"i{i}", float(rng.uniform(-1, 1)), vecs[i + 2], cats[i % 3], {}, float(i % 7)) for i in range(n)
    ]
    return ctx, cands


def test_one_call_for_many_requests_scores_like_one_call_each(triton_server) -> None:
    ranker = TritonRanker(Settings(triton_url=triton_server.url, triton_grpc_url=triton_server.grpc_url))
    assert ranker.max_batch >= 2, "the ranker model should accept batches (config max_batch_size)"
    rng = np.random.default_rng(0)
    jobs = [_job(rng, 50, True), _job(rng, 0, False), _job(rng, 17, False), _job(rng, 3, True)]
    jobs = jobs[: ranker.max_batch]
    batched, version = ranker.score_many(jobs, timeout_s=10.0)
    assert version.startswith("ranker-v")
    assert [len(s) for s in batched] == [len(c) for _, c in jobs]
    for (ctx, cands), got in zip(jobs, batched, strict=True):
        one, _ = ranker.score_versioned(ctx, cands, timeout_s=10.0)
        assert np.allclose(got, one, atol=1e-5)
    with pytest.raises(ValueError, match="at most"):
        ranker.score_many([jobs[0]] * (ranker.max_batch + 1), timeout_s=10.0)


def test_the_served_versions_co_visitation_statistic_feeds_its_features(triton_server) -> None:
    """The worker reads the co-visitation statistic saved beside the served ranker version and
    computes the co_visitation and follows features with the function training uses."""
    from recstream.models.ranker import CAND_FEATURE_NAMES, FOLLOW_SCALE

    ranker = TritonRanker(Settings(triton_url=triton_server.url, triton_grpc_url=triton_server.grpc_url))
    stat = ranker.co_visitation()
    assert stat is not None, f"{ranker.version} was exported without its co-visitation statistic"
    rng = np.random.default_rng(1)
    ctx, _ = _job(rng, 0, False)
    ctx.recent_items = ["1", "50", "100", "181"]  # ml-100k ids: Toy Story, Star Wars, Fargo, Return of the Jedi
    vecs = _unit(rng, 40)
    cands = [Candidate(str(i + 1), 0.5, vecs[i], "Drama", {}, 3.0) for i in range(40)] + [
        Candidate("not-in-the-catalogue", 0.5, vecs[0], "Drama", {}, 0.0)
    ]
    _, feats = ranker.inputs(ctx, cands)
    got = feats[:, CAND_FEATURE_NAMES.index("co_visitation")]
    expected = np.log1p(stat.scores(ctx.recent_items, [c.item_id for c in cands]))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert (got[:-1] > 0).sum() >= 10 and got[-1] == 0.0
    assert stat.follows is not None, f"{ranker.version} was exported without the follows statistic"
    follows = feats[:, CAND_FEATURE_NAMES.index("follows")]
    expected = np.log1p(FOLLOW_SCALE * stat.follow_scores(ctx.recent_items, [c.item_id for c in cands]))
    np.testing.assert_allclose(follows, expected, rtol=1e-5)
    assert (follows[:-1] > 0).sum() >= 5 and follows[-1] == 0.0


def test_lists_place_new_items_as_the_served_version_says(triton_server, tmp_path) -> None:
    """The list stage (streams.recommend_ranking.rank) through real Triton scores: a version that
    says nothing places the candidates nobody has interacted with at their retrieval slots; one whose
    validation turned that off (`places_new_items` false in its meta) lets the ranker order them;
    NEW_ITEM_SLOT_FACTOR, when set, overrides the version."""
    import asyncio
    import json
    import shutil
    from types import SimpleNamespace

    from recstream.config import REPO_ROOT
    from recstream.contracts.events import RecommendationRequest
    from recstream.contracts.models import RANKER
    from recstream.models.ranker import PLACES_NEW_ITEMS
    from recstream.recommend.rerank import new_item_order
    from streams.recommend_context import Pending
    from streams.recommend_ranking import rank

    repo = tmp_path / "model_repo"  # the worker's copy of the repository (Triton serves the same versions)
    shutil.copytree(REPO_ROOT / "model_repo" / RANKER, repo / RANKER)
    urls = {"triton_url": triton_server.url, "triton_grpc_url": triton_server.grpc_url, "model_repo": repo}

    def ordered(**settings: object) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        s = Settings(**urls, **settings)
        ctx, cands = _job(np.random.default_rng(3), 30, False)  # popularity i % 7: every 7th is new
        p = Pending(ev=None, req=RecommendationRequest(user_id="u1"), rctx=ctx, candidates=cands, degraded=None)
        asyncio.run(rank(SimpleNamespace(ranker=TritonRanker(s), settings=s), [p]))
        assert p.scores is not None and p.order is not None and p.degraded is None
        return np.argsort(-p.order, kind="stable"), p.scores, [c.popularity == 0 for c in cands]

    order, logits, new = ordered()
    assert sum(new) == 5
    np.testing.assert_array_equal(order, new_item_order(logits, new, 1.0))
    assert not np.array_equal(order, np.argsort(-logits, kind="stable"))  # the placement moved something

    version = TritonRanker(Settings(**urls)).version.rsplit("-v", 1)[-1]
    meta_file = repo / RANKER / version / "meta.json"
    meta = json.loads(meta_file.read_text())
    meta["extra"][PLACES_NEW_ITEMS] = False
    meta_file.write_text(json.dumps(meta))
    order, logits, new = ordered()
    np.testing.assert_array_equal(order, np.argsort(-logits, kind="stable"))
    order, logits, new = ordered(new_item_slot_factor=0.5)
    np.testing.assert_array_equal(order, new_item_order(logits, new, 0.5))

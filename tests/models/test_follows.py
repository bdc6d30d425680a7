"""The follows statistic (which items came after which in users' sequences), its ranker feature,
its candidates and how it travels with the ranker weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recstream.eval.metrics import metrics_from_ranks, target_ranks
from recstream.models.co_visitation import (
    FOLLOW_LAG_DECAY,
    FOLLOW_RECENCY_DECAY,
    CoVisitation,
    follow_matrix,
)
from recstream.models.ranker import (
    CAND_FEATURE_NAMES,
    FOLLOW_SCALE,
    Ranker,
    RankerConfig,
    RankingContext,
    candidate_slate,
    new_ranker,
)
from recstream.training.ranker import rerank_scores, train_ranker
from tests.models.test_ranker import _ToyRetrieval

IDS = [f"i{n}" for n in range(6)]


def test_follow_matrix_counts_what_came_after_within_the_lags() -> None:
    m = follow_matrix([np.array([0, 1, 2]), np.array([0, 1])], 6, lags=2, decay=0.5).toarray()
    # after 0: item 1 twice at lag 1, item 2 once at lag 2 (weight 0.5); total 2.5, shrunk by +1
    np.testing.assert_allclose(m[0], [0, 2 / 3.5, 0.5 / 3.5, 0, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(m[1], [0, 0, 1 / 2, 0, 0, 0], rtol=1e-6)
    assert m[2].sum() == 0 and m[:, 0].sum() == 0  # nothing follows the last item; nothing precedes 0


def test_follow_scores_weigh_the_most_recent_items_most() -> None:
    stat = CoVisitation.fit([np.array([0, 1]), np.array([2, 3]), np.array([2, 3]), np.array([2, 4])], IDS)
    f = stat.follows.toarray()
    got = stat.follow_scores_idx(np.array([0, 2]), np.arange(6))
    np.testing.assert_allclose(got, f[2] + FOLLOW_RECENCY_DECAY * f[0], rtol=1e-6)
    assert got[1] > 0 and got[3] > got[1]  # 3 follows the most recent item, 1 the one before
    # by id, as serving asks: an unknown candidate scores 0; an unknown history item adds nothing but
    # keeps its place in the window, as an item without training data (i5) does offline
    by_id = stat.follow_scores(["i0", "nope", "i2"], ["i3", "nope", "i1"])
    offline = stat.follow_scores_idx(np.array([0, 5, 2]), np.array([3, 1]))
    np.testing.assert_allclose(by_id, [offline[0], 0, offline[1]])
    assert by_id[2] < got[1]  # i0 now sits two places back
    assert stat.follow_top(["i0", "nope", "i2"], 3) == [IDS[i] for i in stat.follow_top_idx(np.array([0, 5, 2]), 3)]
    assert stat.scores(["i0", "nope"], ["i1"]) == stat.scores_idx(np.array([0, 5]), np.array([1]))
    # the best followers, none of the excluded, in the feature's order
    assert stat.follow_top_idx(np.array([0, 2]), 3).tolist() == [3, 1, 4]
    assert stat.follow_top(["i0", "i2"], 2, exclude=["i3"]) == ["i1", "i4"]
    assert FOLLOW_LAG_DECAY < 1


def test_the_follows_statistic_travels_with_the_ranker(tmp_path: Path) -> None:
    stat = CoVisitation.fit([np.array([0, 1, 2]), np.array([3, 1, 4])], IDS)
    ranker = new_ranker()
    ranker.co_visitation = stat
    back = Ranker.load(ranker.save(tmp_path / "r")).co_visitation
    assert back is not None and back.follows is not None
    assert (back.follows != stat.follows).nnz == 0 and (back.sim != stat.sim).nnz == 0
    # a statistic saved before follows existed still loads: its follows feature is 0, no candidates
    older = CoVisitation(IDS, stat.sim)
    older.save(tmp_path)
    loaded = CoVisitation.load(tmp_path)
    assert loaded is not None and loaded.follows is None
    assert loaded.follow_scores_idx(np.array([0]), np.arange(6)).tolist() == [0.0] * 6
    assert loaded.follow_top_idx(np.array([0]), 3).tolist() == []


def test_the_feature_is_the_scaled_log_of_the_statistic() -> None:
    seqs = [np.array([0, 1, 2]), np.array([0, 1, 3]), np.array([4, 5])]
    ctx = RankingContext(["a"] * 6, seqs, 6, item_ids=IDS)
    cand = np.array([1, 2, 5])
    feats = ctx.features(np.array([0]), cand, np.zeros(3))
    expected = np.log1p(FOLLOW_SCALE * ctx.co_visitation.follow_scores_idx(np.array([0]), cand))
    np.testing.assert_allclose(feats[:, CAND_FEATURE_NAMES.index("follows")], expected, rtol=1e-6)
    assert feats[0, CAND_FEATURE_NAMES.index("follows")] > 0 and feats[2, CAND_FEATURE_NAMES.index("follows")] == 0


def _chain_case():
    """Each item is always followed by the same item (a fixed permutation), which the toy retrieval
    (clusters) cannot see; the next item is the last one's successor."""
    toy = _ToyRetrieval()
    rng = np.random.default_rng(3)
    successor = rng.permutation(60)
    seqs = []
    for _ in range(200):
        items = [int(rng.integers(60))]
        while len(items) < 8:
            nxt = int(successor[items[-1]])
            if nxt in items:
                break
            items.append(nxt)
        if len(items) >= 4:
            seqs.append(np.array(items))
    cats = [f"c{c}" for c in toy.cluster]
    train = [s[:-1] for s in seqs]
    hist, tgt = [s[:-1] for s in seqs], np.array([s[-1] for s in seqs])
    return toy, cats, train, hist, tgt, RankingContext(cats, train, 60)


def test_the_ranker_chooses_the_follows_weight_on_validation() -> None:
    toy, cats, train, hist, tgt, ctx = _chain_case()
    retrieval = (toy.session_vectors_from_index(hist) @ toy.item_vectors.T).numpy()
    ndcg = {"retrieval": metrics_from_ranks(target_ranks(retrieval, tgt, hist))["NDCG@10"]}
    for name, weights in (("without", [0.0]), ("chosen", [0.0, 1.0, 4.0])):
        cfg = RankerConfig(
            epochs=0,
            rerank_depth=30,
            co_visitation_weights=[0.0],
            co_visitation_candidates=[0],
            follows_weights=weights,
            follows_candidates=[0],
        )
        ranker, stats = train_ranker(cfg, toy, train, cats, hist, tgt, progress=False)
        ndcg[name] = metrics_from_ranks(target_ranks(rerank_scores(ranker, toy, ctx, hist, 30), tgt, hist))["NDCG@10"]
        ndcg[f"{name}_weight"] = stats["follows_weight"]
    assert ndcg["without"] == pytest.approx(ndcg["retrieval"], abs=1e-9), ndcg
    assert ndcg["chosen_weight"] > 0 and ndcg["chosen"] > ndcg["retrieval"] + 0.2, ndcg


def test_follows_candidates_reach_what_retrieval_misses() -> None:
    """Ten slots, the successor rarely among retrieval's: validation gives slots to the followers."""
    toy, cats, train, hist, tgt, ctx = _chain_case()
    got = {}
    for name, slots in (("retrieval's", [0]), ("with follows", [0, 5])):
        cfg = RankerConfig(
            epochs=0,
            rerank_depth=10,
            co_visitation_weights=[0.0],
            co_visitation_candidates=[0],
            follows_weights=[0.0, 4.0],
            follows_candidates=slots,
        )
        ranker, stats = train_ranker(cfg, toy, train, cats, hist, tgt, progress=False)
        got[name] = (
            stats["follows_candidates"],
            ranker.follows_candidates,
            metrics_from_ranks(target_ranks(rerank_scores(ranker, toy, ctx, hist, 10), tgt, hist))["NDCG@10"],
        )
    assert got["retrieval's"][:2] == (0, 0) and got["with follows"][:2] == (5, 5), got
    assert got["with follows"][2] > got["retrieval's"][2] + 0.2, got

    # the slate: retrieval's head, then co-visited, then followers, then retrieval's next items for
    # what the statistic cannot fill; none seen or repeated
    scores = np.linspace(1.0, 0.0, 60)
    stat = ctx.co_visitation
    checked = 0
    for h in hist:
        slate = candidate_slate(scores, h, 12, stat, 3, 4)
        head = np.array([i for i in range(60) if i not in set(h.tolist())][:12])
        taken = np.concatenate([h, head[:5]])
        co = stat.top_idx(h, 3, taken)
        followers = [i for i in stat.follow_top_idx(h, 7, taken).tolist() if i not in co][:4]
        extra = [*co.tolist(), *followers]
        fill = [i for i in head[5:] if i not in extra][: 7 - len(extra)]
        assert slate.tolist() == [*head[:5].tolist(), *fill, *extra]
        checked += bool(followers)
    assert checked > 10

"""A policy that learns click lifts starts from the order the worker serves (the ranker's logits
fused with the sequence model's scores, new items placed by retrieval), not from the ranker's logits
alone: with no evidence it shows what the greedy list shows, and it still publishes each item's own
logit. Through the worker's list stage (streams.recommend_ranking.finish) with the real policies."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from recstream.contracts.events import RecommendationRequest
from recstream.explore import make_policy
from recstream.explore.feedback import PolicyFeedback
from recstream.models.sequence_fusion import fused_scores
from recstream.recommend.rerank import place_new_items
from recstream.recommend.scoring import Candidate, RankContext
from streams.recommend_context import Pending
from streams.recommend_ranking import finish, served_order_logits

N = 12
#: The ranker's logits: candidate n scores 12 - n, so by logits alone the list is 0, 1, 2, ...
LOGITS = np.arange(N, 0, -1, dtype=np.float32)
#: The sequence model disagrees: it likes the candidates the ranker puts last.
SEQUENCE = np.arange(N, dtype=np.float64)
NEW = [n == 7 for n in range(N)]  # nobody has interacted with candidate 7: retrieval places it


def _pending(order: np.ndarray) -> Pending:
    # a category each: the diversity cap cannot reorder anything
    cands = [Candidate(f"i{n}", retrieval_score=1.0 - n / 100, category=f"c{n}") for n in range(N)]
    req = RecommendationRequest(user_id="u1", k=5)
    return Pending(ev=None, req=req, rctx=RankContext(), candidates=cands, degraded=None, scores=LOGITS, order=order)


def _ctx(policy_spec: str) -> SimpleNamespace:
    policy = make_policy(policy_spec)
    feedback = PolicyFeedback(policy) if policy_spec.startswith(("lift", "ts")) else None
    settings = SimpleNamespace(ranking_log="off")
    return SimpleNamespace(policy=policy, policy_feedback=feedback, settings=settings, rng=np.random.default_rng(0))


def _served_order() -> np.ndarray:
    """What the list stage orders by: fused, then the new item at half its retrieval slot."""
    return place_new_items(fused_scores(LOGITS, SEQUENCE, weight=2.0), NEW, slot_factor=0.5)


def test_a_learning_policy_without_evidence_shows_the_greedy_fused_list() -> None:
    order = _served_order()
    greedy = finish(_ctx("greedy"), _pending(order)).result
    learning = finish(_ctx("lift:1"), _pending(order)).result
    shown = [i.item_id for i in greedy.items]
    assert shown != [f"i{n}" for n in range(5)]  # the fusion and the placement did reorder the list
    assert "i7" in shown[:4]
    assert learning.policy == "mean_lift_p1_h20000"
    assert [i.item_id for i in learning.items] == shown
    # what is published stays each item's own logit
    assert [i.score for i in learning.items] == [float(LOGITS[int(i.item_id[1:])]) for i in learning.items]


def test_a_learning_policy_remembers_the_base_it_ranked_by() -> None:
    """The feedback joiner learns a lift against the base the slot was ranked with."""
    ctx = _ctx("lift:1")
    answer = finish(ctx, _pending(_served_order())).result
    top = answer.items[0]
    assert ctx.policy_feedback.observe(answer.request_id, top.item_id, 0, 1.0)
    assert ctx.policy_feedback.policy.lift_mean([top.item_id])[0] > 1.0


@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(-50, 50)), st.randoms(use_true_random=False))
def test_served_order_logits_keep_the_order_and_the_logits(order: np.ndarray, rnd) -> None:
    logits = np.array([rnd.uniform(-5, 5) for _ in order])
    base = served_order_logits(order, logits)
    assert sorted(base) == sorted(logits)
    by_order = np.argsort(-order, kind="stable")
    assert np.all(np.diff(base[by_order]) <= 0)
    # where the order is the logits' own, nothing moves
    assert np.array_equal(served_order_logits(logits, logits), logits)

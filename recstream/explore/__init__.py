"""Exploration policies over ranked lists (exact propensities) and a Thompson-sampling arm chooser.

How the stream recommender uses a policy (pure, no I/O; one rng per worker, seeded):

    from recstream.explore import make_policy
    policy = make_policy("pl:0.5:2")          # or "greedy", "eps:0.1:3", "ts:5"; policy.name is the arm label
    shown = policy.rank(item_ids, scores, k, rng)   # scores: the ranker's logits for item_ids
    items = [RankedItem(item_id=s.item_id, score=score_of[s.item_id], position=s.position,
                        propensity=s.propensity) for s in shown]
    RecommendationResult(..., items=items, policy=policy.name, model_version=<version Triton reports>)

A policy that learns online (LiftThompson, "ts:..." / "lift:...") also takes each shown slot's outcome:

    policy.observe(item_id, position, score, clicked, group=category)   # after the click / no-click

In the stream worker recstream.explore.feedback.PolicyFeedback does both ends: the recommender ranks
through it (it remembers the logit and category of each shown slot), the feedback joiner reports
each closed impression window to it.

The propensity travels with the impression (BehaviourEvent.propensity -> TrainingExample.propensity)
to the continual learner and to off-policy evaluation (recstream.ope).
"""

from recstream.explore.bandit import ThompsonArms
from recstream.explore.policies import (
    EpsilonGreedy,
    Greedy,
    PlackettLuce,
    RankingPolicy,
    Shown,
    greedy_order,
)
from recstream.explore.specs import make_policy
from recstream.explore.thompson import LiftThompson

__all__ = [
    "EpsilonGreedy",
    "Greedy",
    "LiftThompson",
    "PlackettLuce",
    "RankingPolicy",
    "Shown",
    "ThompsonArms",
    "greedy_order",
    "make_policy",
]

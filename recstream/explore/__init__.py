"""Exploration policies over ranked lists (exact propensities) and a Thompson-sampling arm chooser."""

from recstream.explore.bandit import ThompsonArms
from recstream.explore.policies import (
    EpsilonGreedy,
    Greedy,
    PlackettLuce,
    RankingPolicy,
    Shown,
    greedy_order,
    make_policy,
)

__all__ = [
    "EpsilonGreedy",
    "Greedy",
    "PlackettLuce",
    "RankingPolicy",
    "Shown",
    "ThompsonArms",
    "greedy_order",
    "make_policy",
]

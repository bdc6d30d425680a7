"""Thompson sampling over a few exploration arms (e.g. greedy vs two temperatures).

Why: how much to explore is itself unknown and changes with drift; a Beta-Bernoulli bandit on each
arm's click-through moves traffic to the arm that currently earns the most clicks while still
trying the others. The chosen arm's name goes into RecommendationResult.policy, so clicks can be
credited back to it (`update`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recstream.explore.policies import RankingPolicy


class ThompsonArms:
    """Beta(1 + clicks, 1 + skips) posterior per arm; `choose` samples each and takes the best.

    `decay` < 1 discounts old evidence on every update so the bandit keeps adapting after drift.
    """

    def __init__(self, arms: Sequence[RankingPolicy], decay: float = 1.0) -> None:
        if not arms:
            raise ValueError("need at least one arm")
        self.arms = {a.name: a for a in arms}
        self.alpha = {a.name: 1.0 for a in arms}
        self.beta = {a.name: 1.0 for a in arms}
        self.decay = float(decay)

    def choose(self, rng: np.random.Generator) -> RankingPolicy:
        names = list(self.arms)
        draws = [rng.beta(self.alpha[n], self.beta[n]) for n in names]
        return self.arms[names[int(np.argmax(draws))]]

    def update(self, arm: str, clicks: float, impressions: float) -> None:
        """Credit `clicks` out of `impressions` shown slots to `arm`."""
        if arm not in self.arms:
            return
        for n in self.arms:
            self.alpha[n] = 1.0 + (self.alpha[n] - 1.0) * self.decay
            self.beta[n] = 1.0 + (self.beta[n] - 1.0) * self.decay
        self.alpha[arm] += clicks
        self.beta[arm] += max(0.0, impressions - clicks)

    def means(self) -> dict[str, float]:
        return {n: self.alpha[n] / (self.alpha[n] + self.beta[n]) for n in self.arms}

"""Choosing how a new item is served (`ColdItemRule`) on cold-start validation cases only.

A trained bundle cannot judge its own cold rule on the data it trained on: every item there has
training data. The cold-start split (`recstream.data.cold_start_split`) holds a share of the items
out of training entirely; the validation cases whose target is such an item (`cold_valid`) are
where a rule may be chosen. The rule is judged on the served path (item vectors as the exported
encoder makes them, ranked by the ranker), so the choice is about what serving does.

`make train` trains (or reuses) the cold-start split's bundle for its seed, chooses here
(`recstream.training.bundle.cold_rule_for`) and ships the choice in the item encoder's meta.json;
the quality bench does the same per seed, so its cold-start rows report what each seed would serve.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, Field

from recstream.models.served import ColdItemRule

log = logging.getLogger(__name__)

#: Candidates, in order of preference on a tie (the first is the default the models train with).
#: Small on purpose: with ~100 cold validation cases every extra candidate is a chance to fit noise.
COLD_RULE_GRID: tuple[ColdItemRule, ...] = (
    ColdItemRule(),
    ColdItemRule(neighbours=5, temperature=0.1),
    ColdItemRule(neighbours=3, temperature=0.05),
    ColdItemRule(neighbours=3, temperature=0.1),
    ColdItemRule(neighbours=8, temperature=0.05),
    ColdItemRule(neighbours=8, temperature=0.1),
    ColdItemRule(neighbours=0),  # the bare text vector
)


class ColdRuleCandidate(BaseModel):
    rule: ColdItemRule
    cold_valid_ndcg10: float


class ColdRuleChoice(BaseModel):
    """The chosen rule and every candidate's cold-validation NDCG@10 (stored with the export)."""

    rule: ColdItemRule
    reason: str = Field(description="chosen on cold_valid, or why the default was kept")
    cold_valid_cases: int = 0
    candidates: list[ColdRuleCandidate] = Field(default_factory=list)


class RuleScorer(Protocol):
    """A served-path scorer whose cold rule can be set (recstream.training.bundle.BundleRecommender)."""

    cold_rule: ColdItemRule | None

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray: ...


def choose_cold_rule(
    scorer: RuleScorer, cases: Any | None, grid: tuple[ColdItemRule, ...] = COLD_RULE_GRID
) -> ColdRuleChoice:
    """The candidate with the highest served NDCG@10 on cold-start validation `cases` (the earliest
    in `grid` on a tie). Without such cases the default is kept, and the choice says so."""
    from recstream.eval.metrics import evaluate

    if cases is None or len(cases.targets) == 0:
        return ColdRuleChoice(rule=grid[0], reason="no cold-start validation cases: the default is kept")
    scored = []
    for rule in grid:
        scorer.cold_rule = rule
        scored.append(ColdRuleCandidate(rule=rule, cold_valid_ndcg10=float(evaluate(scorer, cases)["NDCG@10"])))
    best = max(scored, key=lambda c: c.cold_valid_ndcg10)  # max keeps the first of equals
    log.info(
        "cold rule %s chosen on %d cold validation cases (NDCG@10 %.4f)",
        best.rule.model_dump(),
        len(cases.targets),
        best.cold_valid_ndcg10,
    )
    return ColdRuleChoice(
        rule=best.rule,
        reason="best served NDCG@10 on cold_valid",
        cold_valid_cases=len(cases.targets),
        candidates=scored,
    )

"""Promotion gate: a candidate goes live only if it is not worse than the live model on recent data.

The held-back window is the newest impressions, never used to train the candidate. Metrics are
weighted like the training loss (clicks by 1/exam(slot); optionally by 1/logging propensity), so
the comparison targets the position-debiased relevance order:

* weighted AUC (primary, calibration-free: the ranker's job is ordering, and the live model from
  a listwise training run is not calibrated as a probability),
* weighted log-loss (reported; a secondary check can be enabled).

"Not worse" = candidate AUC >= live AUC - tolerance. A candidate trained on shuffled labels learns
noise, its AUC drops towards 0.5 and it is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, Field
from torch import nn

from recstream.continual.learner import Example, FeatureSource, ipw_weights, predict


class GateConfig(BaseModel):
    tolerance: float = Field(0.005, ge=0, description="Allowed AUC drop versus live")
    min_examples: int = Field(200, ge=1, description="Below this the window is too small to judge: refuse")
    check_logloss: bool = Field(False, description="Also require log-loss <= live + logloss_tolerance")
    logloss_tolerance: float = 0.02
    exam_eta: float = 1.0
    clip_weight: float = 10.0
    policy_weighting: bool = Field(False, description="Also weight by 1/logging propensity (as the learner)")


@dataclass
class GateDecision:
    accepted: bool
    reason: str
    candidate: dict[str, float] = field(default_factory=dict)
    live: dict[str, float] = field(default_factory=dict)


def weighted_auc(scores: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    """P(score of a random positive > score of a random negative), pairs weighted by w_pos * w_neg;
    ties count one half. O(n log n)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels) > 0
    w = np.asarray(weights, dtype=np.float64)
    wp, wn = w[y].sum(), w[~y].sum()
    if wp == 0 or wn == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    s, y, w = s[order], y[order], w[order]
    _, start = np.unique(s, return_index=True)
    neg_w = np.add.reduceat(np.where(~y, w, 0.0), start)
    pos_w = np.add.reduceat(np.where(y, w, 0.0), start)
    neg_below = np.concatenate([[0.0], np.cumsum(neg_w)[:-1]])
    return float(((neg_below + 0.5 * neg_w) * pos_w).sum() / (wp * wn))


def weighted_logloss(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray) -> float:
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    loss = np.logaddexp(0.0, z) - y * z  # BCE with logits, stable
    return float((loss * weights).sum() / weights.sum())


def evaluate(net: nn.Module, window: Sequence[Example], features: FeatureSource, cfg: GateConfig) -> dict[str, float]:
    y = np.array([e.label for e in window], dtype=np.float64)
    w = ipw_weights(
        np.array([e.position for e in window]),
        np.array([e.propensity for e in window]),
        y,
        cfg.exam_eta,
        cfg.clip_weight,
        cfg.policy_weighting,
    )
    z = predict(net, window, features)
    return {
        "auc": weighted_auc(z, y, w),
        "logloss": weighted_logloss(z, y, w),
        "n": float(len(window)),
        "non_finite": float((~np.isfinite(z)).sum()),
    }


def decide(
    candidate: nn.Module, live: nn.Module, window: Sequence[Example], features: FeatureSource, cfg: GateConfig
) -> GateDecision:
    """Compare candidate and live on the held-back window; accept only a not-worse candidate."""
    if len(window) < cfg.min_examples:
        return GateDecision(False, f"window too small ({len(window)} < {cfg.min_examples})")
    cand = evaluate(candidate, window, features, cfg)
    cur = evaluate(live, window, features, cfg)
    if cand["non_finite"]:  # NaN scores tie with each other: their AUC is 0.5, which can pass
        return GateDecision(False, f"{int(cand['non_finite'])} scores not finite", cand, cur)
    if not np.isfinite(cand["auc"]) or not np.isfinite(cur["auc"]):
        return GateDecision(False, "window has no clicks or no skips", cand, cur)
    if cand["auc"] < cur["auc"] - cfg.tolerance:
        return GateDecision(False, f"AUC {cand['auc']:.4f} < live {cur['auc']:.4f} - {cfg.tolerance}", cand, cur)
    if cfg.check_logloss and cand["logloss"] > cur["logloss"] + cfg.logloss_tolerance:
        return GateDecision(
            False, f"log-loss {cand['logloss']:.4f} > live {cur['logloss']:.4f} + {cfg.logloss_tolerance}", cand, cur
        )
    return GateDecision(True, f"AUC {cand['auc']:.4f} vs live {cur['auc']:.4f}", cand, cur)

"""Offline evaluation: full-ranking metrics and the baselines every project model is compared with."""

from recstream.eval.metrics import evaluate, metrics_from_ranks, rank_cases, target_ranks

__all__ = ["evaluate", "metrics_from_ranks", "rank_cases", "target_ranks"]

"""A logged request: a RankingLog (the pool a stochastic policy drew from) joined by request id with
the training examples of its shown slots, and what makes one unusable for an estimate."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from recstream.contracts.events import RankingLog, TrainingExample


@dataclass
class LoggedRequest:
    """One logged answer: the pool it was drawn from and each shown slot's training example."""

    log: RankingLog
    slots: list[TrainingExample]  # by position 0..n-1
    # The ranker's inputs as arrays (context [768], pool features [n, K]) when a long-lived holder
    # (LogWindow) keeps them compact instead of in the log's float lists (~4x the memory).
    inputs: tuple[np.ndarray, np.ndarray] | None = None

    def ranker_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """(context [768], features [n, K]) as served; UnusableLog if the worker did not log them."""
        if self.inputs is not None:
            return self.inputs
        rl = self.log
        if rl.context is None or any(c.features is None for c in rl.pool):
            raise UnusableLog("logged without the ranker's inputs (heuristic ranker or an older worker)")
        return np.asarray(rl.context, np.float32), np.asarray([c.features for c in rl.pool], np.float32)


class UnusableLog(ValueError):
    """A logged request that cannot enter the estimate; the message is the reason it is counted under."""


def join(logs: Iterable[RankingLog], examples: Iterable[TrainingExample]) -> tuple[list[LoggedRequest], int]:
    """Complete logged requests (every shown slot has its outcome) and the number of incomplete ones.

    Duplicates (at-least-once delivery) collapse to the last copy of each request / (request, slot)."""
    by_request: dict[str, dict[int, TrainingExample]] = {}
    for ex in examples:
        by_request.setdefault(ex.request_id, {})[ex.position] = ex
    complete: list[LoggedRequest] = []
    incomplete = 0
    for rl in {r.request_id: r for r in logs}.values():
        shown = min(rl.k, len(rl.pool))
        slots = by_request.get(rl.request_id, {})
        if not slots:
            continue  # nothing was logged for this answer (never displayed, or its window is still open)
        if any(j not in slots for j in range(shown)):
            incomplete += 1
            continue
        complete.append(LoggedRequest(rl, [slots[j] for j in range(shown)]))
    return complete, incomplete

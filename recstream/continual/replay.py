"""Replay buffer for training examples: a recency window plus a reservoir sample of everything.

Why both: fine-tuning only on the newest clicks follows drift fast but forgets the rest of the
catalogue (catastrophic forgetting); a uniform reservoir over the whole stream remembers but reacts
slowly. A batch mixes the two (`recent_fraction`), so new data moves the model and old data holds it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Generic, TypeVar

import numpy as np
from pydantic import BaseModel, Field

T = TypeVar("T")


class ReplayConfig(BaseModel):
    recent_capacity: int = Field(4096, ge=1, description="Newest examples kept in order")
    reservoir_capacity: int = Field(16384, ge=1, description="Uniform sample of the whole stream")
    recent_fraction: float = Field(0.5, ge=0, le=1, description="Share of a batch drawn from the recent window")
    seed: int = 0


class ReplayBuffer(Generic[T]):
    """Reservoir (Vitter's algorithm R) + a FIFO of the most recent examples."""

    def __init__(self, cfg: ReplayConfig | None = None) -> None:
        self.cfg = cfg or ReplayConfig()
        self.recent: deque[T] = deque(maxlen=self.cfg.recent_capacity)
        self.reservoir: list[T] = []
        self.seen = 0
        self._rng = np.random.default_rng(self.cfg.seed)

    def add(self, item: T) -> None:
        self.seen += 1
        self.recent.append(item)
        if len(self.reservoir) < self.cfg.reservoir_capacity:
            self.reservoir.append(item)
        else:
            j = int(self._rng.integers(0, self.seen))
            if j < self.cfg.reservoir_capacity:
                self.reservoir[j] = item

    def extend(self, items: Iterable[T]) -> None:
        for it in items:
            self.add(it)

    def __len__(self) -> int:
        return len(self.reservoir)

    def latest(self, n: int) -> list[T]:
        """The n newest examples, oldest first."""
        n = min(n, len(self.recent))
        return list(self.recent)[len(self.recent) - n :]

    def sample(self, n: int, exclude_latest: int = 0) -> list[T]:
        """A mixed batch: recent_fraction from the recent window (minus the newest `exclude_latest`,
        held back for the promotion gate), the rest from the reservoir."""
        recent = list(self.recent)[: max(0, len(self.recent) - exclude_latest)]
        held = set(map(id, list(self.recent)[len(recent) :]))
        reservoir = [x for x in self.reservoir if id(x) not in held] if held else self.reservoir
        n_recent = min(len(recent), round(n * self.cfg.recent_fraction))
        n_old = min(len(reservoir), n - n_recent)
        out: list[T] = []
        if n_recent:
            out += [recent[i] for i in self._rng.choice(len(recent), n_recent, replace=False)]
        if n_old:
            out += [reservoir[i] for i in self._rng.choice(len(reservoir), n_old, replace=False)]
        return out

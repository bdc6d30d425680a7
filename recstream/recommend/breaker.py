"""A circuit breaker for calls to a model server: after a failure, stop asking for a while.

Without it every request during a Triton outage would first wait out the full call deadline
(250 ms) before falling back; with it only one probe per `cooldown_s` pays that price.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class CircuitBreaker:
    """Opens after `threshold` consecutive failures (one deadline miss on a busy box is not an
    outage); while open, `allow()` is False until `cooldown_s` passed, then one probe goes through."""

    threshold: int = 3
    cooldown_s: float = 1.0
    clock: Callable[[], float] = time.monotonic
    open_until: float = field(default=0.0, init=False)
    failures: int = field(default=0, init=False)
    # the ranker's chunks ask from pool threads at once: one of them, not each, takes the probe
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    def allow(self) -> bool:
        """True if a call may be attempted now: closed, or the one probe after the cooldown. The
        probe holds the breaker open for another cooldown, so the callers that arrive while it is
        out are refused (they all went through, each waiting out a hung server's deadline)."""
        with self._lock:
            now = self.clock()
            if now < self.open_until:
                return False
            if self.open_until:
                self.open_until = now + self.cooldown_s
            return True

    def refusing(self) -> bool:
        """Whether `allow()` would refuse now, without taking the probe (a cheap early exit)."""
        return self.clock() < self.open_until

    def success(self) -> None:
        with self._lock:
            self.failures = 0
            self.open_until = 0.0

    def failure(self) -> None:
        with self._lock:
            self.failures += 1
            if self.failures >= self.threshold:
                self.open_until = self.clock() + self.cooldown_s

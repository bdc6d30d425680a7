"""Closing the loop of an online-learning policy inside a stream worker.

Why: LiftThompson (``ts:...``) and its posterior-mean variant (``lift:...``) learn from every shown
slot's outcome, but the outcome arrives much later and on another thread: the recommender ranks on
the request thread, the feedback joiner closes an impression's window (label 0/1) on the behaviour
thread, and neither event carries the ranker logit the item was shown with. `PolicyFeedback`
remembers (logit, group) per shown slot for a bounded number of slots, hands each closed window
back to the policy, and serialises the two threads around the policy's state.

A slot whose memory was evicted, or that was shown by another worker before a rebalance, or
before a restart, is counted as ``unknown`` and skipped; losing a few observations only slows the
learning. Slots are forgotten once no window can close for them any more (``max_age_s``: the
feedback window plus a grace for client delay; counted as ``expired``: answers the application
never showed), so the memory follows the request rate by itself; ``capacity`` only caps it
(``evicted``) when the rate outgrows it. What the policy learned is per worker; `save` / `load`
keep it across restarts (the worker saves every POLICY_SAVE_S and at shutdown, written atomically).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from recstream.atomic import atomic_write_bytes
from recstream.explore.policies import Shown
from recstream.telemetry import POLICY_FEEDBACK

log = logging.getLogger(__name__)

#: How often a worker writes its policy's evidence to disk (and at shutdown).
POLICY_SAVE_S = 30.0
#: How long after an answer its impressions may still arrive (the application shows the answer, then
#: publishes them); a slot is remembered for the feedback window plus this.
CLIENT_DELAY_GRACE_S = 60.0


def learns_online(policy: object) -> bool:
    """True for policies that take each shown slot's outcome (`observe`)."""
    return callable(getattr(policy, "observe", None))


class PolicyFeedback:
    """Shown-slot memory + thread-safe rank/observe for one learning policy (see the module doc)."""

    def __init__(
        self,
        policy: object,
        capacity: int = 200_000,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not learns_online(policy):
            raise TypeError(f"policy {getattr(policy, 'name', policy)!r} does not learn from feedback")
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError("max_age_s must be > 0 (or None: keep slots until the capacity evicts them)")
        self.policy = policy
        self.capacity = int(capacity)
        self.max_age_s = max_age_s
        self._clock = clock
        # (request, item) -> (logit, group, shown at); insertion order = age order
        self._shown: OrderedDict[tuple[str, str], tuple[float, str | None, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.unsaved = 0  # observations since the last save

    def __len__(self) -> int:
        return len(self._shown)

    def rank(
        self,
        request_id: str,
        item_ids: Sequence[str],
        logits: np.ndarray,
        k: int,
        rng: np.random.Generator,
        groups: Sequence[str | None] | None = None,
    ) -> list[Shown]:
        """The policy's ranking of the candidates, remembered per shown slot for `observe`."""
        groups_list = list(groups) if groups is not None else [None] * len(item_ids)
        with self._lock:
            shown = self.policy.rank(item_ids, logits, k, rng, groups=groups_list)  # type: ignore[attr-defined]
            now = self._clock()
            self._expire(now)
            row = {iid: n for n, iid in enumerate(item_ids)}
            for s in shown:
                j = row[s.item_id]
                key = (request_id, s.item_id)
                self._shown.pop(key, None)  # a re-answered request goes to the end: expiry runs oldest first
                self._shown[key] = (float(logits[j]), groups_list[j], now)
            while len(self._shown) > self.capacity:
                self._shown.popitem(last=False)
                POLICY_FEEDBACK.labels(outcome="evicted").inc()
        return shown

    def _expire(self, now: float) -> None:
        """Forget the slots older than max_age_s (oldest first; the caller holds the lock)."""
        if self.max_age_s is None:
            return
        expired = 0
        while self._shown:
            _, (_, _, shown_at) = next(iter(self._shown.items()))
            if now - shown_at <= self.max_age_s:
                break
            self._shown.popitem(last=False)
            expired += 1
        if expired:
            POLICY_FEEDBACK.labels(outcome="expired").inc(expired)

    def observe(self, request_id: str, item_id: str, position: int, clicked: float) -> bool:
        """One closed impression window; False (and counted as unknown) if the slot is not remembered."""
        with self._lock:
            memory = self._shown.pop((request_id, item_id), None)
            if memory is None:
                POLICY_FEEDBACK.labels(outcome="unknown").inc()
                return False
            logit, group, _ = memory
            self.policy.observe(item_id, position, logit, float(clicked), group)  # type: ignore[attr-defined]
            self.unsaved += 1
        POLICY_FEEDBACK.labels(outcome="clicked" if clicked > 0 else "not_clicked").inc()
        return True

    def save(self, path: Path) -> None:
        """Write the policy's evidence atomically (a crash mid-write leaves the previous file)."""
        with self._lock:
            state = self.policy.evidence()  # type: ignore[attr-defined]
            pending = self.unsaved
        buf = io.BytesIO()
        np.savez(buf, **state)
        atomic_write_bytes(path, buf.getvalue())
        with self._lock:  # only after the write: a failed one is retried at the next snapshot
            self.unsaved -= pending

    def load(self, path: Path) -> bool:
        """Restore evidence saved by `save`; False (and a warning for a bad file) when there is none."""
        if not path.is_file():
            return False
        try:
            with np.load(path, allow_pickle=False) as saved:
                state = {k: saved[k] for k in saved.files}
            with self._lock:
                self.policy.load_evidence(state)  # type: ignore[attr-defined]
        except Exception as exc:  # any unreadable file (truncated zip, wrong arrays): learn afresh
            log.warning("policy state %s not loaded, starting fresh: %s: %s", path, type(exc).__name__, exc)
            return False
        log.info("policy state loaded from %s (%d items)", path, len(state["items"]))
        return True

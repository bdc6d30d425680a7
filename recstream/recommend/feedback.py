"""Joining impressions with what followed them into training examples (pure part of the joiner).

An impression opens a window; a click/add_to_cart/purchase with the same request_id and item inside
it sets the labels; when the window closes the example is emitted, label 0 if nothing followed.
Emitting at close (not at the click) lets a purchase after the click land in the same example.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from recstream.contracts.events import BehaviourEvent, BehaviourType, TrainingExample

POSITIVE = {BehaviourType.click.value, BehaviourType.add_to_cart.value, BehaviourType.purchase.value}


def impression_key(request_id: str, item_id: str) -> str:
    return f"{request_id}|{item_id}"


@dataclass
class PendingImpression:
    request_id: str
    user_id: str
    item_id: str
    position: int
    propensity: float
    deadline_ms: int  # wall-clock ms at which the window closes
    partition: int  # source partition: where this key's changelog lives
    session_id: str | None = None
    model_version: str | None = None
    shown_ts_ms: int = 0
    clicked: bool = False
    purchased: bool = False
    context_items: list[str] = field(default_factory=list)
    query: str | None = None  # the search's query, when this worker answered it (SearchQueries)

    @classmethod
    def from_event(
        cls,
        ev: BehaviourEvent,
        *,
        now_ms: int,
        window_ms: int,
        partition: int,
        context_items: list[str],
        query: str | None = None,
    ) -> PendingImpression | None:
        """None for impressions that cannot be joined (no request id)."""
        if ev.request_id is None:
            return None
        return cls(
            request_id=ev.request_id,
            user_id=ev.user_id,
            item_id=ev.item_id,
            position=ev.position if ev.position is not None else 0,
            propensity=ev.propensity if ev.propensity is not None else 1.0,
            deadline_ms=now_ms + window_ms,
            partition=partition,
            session_id=ev.session_id,
            model_version=ev.model_version,
            shown_ts_ms=ev.ts_ms,
            context_items=context_items[-20:],
            query=query,
        )

    def record(self, event_type: str) -> bool:
        """Apply an outcome; True if it changed the labels."""
        before = (self.clicked, self.purchased)
        if event_type in POSITIVE:
            self.clicked = True
        if event_type == BehaviourType.purchase.value:
            self.purchased = True
        return before != (self.clicked, self.purchased)

    def to_example(self) -> TrainingExample:
        return TrainingExample(
            ts_ms=self.shown_ts_ms,
            request_id=self.request_id,
            user_id=self.user_id,
            session_id=self.session_id,
            item_id=self.item_id,
            position=self.position,
            propensity=self.propensity,
            model_version=self.model_version,
            clicked=self.clicked,
            purchased=self.purchased,
            label=1.0 if self.clicked else 0.0,
            context_items=self.context_items,
            query=self.query,
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> PendingImpression:
        return cls(**json.loads(raw))


class SearchQueries:
    """Request id -> query of the searches this worker answered, until their impressions arrive.

    Why: an impression names its request, not the query, and a training example of a search without
    its query loses half of what the ranker saw. The worker that answered a search also joins its
    impressions (requests and behaviour are consumed co-partitioned by user), so it remembers the
    query for a while. Bounded by age and count; the request thread writes, the behaviour thread
    reads. A worker that runs the feedback agent without the recommender (or a restart) finds
    nothing, and the example has no query, as before."""

    def __init__(self, ttl_s: float = 120.0, capacity: int = 100_000, clock: Callable[[], float] = time.monotonic):
        if ttl_s <= 0 or capacity < 1:
            raise ValueError("ttl_s must be > 0 and capacity >= 1")
        self.ttl_s = ttl_s
        self.capacity = capacity
        self._clock = clock
        self._queries: OrderedDict[str, tuple[float, str]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._queries)

    def remember(self, request_id: str, query: str) -> None:
        now = self._clock()
        with self._lock:
            self._queries[request_id] = (now, query)
            self._queries.move_to_end(request_id)
            while self._queries:
                oldest, (at, _) = next(iter(self._queries.items()))
                if len(self._queries) <= self.capacity and now - at <= self.ttl_s:
                    break
                del self._queries[oldest]

    def get(self, request_id: str) -> str | None:
        with self._lock:
            hit = self._queries.get(request_id)
        if hit is None or self._clock() - hit[0] > self.ttl_s:
            return None
        return hit[1]

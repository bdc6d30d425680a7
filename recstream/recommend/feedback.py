"""Joining impressions with what followed them into training examples (pure part of the joiner).

An impression opens a window; a click/add_to_cart/purchase with the same request_id and item inside
it sets the labels; when the window closes the example is emitted, label 0 if nothing followed.
Emitting at close (not at the click) lets a purchase after the click land in the same example.
"""

from __future__ import annotations

import json
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

    @classmethod
    def from_event(
        cls, ev: BehaviourEvent, *, now_ms: int, window_ms: int, partition: int, context_items: list[str]
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
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> PendingImpression:
        return cls(**json.loads(raw))

"""Turn an interaction data set into contract events, and send event streams at a fixed rate.

MovieLens-style ratings become behaviour: every rating is a `view`, a rating of 4+ also a
`click` and a 5 an `add_to_cart` + `purchase`; a user's session is one calendar day.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

from recstream.contracts.events import BehaviourEvent, BehaviourType, ItemUpsert
from recstream.contracts.topics import TOPICS


def catalog_events(items) -> list[ItemUpsert]:
    """Items table (item_id, title, category, text, ...) -> catalog upserts."""
    out = []
    for row in items.itertuples(index=False):
        genres = [g for g in str(getattr(row, "text", "")).split("|")[-1].split() if g]
        out.append(
            ItemUpsert(
                item_id=str(row.item_id),
                title=str(row.title),
                category=str(row.category or "unknown"),
                tags=genres[:16],
                price=float(getattr(row, "price", 0.0) or 0.0) or None,
            )
        )
    return out


def behaviour_events(interactions) -> Iterator[BehaviourEvent]:
    """Interactions table (user_id, item_id, ts, rating) in time order -> behaviour events."""
    df = interactions.sort_values(["ts"], kind="stable")
    for row in df.itertuples(index=False):
        user, item, ts = str(row.user_id), str(row.item_id), int(row.ts)
        session = f"{user}-{ts // 86400}"
        rating = float(getattr(row, "rating", 0) or 0)
        kinds = [BehaviourType.view]
        if rating >= 4:
            kinds.append(BehaviourType.click)
        if rating >= 5:
            kinds += [BehaviourType.add_to_cart, BehaviourType.purchase]
        for kind in kinds:
            yield BehaviourEvent(type=kind, user_id=user, session_id=session, item_id=item, ts_ms=ts * 1000)


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """Lines of {"topic": <logical topic>, "event": {...}}."""
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            if rec.get("topic") not in TOPICS:
                raise ValueError(f"{path}:{n}: unknown topic {rec.get('topic')!r}; known: {sorted(TOPICS)}")
            yield rec["topic"], rec["event"]


class RateLimiter:
    """Paces a loop at `rate` per second (0 = unlimited) without drifting over long replays."""

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.start = time.perf_counter()
        self.count = 0

    def wait(self) -> None:
        self.count += 1
        if not self.interval:
            return
        due = self.start + self.count * self.interval
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)


def paced(events: Iterable[tuple[str, BaseModel | dict]], rate: float) -> Iterator[tuple[str, BaseModel | dict]]:
    limiter = RateLimiter(rate)
    for item in events:
        limiter.wait()
        yield item

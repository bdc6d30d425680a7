"""Send event streams at a fixed rate: a JSON-lines file of events, or a data set's events
(recstream.data.events), paced so a replay looks like live traffic."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel

from recstream.contracts.topics import TOPICS


def read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    """Lines of {"topic": <logical topic>, "event": {...}}."""
    with path.open() as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as exc:
                raise ValueError(f"{path}:{n}: not a JSON line: {exc}") from exc
            if not isinstance(rec, dict) or not isinstance(rec.get("event"), dict):
                raise ValueError(f'{path}:{n}: expected {{"topic": ..., "event": {{...}}}}')
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

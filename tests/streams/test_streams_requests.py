"""The request consumer (streams.requests) against a real broker: in follow mode it reads exactly the
partitions it is given (the behaviour consumer's, so sessions are local), stops reading revoked ones
before revoke() returns, and commits what it answered. The answering itself (answer_batch) is covered
through the real worker in test_streams_e2e.py; here decode_events records and answers nothing."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, TopicPartition

from recstream.client import EventProducer
from recstream.config import Settings
from recstream.contracts.events import RecommendationRequest
from recstream.contracts.topics import REQUESTS
from streams.requests import RequestLoop

pytestmark = [pytest.mark.kafka]


class _Seen:
    def __init__(self) -> None:
        self.by_partition: dict[int, int] = {}
        self.lock = threading.Lock()

    def decode_events(self, spec, events) -> list:
        with self.lock:
            for ev in events:
                p = ev.partition
                self.by_partition[p] = self.by_partition.get(p, 0) + 1
        return []  # nothing to answer: the consumer mechanics are under test

    def count(self) -> int:
        with self.lock:
            return sum(self.by_partition.values())


def _send(settings: Settings, n: int) -> dict[int, int]:
    """n requests for 40 users; returns how many landed on each partition."""
    topic = REQUESTS.name(settings.topic_prefix)
    per_partition: dict[int, int] = {}
    with EventProducer(settings) as p:
        for i in range(n):
            p.send("requests", RecommendationRequest(user_id=f"u{i % 40}", k=5))
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "ends"})
    for part in range(REQUESTS.partitions):
        _low, high = consumer.get_watermark_offsets(TopicPartition(topic, part), timeout=10)
        per_partition[part] = high
    consumer.close()
    return per_partition


async def _answer_nothing(ctx: object, decoded: list) -> None:
    """The request processor is not under test here (seen.decode_events counts what was read)."""


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_follows_the_given_partitions_and_commits_what_it_answered(settings: Settings) -> None:
    seen = _Seen()
    ctx = SimpleNamespace(
        settings=settings, worker="test", store=None, ranker=None, tables={}, decode_events=seen.decode_events
    )
    group = f"{settings.topic_prefix}requests-test"
    loop = RequestLoop(ctx, _answer_nothing, group).follow().start()
    try:
        ends = _send(settings, 200)
        time.sleep(1.0)
        assert seen.count() == 0 and not loop.ready.is_set(), "read before any partition was given"
        loop.assign([0, 1])
        _wait(lambda: seen.count() >= ends[0] + ends[1], 30, "partitions 0 and 1 not read")
        time.sleep(0.5)
        assert set(seen.by_partition) <= {0, 1} and loop.ready.is_set()
        loop.assign([2, 3])
        _wait(lambda: seen.count() >= sum(ends.values()), 30, "partitions 2 and 3 not read")
        loop.revoke([0, 1])
        assert loop.assigned == {2, 3}
        before = dict(seen.by_partition)
        more = _send(settings, 200)
        _wait(lambda: seen.count() >= sum(more[p] for p in (2, 3)) + before[0] + before[1], 30, "2, 3 stalled")
        time.sleep(0.5)
        assert (seen.by_partition[0], seen.by_partition[1]) == (before[0], before[1]), "read a revoked partition"
    finally:
        loop.stop()
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    topic = REQUESTS.name(settings.topic_prefix)
    committed = {
        tp.partition: tp.offset
        for tp in consumer.committed([TopicPartition(topic, p) for p in range(REQUESTS.partitions)], timeout=10)
    }
    consumer.close()
    assert committed[2] == more[2] and committed[3] == more[3]
    assert committed[0] == ends[0] and committed[1] == ends[1]


def test_a_processor_no_consumer_feeds_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A registered processor of a topic that no consumer reads would never run: the app says so."""
    from dataclasses import replace

    from streams import registry
    from streams.app import create_app

    orphan = replace(registry.BY_NAME["features"], name="orphan", source="ranking-log")
    monkeypatch.setattr(registry, "specs_for", lambda agents: [orphan])
    with pytest.raises(ValueError, match="no consumer feeds topic 'ranking-log'"):
        create_app(Settings(run_dir=tmp_path, qdrant_path=tmp_path / "qdrant"), ["orphan"])


def test_a_second_request_processor_is_refused(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The request consumer hands each batch to one processor; a second one would be dropped silently."""
    from dataclasses import replace

    from streams import registry
    from streams.app import create_app

    twin = replace(registry.BY_NAME["recommender"], name="twin")
    monkeypatch.setattr(registry, "specs_for", lambda agents: [registry.BY_NAME["recommender"], twin])
    with pytest.raises(ValueError, match=r"requests consumer feeds one processor, not \['recommender', 'twin'\]"):
        create_app(Settings(run_dir=tmp_path, qdrant_path=tmp_path / "qdrant"), ["recommender", "twin"])

"""The request consumer (streams.requests) against a real broker: in follow mode it reads exactly the
partitions it is given (the behaviour consumer's, so sessions are local), stops reading revoked ones
before revoke() returns, and commits what it answered, and only once the broker has the answers.
The answering itself (answer_batch) is covered through the real worker in test_streams_e2e.py; here
the processor answers nothing, or a placeholder per request."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from recstream.client import EventProducer
from recstream.client.producer import producer_config
from recstream.config import Settings
from recstream.contracts.events import RecommendationRequest
from recstream.contracts.topics import REQUESTS
from streams.consumer_threads import COMMIT_INTERVAL_MS
from streams.context import StreamContext
from streams.requests import RequestLoop
from tests.support.worker_stack import committed_positions

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
        settings=settings,
        worker="test",
        store=None,
        ranker=None,
        tables={},
        decode_events=seen.decode_events,
        producer=None,  # answers nothing: offsets are stored as batches are handled
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


def test_commits_only_past_answers_the_broker_acknowledged(settings: Settings) -> None:
    """At least once: while answers are delivered the commits follow them; once an answer is lost
    (here the broker refuses it as too large), nothing is committed past it, through the stop, so
    a restarted worker answers those requests again."""
    ctx = StreamContext(settings=settings, worker="test", agents=("recommender",))
    # the producer may send what the broker refuses (its limit is 1 MiB): a delivery that fails
    ctx._producer = Producer(producer_config(settings, **{"message.max.bytes": 4_000_000, "linger.ms": 1}))
    lose_answers = threading.Event()
    handled = [0]

    async def answer(ctx: StreamContext, decoded: list) -> None:
        for _ev, req in decoded:
            body = b"x" * (2_000_000 if lose_answers.is_set() else 16)
            ctx.send("recommendations", req.user_id.encode(), body)
            handled[0] += 1

    group = f"{settings.topic_prefix}requests-acks"
    loop = RequestLoop(ctx, answer, group).start()
    try:
        _wait(loop.ready.is_set, 30, "no partitions assigned")
        ends = _send(settings, 60)
        _wait(lambda: committed_positions(settings, REQUESTS, group) == ends, 30, "answered requests not committed")
        lose_answers.set()
        more = _send(settings, 20)
        _wait(lambda: handled[0] >= sum(more.values()), 30, "requests not answered")
        time.sleep(3 * COMMIT_INTERVAL_MS / 1000)
        assert committed_positions(settings, REQUESTS, group) == ends, "committed past an answer the broker refused"
    finally:
        loop.stop()
        ctx.close()
    assert committed_positions(settings, REQUESTS, group) == ends, "the stop committed past a lost answer"

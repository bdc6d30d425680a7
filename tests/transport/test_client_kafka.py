"""The application SDK against the real broker: round trips, consumer groups, dead letters."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from recstream.client import EventConsumer, EventProducer
from recstream.config import Settings
from recstream.contracts.events import (
    BehaviourEvent,
    BehaviourType,
    DeadLetter,
    ItemDelete,
    ItemUpsert,
    RankedItem,
    RecommendationRequest,
    RecommendationResult,
    RequestFilters,
    SearchQuery,
    TrainingExample,
)
from recstream.contracts.topics import TOPICS, dead_letter_topic

pytestmark = pytest.mark.kafka


def drain(consumer: EventConsumer, want: int, max_polls: int = 120) -> list:
    got = []
    for _ in range(max_polls):
        got.extend(consumer.poll(max_messages=1000, timeout_s=0.5))
        if len(got) >= want:
            break
    return got


def read_dead_letters(settings: Settings, logical: str, want: int) -> list[DeadLetter]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": "dlq-reader",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([dead_letter_topic(TOPICS[logical].name(settings.topic_prefix))])
    letters = []
    for _ in range(60):
        for msg in consumer.consume(100, timeout=0.5):
            if not msg.error():
                letters.append(DeadLetter.model_validate_json(msg.value()))
        if len(letters) >= want:
            break
    consumer.close()
    return letters


def every_event_type() -> dict[str, list]:
    return {
        "catalog": [
            ItemUpsert(item_id="i1", title="Toy Story (1995)", category="Animation", tags=["Children"], price=9.5),
            ItemDelete(item_id="i2"),
        ],
        "requests": [
            RecommendationRequest(
                user_id="u1", session_id="s1", k=5, filters=RequestFilters(categories=["Comedy"], max_price=20)
            ),
            SearchQuery(user_id="u1", query="space adventure"),
        ],
        "behaviour": [
            BehaviourEvent(
                type=t, user_id="u1", session_id="s1", item_id="i1", request_id="r1", position=2, propensity=0.5
            )
            for t in BehaviourType
        ],
        "recommendations": [
            RecommendationResult(
                request_id="r1",
                user_id="u1",
                model_version="ranker:3",
                items=[
                    RankedItem(item_id="i1", score=0.9, position=0, propensity=0.8, reasons={"session": 0.7}),
                    RankedItem(item_id="i3", score=0.5, position=1, propensity=0.2),
                ],
            ),
        ],
        "training-examples": [
            TrainingExample(
                request_id="r1",
                user_id="u1",
                item_id="i1",
                position=0,
                propensity=0.8,
                clicked=True,
                label=1.0,
                context_items=["i0"],
            ),
        ],
    }


def test_every_event_type_round_trips(settings: Settings) -> None:
    sent = every_event_type()
    with EventProducer(settings) as producer:
        for topic, events in sent.items():
            producer.send_many(topic, events)
    consumer = EventConsumer(settings, list(sent), group_id="roundtrip")
    got = drain(consumer, sum(map(len, sent.values())))
    consumer.close()
    by_topic: dict[str, list] = {}
    for c in got:
        by_topic.setdefault(c.topic, []).append(c.event)
    for logical, events in sent.items():
        received = by_topic[TOPICS[logical].name(settings.topic_prefix)]
        assert sorted(e.model_dump_json() for e in received) == sorted(e.model_dump_json() for e in events)
        for e in received:
            assert type(e) in {type(x) for x in events}


def test_key_is_the_registry_key(settings: Settings) -> None:
    with EventProducer(settings) as producer:
        producer.send("behaviour", BehaviourEvent(type="click", user_id="alice", item_id="i9"))
    consumer = EventConsumer(settings, ["behaviour"], group_id="keys")
    (got,) = drain(consumer, 1)
    consumer.close()
    assert got.key == b"alice"


def test_producer_refuses_invalid_events_before_sending(settings: Settings) -> None:
    with EventProducer(settings) as producer, pytest.raises(ValidationError):
        producer.send("behaviour", {"type": "teleport", "user_id": "u", "item_id": "i"})


def test_10k_events_in_a_group_survive_a_consumer_restart(settings: Settings) -> None:
    n = 10_000
    with EventProducer(settings) as producer:
        for i in range(n):
            producer.send(
                "behaviour", BehaviourEvent(event_id=f"e{i}", type="view", user_id=f"u{i % 97}", item_id=f"i{i % 500}")
            )
    seen: list[str] = []
    first = EventConsumer(settings, ["behaviour"], group_id="group-10k")
    while len(seen) < n // 2:
        seen.extend(c.event.event_id for c in first.poll(max_messages=500, timeout_s=1.0))
    first.commit()
    first.close()  # the "crash": everything polled so far is committed, nothing else
    second = EventConsumer(settings, ["behaviour"], group_id="group-10k")
    for _ in range(200):
        batch = second.poll(max_messages=1000, timeout_s=0.5)
        seen.extend(c.event.event_id for c in batch)
        if len(set(seen)) >= n and not batch:
            break
    second.commit()
    second.close()
    assert set(seen) == {f"e{i}" for i in range(n)}
    assert len(seen) == n, "a committed event was delivered twice after the restart"


def counter_value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_bad_input_goes_to_dead_letters_and_valid_events_still_flow(settings: Settings) -> None:
    topic = TOPICS["behaviour"].name(settings.topic_prefix)
    bad = {
        "malformed_json": b'{"type": "click", "user_id": ',
        "schema": json.dumps({"type": "click", "user_id": 42.5, "item_id": ["x"]}).encode(),
        "oversize": json.dumps(
            {"type": "view", "user_id": "u", "item_id": "i", "pad": "x" * (settings.max_message_bytes + 10)}
        ).encode(),
    }
    before = {r: counter_value("recstream_dead_letters_total", topic=topic, reason=r, worker="test") for r in bad}
    with EventProducer(settings) as producer:
        producer.send("behaviour", BehaviourEvent(event_id="ok-1", type="click", user_id="u", item_id="i"))
        for reason, raw in bad.items():
            producer.send_raw(topic, reason.encode(), raw)
        producer.send("behaviour", BehaviourEvent(event_id="ok-2", type="view", user_id="u", item_id="i"))
    consumer = EventConsumer(settings, ["behaviour"], group_id="dlq", worker="test")
    got = drain(consumer, 2)
    consumer.close()
    assert sorted(c.event.event_id for c in got) == ["ok-1", "ok-2"]

    letters = {d.error_type: d for d in read_dead_letters(settings, "behaviour", 3)}
    assert set(letters) == set(bad)
    for reason, raw in bad.items():
        letter = letters[reason]
        assert base64.b64decode(letter.value_b64) == raw, "the original bytes must be kept"
        assert letter.source_topic == topic and letter.offset >= 0 and letter.partition >= 0
        assert base64.b64decode(letter.key_b64) == reason.encode()
        assert (
            counter_value("recstream_dead_letters_total", topic=topic, reason=reason, worker="test")
            == before[reason] + 1
        )
    assert "user_id" in letters["schema"].error


def test_close_delivers_then_releases_the_handle_once(settings: Settings) -> None:
    producer = EventProducer(settings)
    producer.send("behaviour", BehaviourEvent(type="click", user_id="carol", item_id="i3"))
    producer.close()
    producer.close()  # a second close (an outer `with` after an explicit close) is a no-op
    consumer = EventConsumer(settings, ["behaviour"], group_id="closed")
    (got,) = drain(consumer, 1)
    consumer.close()
    consumer.close()  # idempotent too: its dead-letter producer and consumer are released once
    assert got.event.user_id == "carol"
    with pytest.raises(RuntimeError):  # the librdkafka handle is gone: nothing is sent by mistake
        producer.send("behaviour", BehaviourEvent(type="click", user_id="carol", item_id="i4"))


def test_topics_are_created_with_their_retention(settings: Settings) -> None:
    """The ranking log (~9 KB per answer) is bounded by a day and 8 GiB per partition; event topics
    keep a week, unbounded in bytes."""
    from confluent_kafka.admin import ConfigResource

    from recstream.kafka.admin import admin_client

    admin = admin_client(settings)
    wanted = {
        "ranking-log": ("86400000", str(8 * 1024**3)),
        "behaviour": (str(7 * 24 * 3600 * 1000), "-1"),
    }
    resources = [ConfigResource(ConfigResource.Type.TOPIC, TOPICS[t].name(settings.topic_prefix)) for t in wanted]
    for (logical, (ms, size)), fut in zip(wanted.items(), admin.describe_configs(resources).values(), strict=True):
        config = fut.result(timeout=30)
        assert (config["retention.ms"].value, config["retention.bytes"].value) == (ms, size), logical


def test_existing_topics_are_held_to_the_registry(kafka_bootstrap: str) -> None:
    """A keyed topic with more partitions than the registry passed (producers then placed keys by
    the real count and consumers refused about half the events as misplaced); an existing topic's
    retention was never compared (one created before a retention change kept the old for ever)."""
    import uuid

    from confluent_kafka.admin import ConfigResource, NewTopic

    from recstream.kafka.admin import TopicMismatch, admin_client, ensure_topics, wait_until_visible

    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.")
    admin = admin_client(settings)
    log_topic = TOPICS["ranking-log"].name(settings.topic_prefix)
    week = str(7 * 24 * 3600 * 1000)
    spec = TOPICS["ranking-log"]
    created = admin.create_topics(
        [NewTopic(log_topic, spec.partitions, replication_factor=1, config={"retention.ms": week})]
    )
    created[log_topic].result(30)
    wait_until_visible(admin, [log_topic])
    ensure_topics(settings)  # a worker's start: warns, leaves it
    config = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, log_topic)])
    assert next(iter(config.values())).result(30)["retention.ms"].value == week
    ensure_topics(settings, align=True)  # provisioning: sets the registry's
    config = admin.describe_configs([ConfigResource(ConfigResource.Type.TOPIC, log_topic)])
    assert next(iter(config.values())).result(30)["retention.ms"].value == "86400000"

    wider = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.")
    behaviour = TOPICS["behaviour"].name(wider.topic_prefix)
    admin.create_topics([NewTopic(behaviour, TOPICS["behaviour"].partitions * 2, replication_factor=1)])[
        behaviour
    ].result(30)
    wait_until_visible(admin, [behaviour])
    with pytest.raises(TopicMismatch, match="placed by key"):
        ensure_topics(wider)


def test_a_partition_error_neither_kills_the_consumer_nor_drops_the_batch(settings: Settings) -> None:
    """One subscribed topic is gone (deleted by an operator) while the other holds events: the
    broker's error for the missing one arrives among the messages. Every event is still returned,
    once, and committed (raising mid-batch dropped the events decoded before the error, though
    the consumer's position had moved past them: the next commit skipped them)."""
    from confluent_kafka.admin import AdminClient

    catalog = TOPICS["catalog"].name(settings.topic_prefix)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.delete_topics([catalog], operation_timeout=30)[catalog].result(30)
    n = 300
    with EventProducer(settings) as producer:
        for i in range(n):
            producer.send("behaviour", BehaviourEvent(event_id=f"e{i}", type="view", user_id="u1", item_id=f"i{i}"))
    consumer = EventConsumer(settings, ["behaviour", "catalog"], group_id="missing-topic", worker="test")
    try:
        got = drain(consumer, n)
        consumer.commit()
    finally:
        consumer.close()
    assert sorted(c.event.event_id for c in got) == sorted(f"e{i}" for i in range(n))
    assert counter_value("recstream_consumer_errors_total", worker="test", error="UNKNOWN_TOPIC_OR_PART") >= 1
    again = EventConsumer(settings, ["behaviour"], group_id="missing-topic")
    try:
        assert again.poll(max_messages=1000, timeout_s=3.0) == []  # all of it was committed
    finally:
        again.close()


def test_failed_deliveries_are_logged_when_they_happen_and_counted_until_flush(
    free_port: int, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    """A producer that keeps sending through an outage hears of it at the first failure (one log
    line, not one per message), and flush() reports how many failed with a few examples."""
    import logging
    import time

    from recstream.client import DeliveryError

    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port}", run_dir=tmp_path)
    producer = EventProducer(settings, worker="outage-test", **{"message.timeout.ms": 300})
    caplog.set_level(logging.ERROR, logger="recstream.client.producer")
    try:
        for i in range(200):
            producer.send("behaviour", BehaviourEvent(event_id=f"e{i}", type="view", user_id="u1", item_id="i1"))
        deadline = time.monotonic() + 10
        while not caplog.records and time.monotonic() < deadline:
            producer.send_raw(producer.topic_for("behaviour"), None, b"{}")  # polls the reports
            time.sleep(0.05)
        failures = [r for r in caplog.records if "delivery to" in r.getMessage()]
        assert len(failures) == 1 and "outage-test" in failures[0].getMessage(), caplog.text
        with pytest.raises(DeliveryError, match=r"^(2\d\d) messages failed") as raised:
            producer.flush(10)
        assert int(str(raised.value).split()[0]) >= 200
        assert str(raised.value).count("Local: Message timed out") <= 3
        producer.flush(1)  # reported once: the next flush has nothing to say
    finally:
        producer.close(1)


def test_a_read_to_the_end_keeps_catalog_deletes(settings: Settings) -> None:
    """The catalog re-embed reads the topic to its end and keeps each item's last operation: a
    tombstone must come back as the delete it is (it was skipped as invalid for want of its key,
    so a deleted item returned with the next item-encoder version)."""
    from recstream.client.consumer import read_to_end

    with EventProducer(settings) as producer:
        producer.send("catalog", ItemUpsert(item_id="gone", title="Deleted later"))
        producer.send("catalog", ItemUpsert(item_id="kept", title="Still here"))
        producer.send("catalog", ItemUpsert(item_id="also-gone", title="Deleted by event"))
        producer.send("catalog", ItemDelete(item_id="also-gone"))
        catalog = TOPICS["catalog"]
        producer.send_raw(catalog.name(settings.topic_prefix), b"gone", None)  # Kafka's own delete
    events, invalid = read_to_end(settings, "catalog", timeout_s=30)
    assert invalid == 0
    last = {e.item_id: e for e in events}
    assert isinstance(last["gone"], ItemDelete)
    assert isinstance(last["also-gone"], ItemDelete)
    assert isinstance(last["kept"], ItemUpsert)


def test_a_commit_the_group_refuses_is_retried_not_raised(settings: Settings) -> None:
    """A commit refused during a rebalance (or after the member was evicted by a long pause) used
    to raise out of the trainer's loop and stop it; now it is counted, the next commit carries
    the same offsets, and nothing is read twice. A fatal error still raises."""
    from confluent_kafka import KafkaError, KafkaException

    with EventProducer(settings) as producer:
        for i in range(20):
            producer.send("behaviour", BehaviourEvent(event_id=f"e{i}", type="view", user_id="u1", item_id=f"i{i}"))
    consumer = EventConsumer(settings, ["behaviour"], group_id="refused-commit", worker="commit-test")

    class Refusing:
        """The real consumer, whose next commit the group refuses with `code`."""

        def __init__(self, real, code: int, fatal: bool = False) -> None:
            self.real, self.code, self.fatal = real, code, fatal

        def commit(self, **kwargs):
            consumer._consumer = self.real
            raise KafkaException(KafkaError(self.code, "refused", fatal=self.fatal))

        def __getattr__(self, name):
            return getattr(self.real, name)

    try:
        assert len(drain(consumer, 20)) == 20
        consumer._consumer = Refusing(consumer._consumer, KafkaError.REBALANCE_IN_PROGRESS)
        assert consumer.commit() is False
        refused = counter_value("recstream_consumer_errors_total", worker="commit-test", error="REBALANCE_IN_PROGRESS")
        assert refused == 1
        assert consumer.commit() is True  # the same offsets, committed by the next call
        consumer._consumer = Refusing(consumer._consumer, KafkaError.FENCED_INSTANCE_ID, fatal=True)
        with pytest.raises(KafkaException):
            consumer.commit()
    finally:
        consumer.close()
    again = EventConsumer(settings, ["behaviour"], group_id="refused-commit")
    try:
        assert again.poll(max_messages=100, timeout_s=3.0) == []
    finally:
        again.close()


def test_a_cancelled_wait_for_a_result_leaves_nothing_pending(settings: Settings) -> None:
    """Only a timeout forgot the request: a caller cancelled (shutdown, a client gone) left its entry
    waiting for a result that may never come, one per request."""
    import asyncio
    import time

    from recstream.client import RecommendationClient
    from recstream.contracts.events import RecommendationRequest

    async def ask_then_cancel(client: RecommendationClient) -> None:
        task = asyncio.create_task(
            client.ask(RecommendationRequest(kind="recommend", user_id="u1"), time.monotonic() + 60)
        )
        await asyncio.sleep(0.2)
        assert len(client._pending) == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    with RecommendationClient(settings) as client:
        asyncio.run(ask_then_cancel(client))
        assert client._pending == {}


def test_the_sdk_consumer_reads_catalog_tombstones_as_deletes(settings: Settings) -> None:
    """It decoded without the record's key: every documented delete (key = item id, null value)
    was dead-lettered, and the trainer never dropped a deleted item."""
    from confluent_kafka import Producer

    topic = TOPICS["catalog"].name(settings.topic_prefix)
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    producer.produce(topic, key=b"item-1", value=None)
    producer.flush(10)
    consumer = EventConsumer(settings, ["catalog"], group_id="tombstones", worker="test")
    try:
        got = drain(consumer, 1)
    finally:
        consumer.close()
    assert [(type(c.event), c.event.item_id) for c in got] == [(ItemDelete, "item-1")]


def _with_tiny_topic(kafka_bootstrap: str, topic_of: Callable[[str], str]) -> Settings:
    """Settings whose topic `topic_of(prefix)` refuses every message (max.message.bytes 64 from
    its creation on: a limit set later takes a moment to reach the broker's log), the rest as
    the registry makes them."""
    import uuid

    from confluent_kafka.admin import NewTopic

    from recstream.kafka.admin import admin_client, ensure_topics, wait_until_visible

    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.")
    name = topic_of(settings.topic_prefix)
    partitions = next((t.partitions for t in TOPICS.values() if t.name(settings.topic_prefix) == name), 1)
    admin = admin_client(settings)
    tiny = NewTopic(name, partitions, replication_factor=1, config={"max.message.bytes": "64"})
    admin.create_topics([tiny])[name].result(30)
    wait_until_visible(admin, [name])
    ensure_topics(settings)
    return settings


def test_a_dead_letter_the_broker_refuses_holds_the_commit_until_it_is_delivered(kafka_bootstrap: str) -> None:
    """commit() checked only that nothing was still queued: a dead letter the broker refused had
    left the queue, so the offsets were committed past a message that was never kept anywhere."""
    import time

    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    from recstream.kafka.admin import admin_client

    settings = _with_tiny_topic(kafka_bootstrap, lambda prefix: dead_letter_topic(TOPICS["behaviour"].name(prefix)))
    topic = TOPICS["behaviour"].name(settings.topic_prefix)
    with EventProducer(settings) as producer:
        producer.send_raw(topic, b"u1", b'{"type": "click", "user_id": ')
    consumer = EventConsumer(settings, ["behaviour"], group_id="refused-dlq", worker="test")
    try:
        for _ in range(60):
            consumer.poll(timeout_s=0.5)
            if consumer._dlq_failed:
                break
        assert not consumer.commit()
        admin = admin_client(settings)
        entry = ConfigEntry("max.message.bytes", str(1024 * 1024), incremental_operation=AlterConfigOpType.SET)
        resource = ConfigResource(ConfigResource.Type.TOPIC, dead_letter_topic(topic), incremental_configs=[entry])
        for fut in admin.incremental_alter_configs([resource]).values():
            fut.result(30)
        deadline = time.monotonic() + 30  # the new limit reaches the broker's log in a moment
        while not consumer.commit():
            assert time.monotonic() < deadline, "the dead letter was never delivered"
            time.sleep(0.5)
    finally:
        consumer.close()
    assert [d.error_type for d in read_dead_letters(settings, "behaviour", 1)] == ["malformed_json"]


def test_events_dropped_by_another_callers_timeout_are_reported_by_flush(tmp_path, free_port: int) -> None:
    """deliver()'s timeout purges the shared queue and cleared the failure count with it: a send()
    caller's flush() then returned as if its purged events were written."""
    from recstream.client import DeliveryError

    producer = EventProducer(Settings(kafka_bootstrap=f"127.0.0.1:{free_port}", run_dir=tmp_path))
    try:
        for i in range(3):
            producer.send("behaviour", BehaviourEvent(type="view", user_id=f"u{i}", item_id="i1"))
        write = producer.prepare("behaviour", BehaviourEvent(type="click", user_id="u9", item_id="i1"))
        with pytest.raises(DeliveryError, match="1 of 1 messages unacknowledged"):
            producer.deliver([write], timeout_s=0.3)
        with pytest.raises(DeliveryError, match="3 messages failed"):
            producer.flush(2)
    finally:
        producer._producer.purge()


def test_a_request_the_broker_refuses_fails_its_caller_at_once(kafka_bootstrap: str) -> None:
    """A dropped request only counted as a producer failure: its caller waited out its whole
    deadline for an answer to a request that was never sent, and close() raised afterwards."""
    import asyncio
    import time

    from recstream.client import DeliveryError, RecommendationClient
    from recstream.contracts.events import RecommendationRequest

    settings = _with_tiny_topic(kafka_bootstrap, TOPICS["requests"].name)
    client = RecommendationClient(settings)
    t0 = time.monotonic()
    with pytest.raises(DeliveryError, match="was not sent"):
        asyncio.run(client.ask(RecommendationRequest(kind="recommend", user_id="u1"), time.monotonic() + 30))
    assert time.monotonic() - t0 < 15 and client._pending == {}
    client.close()  # the failure was its caller's to hear, not close()'s

"""What the stream tests that run real workers share: Triton's budget under test load, reading a
topic to its end without a consumer group, and a group's committed positions."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from recstream.config import Settings
from recstream.contracts.topics import TopicSpec

#: The production budget is settings.triton_timeout_s = 250 ms. On the shared 2-core test box one
#: query encode alone measured 100-300 ms under load, so the behaviour tests give Triton 2 s and
#: the degraded path is tested by making Triton unreachable, not by racing the deadline.
TEST_TRITON_TIMEOUT_S = 2.0


def committed_positions(settings: Settings, spec: TopicSpec, group: str) -> dict[int, int]:
    """The positions `group` has committed on each partition of `spec`'s topic (-1001: none yet)."""
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group})
    topic = spec.name(settings.topic_prefix)
    try:
        parts = [TopicPartition(topic, p) for p in range(spec.partitions)]
        return {tp.partition: tp.offset for tp in consumer.committed(parts, timeout=10)}
    finally:
        consumer.close()


def read_all(settings: Settings, topic: str, timeout_s: float = 60.0) -> list:
    """Every message of `topic` from the beginning to its current end (confluent, no group offsets)."""
    from confluent_kafka import TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"read-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    meta = consumer.list_topics(topic, timeout=10).topics[topic]
    parts = sorted(meta.partitions)
    ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
    consumer.assign([TopicPartition(topic, p, 0) for p in parts])
    pending = {p for p in parts if ends[p] > 0}
    out = []
    deadline = time.monotonic() + timeout_s
    while pending and time.monotonic() < deadline:
        for msg in consumer.consume(5000, timeout=0.5):
            if msg.error():
                continue
            out.append(msg)
            if msg.offset() >= ends[msg.partition()] - 1:
                pending.discard(msg.partition())
    consumer.close()
    assert not pending, f"could not read {topic} to its end"
    return out


def uninterrupted_fold(settings: Settings, messages: list, items: dict) -> dict:
    """user key -> SessionState: the pure fold of behaviour `messages` in offset order per
    partition, with the item vectors and categories of `items` (VectorStore.retrieve), in-process;
    what the worker's sessions table must equal however it was stopped or rebalanced."""
    from recstream.contracts.topics import BEHAVIOUR
    from recstream.kafka.serde import decode
    from recstream.recommend.session import SessionState, apply_event

    expected: dict[bytes, SessionState] = {}
    for msg in sorted(messages, key=lambda m: (m.partition(), m.offset())):
        ev = decode(BEHAVIOUR, msg.value(), settings.max_message_bytes)
        hit = items.get(ev.item_id)
        apply_event(
            expected.setdefault(ev.user_id.encode(), SessionState()),
            offset=msg.offset(),
            event_type=ev.type.value,
            item_id=ev.item_id,
            ts_ms=ev.ts_ms,
            item_vec=None if hit is None else hit.vector,
            item_category=None if hit is None else hit.payload.get("category"),
        )
    return expected

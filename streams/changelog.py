"""A changelog-backed table: an in-memory dict of bytes whose every write also goes to a compacted topic.

Used by the behaviour consumer (streams.behaviour). The topic name (`<app id>-<table>-changelog`)
is the one the worker's earlier faust tables used, so their state is recovered unchanged, and the
key/value bytes are the same.

Durability contract, kept by the caller: the records a batch wrote are acknowledged by the broker
before the source offsets of that batch are committed, so after a kill -9 the table
recovered from the changelog is never behind the committed offsets. The fold functions skip what
they have already applied, so replaying the uncommitted tail changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import NewTopic

from recstream.config import Settings
from recstream.kafka.admin import ADMIN_TIMEOUT_S, TopicMismatch, admin_client

log = logging.getLogger(__name__)

#: Recovery reads in large fetches: a changelog holds one record per written key per batch.
RECOVERY_BATCH = 10_000
#: Errors of a topic whose partitions have no leader yet (just created): wait, don't fail.
_NOT_READY = {
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError._TIMED_OUT,
}


#: Compaction never touches the active segment, and recovery re-reads it whole: with the broker's
#: default (1 GiB, 7 days) a busy table's changelog could take longer to recover than the 120 s
#: recovery budget. Rolling every 10 minutes keeps what recovery reads close to one record per key.
CHANGELOG_CONFIG = {"cleanup.policy": "compact", "segment.ms": str(10 * 60 * 1000)}


def changelog_topic(app_id: str, table: str) -> str:
    """The changelog topic of a table (faust's naming, part of the state contract)."""
    return f"{app_id}-{table}-changelog"


def ensure_changelog(settings: Settings, topic: str, partitions: int) -> None:
    """Create the compacted changelog topic if missing; refuse one with too few partitions."""
    admin = admin_client(settings)
    existing = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
    if topic in existing:
        have = len(existing[topic].partitions)
        if have < partitions:
            raise TopicMismatch(f"changelog {topic} has {have} partitions, the table needs {partitions}")
        return
    fut = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=-1, config=CHANGELOG_CONFIG)],  # broker default
        operation_timeout=ADMIN_TIMEOUT_S,
        request_timeout=ADMIN_TIMEOUT_S,
    )[topic]
    try:
        fut.result()
    except Exception as exc:  # a concurrent creator won the race
        err = exc.args[0] if exc.args else None
        if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
            raise


class ChangelogTable:
    """bytes -> bytes, partitioned like its source topic; `data` is read directly by other agents.

    Writes come from one thread (the behaviour consumer); readers in other threads only do
    `data.get`, which is atomic in CPython, and always see a whole value.
    """

    def __init__(self, name: str, topic: str, partitions: int) -> None:
        self.name = name
        self.topic = topic
        self.partitions = partitions
        self.data: dict[bytes, bytes] = {}
        self._send_fn: Callable[[str, bytes, bytes | None, int], None] | None = None

    def bind(self, send: Callable[[str, bytes, bytes | None, int], None]) -> None:
        """Route the changelog writes through `send(topic, key, value, partition)` (the owner's
        producer, which tracks their acknowledgement)."""
        self._send_fn = send

    def put(self, partition: int, key: bytes, value: bytes) -> None:
        self.data[key] = value
        self._send(partition, key, value)

    def delete(self, partition: int, key: bytes) -> bytes | None:
        """Remove a key and write its tombstone (recovery must not bring it back)."""
        old = self.data.pop(key, None)
        self._send(partition, key, None)
        return old

    def _send(self, partition: int, key: bytes, value: bytes | None) -> None:
        assert self._send_fn is not None, "bind() the table to a sender first"
        self._send_fn(self.topic, key, value, partition)

    def _watermarks(self, consumer: Consumer, partition: int, deadline: float) -> tuple[int, int]:
        """(low, high) of one changelog partition, retried while the broker is still electing the
        leader of a just-created topic (NOT_LEADER_FOR_PARTITION, UNKNOWN_TOPIC_OR_PART...)."""
        while True:
            try:
                return consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=5.0)
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                retriable = isinstance(err, KafkaError) and (err.retriable() or err.code() in _NOT_READY)
                if not retriable or time.monotonic() > deadline:
                    raise
                log.info("changelog %s[%d] not ready yet (%s); retrying", self.topic, partition, err)
                time.sleep(0.2)

    def recover(self, settings: Settings, partitions: Iterable[int], timeout_s: float = 120.0) -> int:
        """Read the changelog partitions from the beginning to their current end into `data`.

        Returns the number of records read. Tombstones remove keys. Raises TimeoutError if the end
        is not reached within `timeout_s` (the caller must not process input on partial state)."""
        parts = sorted(set(partitions))
        if not parts:
            return 0
        consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": f"{self.topic}-recovery",  # required by librdkafka; assign() only, never committed
                "enable.auto.commit": False,
                "enable.partition.eof": False,
                "fetch.wait.max.ms": 10,
            }
        )
        deadline = time.monotonic() + timeout_s
        try:
            ends: dict[int, int] = {}
            for p in parts:
                low, high = self._watermarks(consumer, p, deadline)
                if high > low:
                    ends[p] = high
            if not ends:
                return 0
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in ends])
            pending = set(ends)
            read = 0
            while pending:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"recovering {self.topic} partitions {sorted(pending)}: end not reached")
                for msg in consumer.consume(RECOVERY_BATCH, timeout=0.1):
                    if msg.error():
                        log.warning("recovery of %s: %s", self.topic, msg.error())
                        continue
                    p = msg.partition()
                    if p not in pending:
                        continue
                    value = msg.value()
                    if value is None:
                        self.data.pop(msg.key(), None)
                    else:
                        self.data[msg.key()] = value
                    read += 1
                    if msg.offset() >= ends[p] - 1:
                        pending.discard(p)
            log.info("recovered %s: %d records from partitions %s (%d keys)", self.name, read, parts, len(self.data))
            return read
        finally:
            consumer.close()

"""A validating consumer: yields contract models, dead-letters what fails, commits what it handled.

At-least-once: offsets are committed only after the caller got the events (explicit `commit`
or automatically at the next poll with `commit_on_poll`), so a restart resumes where the
last committed batch ended and nothing is lost.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from pydantic import BaseModel
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_fixed

from recstream.client.producer import producer_config
from recstream.config import Settings
from recstream.contracts.topics import TOPICS, TopicSpec
from recstream.kafka.dead_letters import DeadLetterSink, RefusedMessage
from recstream.kafka.serde import InvalidEvent, decode
from recstream.telemetry import CONSUMER_ERRORS, EVENTS_IN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ConsumedEvent:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    event: BaseModel
    timestamp_ms: int
    value: bytes | None = None  # the message as consumed, for a dead letter if its handling fails


class EventConsumer:
    """Consume one or more registry topics as validated events in a consumer group."""

    def __init__(
        self,
        settings: Settings,
        logical_topics: list[str],
        group_id: str,
        worker: str = "client",
        auto_offset_reset: str = "earliest",
        **config: Any,
    ) -> None:
        self.settings = settings
        self.worker = worker
        self._specs: dict[str, TopicSpec] = {TOPICS[t].name(settings.topic_prefix): TOPICS[t] for t in logical_topics}
        conf = {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": auto_offset_reset,
            "enable.partition.eof": False,
        }
        conf.update(config)
        self._consumer = Consumer(conf)
        self._closed = False
        self._consumer.subscribe(list(self._specs))
        self._dlq_producer = Producer(producer_config(settings, **{"linger.ms": 5}))
        # dead letters the broker refused (their delivery report said so): sent again at each
        # commit, which waits for them, since their source offsets are about to be committed
        self._dlq_failed: list[tuple[str, bytes | None, bytes]] = []
        self.dead_letters = DeadLetterSink(self._send_dead_letter, worker)

    def _send_dead_letter(self, topic: str, key: bytes | None, value: bytes) -> None:
        def on_delivery(err: KafkaError | None, _msg: object) -> None:
            if err is not None:
                log.error(
                    "%s: dead letter to %s not delivered (%s); retried before the next commit", self.worker, topic, err
                )
                self._dlq_failed.append((topic, key, value))

        self._dlq_producer.produce(topic, key=key, value=value, on_delivery=on_delivery)

    def poll(self, max_messages: int = 500, timeout_s: float = 1.0) -> list[ConsumedEvent]:
        """One batch of valid events; invalid ones are dead-lettered on the way."""
        messages = self._consumer.consume(num_messages=max_messages, timeout=timeout_s)
        out: list[ConsumedEvent] = []
        for msg in messages:
            err = msg.error()
            if err is not None:
                # Only a fatal error ends the consumer (nothing after it can be committed, so nothing
                # is lost). Any other (a subscribed topic deleted, a partition without a leader) is
                # librdkafka's news while it retries: raising here dropped the events decoded
                # before it, though the position had moved past them.
                if err.fatal():
                    raise KafkaException(err)
                if err.code() != KafkaError._PARTITION_EOF:
                    CONSUMER_ERRORS.labels(worker=self.worker, error=err.name()).inc()
                    log.warning("%s consumer: %s (consuming goes on)", self.worker, err)
                continue
            topic = msg.topic()
            EVENTS_IN.labels(topic=topic, worker=self.worker).inc()
            try:
                # key and partition: a tombstone's item is its key, and a misplaced keyed event is
                # refused here as by the worker (without them every catalog delete was dead-lettered)
                event = decode(
                    self._specs[topic], msg.value(), self.settings.max_message_bytes, msg.key(), msg.partition()
                )
            except InvalidEvent as exc:
                self.dead_letters.publish(RefusedMessage.from_confluent(msg), error=exc.detail, error_type=exc.reason)
                continue
            out.append(
                ConsumedEvent(topic, msg.partition(), msg.offset(), msg.key(), event, msg.timestamp()[1], msg.value())
            )
        if messages:
            self._dlq_producer.flush(10)
        return out

    def __iter__(self) -> Iterator[ConsumedEvent]:
        while True:
            yield from self.poll()

    def refuse(self, consumed: ConsumedEvent, error: str, error_type: str) -> None:
        """Dead-letter an event its handler could not use (valid by schema, unusable all the same)."""
        source = RefusedMessage(consumed.topic, consumed.partition, consumed.offset, consumed.key, consumed.value)
        self.dead_letters.publish(source, error=error, error_type=error_type)

    def commit(self) -> bool:
        """Commit what has been polled so far (synchronously, so a crash right after loses nothing);
        True when committed (or nothing to commit). Not while a dead letter is undelivered: the
        refused messages would be lost. A commit the group refuses (a rebalance in progress, a lost
        coordinator, a member evicted after a long pause) is logged and counted, and the next
        commit tries again: raising stopped the caller's loop over an error the group recovers
        from. Only a fatal error raises."""
        undelivered = self._dlq_producer.flush(10)
        if self._dlq_failed:  # refused, not just slow: send them again, once per commit
            retry, self._dlq_failed = self._dlq_failed, []
            for topic, key, value in retry:
                self._send_dead_letter(topic, key, value)
            undelivered = self._dlq_producer.flush(10)
        if undelivered or self._dlq_failed:
            log.error("%d dead letters undelivered; offsets not committed yet", undelivered + len(self._dlq_failed))
            return False
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            err = exc.args[0]
            if err.code() == KafkaError._NO_OFFSET:
                return True
            if err.fatal():
                raise
            CONSUMER_ERRORS.labels(worker=self.worker, error=err.name()).inc()
            log.warning("offsets not committed (%s: %s); the next commit tries again", err.name(), err.str())
            return False
        return True

    def assignment(self) -> list[TopicPartition]:
        return self._consumer.assignment()

    def reached(self, logical: str, ends: dict[int, int]) -> bool:
        """Whether this consumer's position is at or past `ends` (partition -> offset, e.g. the
        topic's end when it started) on every partition of `logical`: it has read what was
        there. False while the group has not assigned it the partitions yet."""
        name = TOPICS[logical].name(self.settings.topic_prefix)
        wanted = [TopicPartition(name, p) for p, end in ends.items() if end > 0]
        if not wanted:
            return True
        mine = {tp.partition for tp in self._consumer.assignment() if tp.topic == name}
        if not {tp.partition for tp in wanted} <= mine:
            return False
        return all(tp.offset >= ends[tp.partition] for tp in self._consumer.position(wanted))

    def close(self) -> None:
        """Flush the dead letters, then release both librdkafka handles (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._dlq_producer.flush(10)
        finally:
            self._dlq_producer.close()
            self._consumer.close()

    def __enter__(self) -> EventConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_to_end(
    settings: Settings, logical: str, timeout_s: float = 60.0, keep: Callable[[Any], bool] | None = None
) -> tuple[list[BaseModel], int]:
    """Every valid event of a registry topic (those `keep` accepts, if given), from its oldest
    retained message to its end at the time of the call, and how many invalid messages were skipped.
    Reads without a consumer group's offsets (nothing is committed), for operators' one-off reports.
    TimeoutError if the end is not reached in `timeout_s`."""
    with _Reader(settings, logical) as reader:
        ranges = {p: (low, high) for p, (low, high) in reader.watermarks().items() if high > low}
        return reader.read(ranges, timeout_s, keep)


def end_offsets(settings: Settings, logical: str) -> dict[int, int]:
    """Each partition's end (the offset the next message will get) of a registry topic, now."""
    with _Reader(settings, logical) as reader:
        return {p: high for p, (_, high) in reader.watermarks().items()}


def committed_offsets(settings: Settings, logical: str, group_id: str) -> dict[int, int]:
    """`group_id`'s committed offset per partition of a registry topic (partitions without one left out)."""
    with _Reader(settings, logical, group_id) as reader:
        return {p: offset for p, offset in reader.committed(reader.watermarks()).items() if offset >= 0}


def read_committed_tail(
    settings: Settings,
    logical: str,
    group_id: str,
    last_n: int,
    timeout_s: float = 60.0,
    keep: Callable[[Any], bool] | None = None,
) -> list[BaseModel]:
    """The newest `last_n` valid events of each partition before `group_id`'s committed offsets
    (those `keep` accepts, if given): what the group has already handled, read again without
    joining it (nothing is committed), for a worker that rebuilds in-memory state after a restart.
    Partitions without a committed offset give nothing; retention may have deleted part of the range."""
    with _Reader(settings, logical, group_id) as reader:
        marks = reader.watermarks()
        ranges = {
            p: (max(marks[p][0], offset - last_n), offset)
            for p, offset in reader.committed(marks).items()
            if offset > marks[p][0]  # none committed (negative), or retention took it all
        }
        return reader.read(ranges, timeout_s, keep)[0]


#: Answers to a group's first offset lookup while its coordinator is being found or loaded (librdkafka
#: does not flag NOT_COORDINATOR as retriable there).
_COORDINATOR_NOT_READY = {
    KafkaError.NOT_COORDINATOR,
    KafkaError.COORDINATOR_NOT_AVAILABLE,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
}


def _coordinator_not_ready(exc: BaseException) -> bool:
    if not isinstance(exc, KafkaException):
        return False
    err = exc.args[0]
    return err.code() in _COORDINATOR_NOT_READY or err.retriable()


class _Reader:
    """One topic read over offset ranges, assigned (it joins no group and commits nothing; with
    `group_id` it can look up that group's committed offsets)."""

    def __init__(self, settings: Settings, logical: str, group_id: str | None = None) -> None:
        self.settings = settings
        self.spec = TOPICS[logical]
        self.name = self.spec.name(settings.topic_prefix)
        self.consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": group_id or f"recstream-read-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",  # retention deleted the start: read what is left
            }
        )

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.consumer.close()

    def watermarks(self) -> dict[int, tuple[int, int]]:
        meta = self.consumer.list_topics(self.name, timeout=10).topics.get(self.name)
        if meta is None or meta.error is not None:
            raise ValueError(f"topic {self.name} does not exist (run `python -m recstream.ops.cli topics`)")
        return {
            p: self.consumer.get_watermark_offsets(TopicPartition(self.name, p), timeout=10)
            for p in sorted(meta.partitions)
        }

    def committed(self, partitions: Iterable[int]) -> dict[int, int]:
        """The group's committed offset per partition (negative where it has none), in one call.
        Retried for 10 s while the broker answers with a retriable error: the first lookup of a
        group often meets NOT_COORDINATOR while its coordinator is being found."""
        wanted = [TopicPartition(self.name, p) for p in partitions]
        for attempt in Retrying(
            retry=retry_if_exception(_coordinator_not_ready),
            stop=stop_after_delay(10),
            wait=wait_fixed(0.2),
            reraise=True,
        ):
            with attempt:
                found = self.consumer.committed(wanted, timeout=10)
        return {tp.partition: tp.offset for tp in found}

    def read(
        self, ranges: dict[int, tuple[int, int]], timeout_s: float, keep: Callable[[Any], bool] | None = None
    ) -> tuple[list[BaseModel], int]:
        """Valid events at offsets [start, end) of each partition, and how many invalid ones were skipped."""
        ends = {p: end for p, (_, end) in ranges.items()}
        self.consumer.assign([TopicPartition(self.name, p, start) for p, (start, _) in ranges.items()])
        events: list[BaseModel] = []
        invalid = 0
        deadline = time.monotonic() + timeout_s
        pending = set(ends)
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name}: partitions {sorted(pending)} not read to their end in {timeout_s:g} s"
                )
            for msg in self.consumer.consume(num_messages=5000, timeout=0.5):
                if msg.error() is not None or msg.offset() >= ends[msg.partition()]:
                    continue  # an error event, or past the range
                try:
                    # The key too: a catalog delete is a tombstone, known by its key alone; and the
                    # partition, so a misplaced keyed event is refused here as the live consumer does.
                    event = decode(self.spec, msg.value(), self.settings.max_message_bytes, msg.key(), msg.partition())
                except InvalidEvent:
                    invalid += 1
                    continue
                if keep is None or keep(event):
                    events.append(event)
            # Position, not the last offset seen: control records and gaps never arrive as messages.
            for tp in self.consumer.position([TopicPartition(self.name, p) for p in pending]):
                if tp.offset >= ends[tp.partition]:
                    pending.discard(tp.partition)
        return events, invalid

"""Validated, batched producing (confluent-kafka underneath).

Values are checked against the topic's schema *before* they leave the process, so a bad event
is the caller's exception rather than a dead letter somebody finds later.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, Message, Producer
from pydantic import BaseModel

from recstream.config import Settings
from recstream.contracts.partitioning import PARTITIONER
from recstream.contracts.topics import TOPICS, TopicSpec
from recstream.kafka.serde import encode, key_of, validate
from recstream.telemetry import EVENTS_OUT, PRODUCE_ERRORS

log = logging.getLogger(__name__)


def produce_or_wait(
    producer: Producer,
    topic: str,
    key: bytes | None,
    value: bytes | None,
    on_delivery: Any,
    partition: int | None = None,
) -> None:
    """Enqueue one record; while librdkafka's local queue is full, serve delivery reports (which frees
    it) and retry, so a burst slows the caller down instead of failing it. Every producer here (the
    SDK, the worker's answers and dead letters, the behaviour consumer's outputs) enqueues this way."""
    kwargs = {} if partition is None else {"partition": partition}
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery, **kwargs)
            return
        except BufferError:
            producer.poll(0.01)


class DeliveryError(RuntimeError):
    """The broker did not acknowledge one or more messages."""


class MessageTooLarge(ValueError):
    """An event larger as a message than the stream worker takes: sending it would only make a dead letter."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"{size} bytes as a message; the worker takes at most {limit} (MAX_MESSAGE_BYTES)")
        self.size = size
        self.limit = limit


def count_delivery(err: KafkaError | None, msg: Message, worker: str) -> None:
    """One delivery report in the produce metrics."""
    if err is not None:
        PRODUCE_ERRORS.labels(topic=msg.topic()).inc()
    else:
        EVENTS_OUT.labels(topic=msg.topic(), worker=worker).inc()


class _Acks:
    """Delivery reports of one batch of messages. Whichever thread polls the shared producer serves
    them, so the counts are locked."""

    def __init__(self, n: int, worker: str) -> None:
        self.waiting = n
        self.errors: list[str] = []
        self.worker = worker
        self._lock = threading.Lock()

    def report(self, err: KafkaError | None, msg: Message) -> None:
        count_delivery(err, msg, self.worker)
        with self._lock:
            self.waiting -= 1
            if err is not None:
                self.errors.append(f"{msg.topic()}: {err}")


class Outgoing(NamedTuple):
    """One validated, encoded event and where it goes."""

    topic: str
    key: bytes | None
    value: bytes
    model: BaseModel


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "enable.idempotence": True,  # retries never duplicate or reorder a user's events
        # Java's partitioner: a user's events land on one partition whichever client wrote them
        "partitioner": PARTITIONER,
        "acks": "all",
        # 2 ms lets bursts share a batch without adding visible latency to a 50 ms request budget.
        "linger.ms": 2,
        "batch.num.messages": 10_000,
        "queue.buffering.max.messages": 500_000,
        "message.max.bytes": 1_048_576,
    }
    conf.update(overrides)
    return conf


class EventProducer:
    """Send contract events to their registry topic, keyed per the registry."""

    def __init__(self, settings: Settings, worker: str = "client", **config: Any) -> None:
        self.settings = settings
        self.worker = worker
        self._producer = Producer(producer_config(settings, **config))
        # Failures since the last flush: how many and the first few. A count, not a list: a
        # producer that sends through a long outage and never flushes must not grow without bound.
        self._failed = 0
        self._first_failures: list[str] = []
        self._closed = False

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        count_delivery(err, msg, self.worker)
        if err is not None:
            if self._failed == 0:
                log.error(
                    "%s: delivery to %s failed: %s (flush() raises; further failures counted)",
                    self.worker,
                    msg.topic(),
                    err,
                )
            self._failed += 1
            if len(self._first_failures) < 3:
                self._first_failures.append(f"{msg.topic()}: {err}")

    def topic_for(self, logical: str) -> str:
        return TOPICS[logical].name(self.settings.topic_prefix)

    def prepare(self, logical_topic: str, event: BaseModel | dict[str, Any]) -> Outgoing:
        """Validate and encode one event for its topic, without sending it. Raises MessageTooLarge
        when the stream worker would refuse it (MAX_MESSAGE_BYTES, the limit the worker applies)."""
        spec: TopicSpec = TOPICS[logical_topic]
        model = validate(spec, event)
        value = encode(model)
        if len(value) > self.settings.max_message_bytes:
            raise MessageTooLarge(len(value), self.settings.max_message_bytes)
        return Outgoing(spec.name(self.settings.topic_prefix), key_of(spec, model), value, model)

    def send(self, logical_topic: str, event: BaseModel | dict[str, Any]) -> BaseModel:
        """Validate and enqueue one event; returns the validated model (ids filled in)."""
        out = self.prepare(logical_topic, event)
        self.send_raw(out.topic, out.key, out.value)
        return out.model

    def send_many(self, logical_topic: str, events: Iterable[BaseModel | dict[str, Any]]) -> int:
        n = 0
        for event in events:
            self.send(logical_topic, event)
            n += 1
        return n

    def send_raw(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        on_failure: Callable[[KafkaError], None] | None = None,
    ) -> None:
        """Enqueue bytes as they are (replays, dead letters, tests of bad input). `on_failure`: the
        sender handles a failed delivery itself (it is counted in the metrics, not by flush())."""
        if on_failure is None:
            callback = self._on_delivery
        else:

            def callback(err: KafkaError | None, msg: Message) -> None:
                count_delivery(err, msg, self.worker)
                if err is not None:
                    on_failure(err)

        produce_or_wait(self._producer, topic, key, value, callback)
        self._producer.poll(0)

    def serve_reports(self) -> int:
        """Run the delivery callbacks that are due (without waiting); a long-lived sender that never
        flushes calls this in its loop, or no failure would reach its sender before close()."""
        return self._producer.poll(0)

    def deliver(self, outgoing: Sequence[Outgoing], timeout_s: float) -> None:
        """Send these messages and wait for the broker's acknowledgement of each of them (not of
        what other threads sent meanwhile); raise DeliveryError when one failed or `timeout_s`
        passed. On a timeout what is still queued is dropped (`drop_unsent`): other callers' queued
        messages too, and their own reports then fail them, so no caller is told "written" for a
        message that was dropped."""
        acks = _Acks(len(outgoing), self.worker)
        for out in outgoing:
            produce_or_wait(self._producer, out.topic, out.key, out.value, acks.report)
        deadline = time.monotonic() + timeout_s
        while acks.waiting > 0 and (left := deadline - time.monotonic()) > 0:
            self._producer.poll(min(left, 0.01))  # short: another thread's poll may serve our reports
        if acks.waiting > 0:
            waiting = acks.waiting  # before the purge: its reports would make them "failed"
            self.drop_unsent()
            raise DeliveryError(f"{waiting} of {len(outgoing)} messages unacknowledged after {timeout_s}s")
        if acks.errors:
            raise DeliveryError(f"{len(acks.errors)} of {len(outgoing)} messages failed: {acks.errors[:3]}")

    def flush(self, timeout_s: float = 30.0) -> None:
        """Wait for every enqueued message; raise DeliveryError if any failed."""
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise DeliveryError(f"{remaining} messages still undelivered after {timeout_s}s")
        if self._failed:
            failed, first = self._failed, self._first_failures
            self._failed, self._first_failures = 0, []
            raise DeliveryError(f"{failed} messages failed: {first}")

    def drop_unsent(self) -> None:
        """Drop what still waits in the local queue (not what is in flight: that may land), so that
        a caller told "not written" is not proven wrong by a late write once the broker is back."""
        self._producer.purge(in_queue=True, in_flight=False, blocking=False)
        # their reports count send()'s messages as failed, and they stay counted: the next flush()
        # must say so (clearing the count here told a send() caller its purged events were written)
        self._producer.poll(0)

    def close(self, timeout_s: float = 30.0) -> None:
        """Flush, then release the librdkafka handle: left to the garbage collector, its threads keep
        reconnecting, and logging to stderr, after the broker is gone. What flush could not deliver
        is dropped (the DeliveryError says how much)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush(timeout_s)
        finally:
            self._producer.purge()
            self._producer.close()

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

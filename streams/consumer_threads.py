"""What the worker's librdkafka consumer threads (catalog, behaviour, requests) share: their base
consumer settings, the consumed-message record the processors read, their thread lifecycle, and the
rule that a dead consumer thread stops the whole worker."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, Self

from confluent_kafka import Consumer, Message, TopicPartition

from recstream.config import Settings

log = logging.getLogger(__name__)


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Manual offset storage, earliest start, quick failover; `overrides` per consumer."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "group.id": group_id,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        # The broker answers a parked fetch as soon as data arrives; the wait only bounds idle
        # polling (each fetch costs broker CPU on the shared cores).
        "fetch.wait.max.ms": 100,
        # A worker restarted after kill -9 must not wait long for the dead member's session to expire.
        "session.timeout.ms": 10_000,
        "heartbeat.interval.ms": 1000,
    }
    conf.update(overrides)
    return conf


class Consumed:
    """One consumed message as a processor gets it: the fields processors and the dead-letter sink
    read, copied out of librdkafka's Message once."""

    __slots__ = ("key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, msg: Message) -> None:
        self.topic = msg.topic()
        self.partition = msg.partition()
        self.offset = msg.offset()
        self.key = msg.key()
        self.value = msg.value()
        self.timestamp = msg.timestamp()[1] / 1000.0  # producer CreateTime, seconds


def run_or_stop_worker(name: str, run: Callable[[], None]) -> None:
    """Run a consumer thread's loop; if it raises, stop the worker (SIGTERM) instead of living on
    with a dead thread (answering from frozen features, or not answering), so that its supervisor
    restarts it and the state recovers from the changelog."""
    try:
        run()
    except Exception:
        log.critical("%s failed; stopping the worker", name, exc_info=True)
        os.kill(os.getpid(), signal.SIGTERM)


class ConsumerThread:
    """A daemon thread running `_run` until `stop()`; `_run` polls `self._stop` between batches."""

    thread_name = "consumer"

    def __init__(self) -> None:
        self.ready = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=run_or_stop_worker,
            args=(f"{self.thread_name} consumer", self._run),
            name=self.thread_name,
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        """The consumer loop (subclasses); it returns once `self._stop` is set."""
        raise NotImplementedError


#: Offsets stored after a batch is handled are committed this often (librdkafka's auto-commit).
COMMIT_INTERVAL_MS = 1000


class AsyncBatchLoop(ConsumerThread):
    """A consumer thread that hands batches to an async processor on a private asyncio loop.

    The first message of a batch is taken with poll() (it returns on arrival), then whatever else is
    fetched, up to `batch_max`, waiting at most `batch_wait_s`: under load batches grow on their own,
    at low rates nothing waits for one to fill. Offsets are stored once a batch is handled and
    committed every COMMIT_INTERVAL_MS (at least once), and at stop. Subclasses say how to join the
    topic, which messages to keep, what to do per batch and, optionally, while the topic is quiet."""

    batch_max = 32
    batch_wait_s = 0.0
    poll_s = 0.05

    def __init__(self, settings: Settings, topic: str, group_id: str) -> None:
        super().__init__()
        self.settings = settings
        self.topic = topic
        self.group_id = group_id

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        consumer = Consumer(
            consumer_config(
                self.settings,
                self.group_id,
                **{"enable.auto.commit": True, "auto.commit.interval.ms": COMMIT_INTERVAL_MS},
            )
        )
        self._join(consumer)
        try:
            while not self._stop.is_set():
                self._before_poll(consumer)
                first = consumer.poll(self.poll_s)
                if first is None:
                    loop.run_until_complete(self._idle())
                    continue
                msgs = [first, *consumer.consume(self.batch_max - 1, timeout=self.batch_wait_s)]
                events = [Consumed(m) for m in msgs if self._keep(m)]
                loop.run_until_complete(self._handle(events))
                last: dict[int, int] = {}
                for ev in events:
                    last[ev.partition] = ev.offset
                consumer.store_offsets(offsets=[TopicPartition(self.topic, p, off + 1) for p, off in last.items()])
        finally:
            try:
                consumer.commit(asynchronous=False)
            except Exception as exc:  # nothing stored yet, or the broker is gone
                log.debug("%s: final commit: %s", self.thread_name, exc)
            consumer.close()
            loop.close()

    def _join(self, consumer: Consumer) -> None:
        """Subscribe to the topic, or take partitions some other way."""
        raise NotImplementedError

    def _before_poll(self, consumer: Consumer) -> None:
        """Work between batches on this thread (assignment commands)."""

    def _keep(self, msg: Message) -> bool:
        if msg.error():
            log.warning("%s consumer: %s", self.thread_name, msg.error())
            return False
        return True

    async def _idle(self) -> None:
        """While the topic is quiet (no message within `poll_s`)."""

    async def _handle(self, events: list[Consumed]) -> None:
        raise NotImplementedError

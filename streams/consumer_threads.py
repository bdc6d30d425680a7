"""What the worker's librdkafka consumer threads (catalog, behaviour, requests) share: their base
consumer settings, the consumed-message record the processors read, their thread lifecycle, and the
rule that a dead consumer thread stops the whole worker."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, Self

from confluent_kafka import Message

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


class ConsumedMessage:
    """The fields of a consumed message that processors and the dead-letter sink read."""

    __slots__ = ("key", "offset", "partition", "timestamp", "topic", "value")

    def __init__(self, msg: Message) -> None:
        self.topic = msg.topic()
        self.partition = msg.partition()
        self.offset = msg.offset()
        self.key = msg.key()
        self.value = msg.value()
        self.timestamp = msg.timestamp()[1] / 1000.0  # producer CreateTime, seconds


class Consumed:
    """One consumed message as a processor gets it, before or beside its decoded model."""

    __slots__ = ("message",)

    def __init__(self, msg: Message) -> None:
        self.message = ConsumedMessage(msg)


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

"""What the worker's librdkafka consumer threads (catalog, behaviour, requests) share: their base
consumer settings, the consumed-message record the processors read, their thread lifecycle, and the
rule that a dead consumer thread stops the whole worker."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import signal
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Self

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from recstream.config import Settings
from recstream.telemetry import CONSUMER_ERRORS

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


#: Set when a consumer thread failed: the worker then exits non-zero (a supervisor's
#: restart-on-failure must see a failure, not a clean stop).
THREAD_FAILED = threading.Event()


def run_or_stop_worker(name: str, run: Callable[[], None]) -> None:
    """Run a consumer thread's loop; if it raises, stop the worker (SIGTERM) instead of living on
    with a dead thread (answering from frozen features, or not answering), so that its supervisor
    restarts it and the state recovers from the changelog."""
    try:
        run()
    except Exception:
        log.critical("%s failed; stopping the worker", name, exc_info=True)
        THREAD_FAILED.set()
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


#: Offsets stored after a batch's outputs are acknowledged are committed this often (auto-commit).
COMMIT_INTERVAL_MS = 1000
#: On revoke and stop: how long to wait for the broker to acknowledge the outputs still in flight.
SETTLE_TIMEOUT_S = 10.0

DeliveryCallback = Callable[[Any, Any], None]


class BatchOutputs:
    """What one handled batch produced (answers, dead letters) and the consumed positions that
    its acknowledgement releases. Delivery reports may be served on another thread that polls the
    same producer, hence the lock."""

    __slots__ = ("_lock", "delivered", "failed", "positions", "produced")

    def __init__(self, positions: dict[int, int]) -> None:
        self.positions = positions
        self.produced = 0
        self.delivered = 0
        self.failed = False
        self._lock = threading.Lock()

    def track(self, on_delivery: DeliveryCallback) -> DeliveryCallback:
        """`on_delivery`, also counting this output as acknowledged (or failed) when it reports."""
        with self._lock:
            self.produced += 1

        def reported(err: Any, msg: Any) -> None:
            with self._lock:
                self.delivered += 1
                self.failed |= err is not None
            on_delivery(err, msg)

        return reported

    def settled(self) -> bool:
        with self._lock:
            return self.delivered == self.produced


#: The batch being handled on this thread (its task copies the value): `StreamContext.produce`
#: registers the outputs of that batch here, so that their consumed offsets wait for the broker.
CURRENT_BATCH: contextvars.ContextVar[BatchOutputs | None] = contextvars.ContextVar("current_batch", default=None)


class AsyncBatchLoop(ConsumerThread):
    """A consumer thread that hands batches to an async processor on a private asyncio loop.

    The first message of a batch is taken with poll() (it returns on arrival), then whatever else is
    fetched, up to `batch_max`, waiting at most `batch_wait_s`: under load batches grow on their own,
    at low rates nothing waits for one to fill. Offsets are committed every COMMIT_INTERVAL_MS and at
    stop. At least once: a batch's offsets are stored only once it is handled and the broker has
    acknowledged every answer and dead letter it produced (`outputs()`), so a
    crash, a stop or a delivery that fails never commits past a request whose answer was lost; after
    a failed delivery nothing more is committed, and a restart answers from there again. Subclasses
    say how to join the topic, which messages to keep, what to do per batch and, optionally, while
    the topic is quiet."""

    batch_max = 32
    batch_wait_s = 0.0
    poll_s = 0.05
    #: Stop abandons the batch (or idle work) in progress instead of waiting for it: for processors
    #: that may wait without bound on a model (catalog indexing retries until Triton answers) and
    #: whose work is idempotent; the abandoned batch's offsets are never stored, so a restart
    #: replays it. Off for requests: a stop lets the answers in progress go out.
    abandon_on_stop = False

    def __init__(self, settings: Settings, topic: str, group_id: str) -> None:
        super().__init__()
        self.settings = settings
        self.topic = topic
        self.group_id = group_id
        self._unsettled: deque[BatchOutputs] = deque()
        self._stalled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._work: asyncio.Task | None = None

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stop.set()
        if self.abandon_on_stop:
            self._abandon()
        super().stop(timeout_s)

    def _abandon(self) -> None:
        """Cancel the work in progress (from the stopping thread)."""
        loop, work = self._loop, self._work
        if loop is None or work is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nothing left to cancel
            loop.call_soon_threadsafe(work.cancel)

    def _complete(self, loop: asyncio.AbstractEventLoop, coro: Any) -> bool:
        """Run `coro` to its end on this thread's loop; False when a stop abandoned it."""
        work = loop.create_task(coro)
        self._work = work
        if self.abandon_on_stop and self._stop.is_set():  # stop() ran before `work` was visible to it
            work.cancel()
        try:
            loop.run_until_complete(work)
            return True
        except asyncio.CancelledError as exc:
            if not (self.abandon_on_stop and self._stop.is_set()):  # not ours: a dead thread stops the worker
                raise RuntimeError(f"{self.thread_name}: work cancelled without a stop") from exc
            log.warning("%s: stop abandoned the work in progress; a restart does it again", self.thread_name)
            return False
        finally:
            self._work = None

    def outputs(self) -> Producer | None:
        """The producer whose acknowledgements release consumed offsets (None: stored when handled)."""
        return None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        self._loop = loop
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
                self._store_settled(consumer)
                self._before_poll(consumer)
                first = consumer.poll(self.poll_s)
                if first is None:
                    if not self._complete(loop, self._idle()):
                        break
                    continue
                msgs = [first, *consumer.consume(self.batch_max - 1, timeout=self.batch_wait_s)]
                events = [Consumed(m) for m in msgs if self._keep(m)]
                batch = BatchOutputs({ev.partition: ev.offset + 1 for ev in events})
                token = CURRENT_BATCH.set(batch)  # the task copies this context when created
                try:
                    if not self._complete(loop, self._handle(events)):
                        break
                finally:
                    CURRENT_BATCH.reset(token)
                if not self._stalled:  # once stalled nothing is stored again: keep nothing to store
                    self._unsettled.append(batch)
        finally:
            try:
                self.settle(consumer)
                consumer.commit(asynchronous=False)
            except Exception as exc:  # nothing stored yet, or the broker is gone
                log.debug("%s: final commit: %s", self.thread_name, exc)
            consumer.close()
            self._loop = None
            loop.close()

    def _store_settled(self, consumer: Consumer) -> None:
        """Store the offsets of the oldest batches whose outputs are all acknowledged, in order."""
        producer = self.outputs()
        if producer is not None:
            producer.poll(0)  # serve delivery reports
        while self._unsettled and not self._stalled and self._unsettled[0].settled():
            batch = self._unsettled.popleft()
            if batch.failed:
                self._stalled = True
                log.error(
                    "%s: an answer or dead letter was never delivered; no offset is committed past %s, so a "
                    "restart answers from there again",
                    self.thread_name,
                    batch.positions,
                )
                return
            positions = [TopicPartition(self.topic, p, off) for p, off in batch.positions.items()]
            if positions:
                try:
                    consumer.store_offsets(offsets=positions)
                except KafkaException as exc:  # a partition revoked meanwhile: its new owner answers
                    log.debug("%s: offsets not stored: %s", self.thread_name, exc)

    def settle(self, consumer: Consumer, timeout_s: float = SETTLE_TIMEOUT_S) -> None:
        """Wait for the outputs in flight (revoke, stop), then store what they release."""
        producer = self.outputs()
        if producer is not None and self._unsettled:
            producer.flush(timeout_s)
        self._store_settled(consumer)

    def _join(self, consumer: Consumer) -> None:
        """Subscribe to the topic, or take partitions some other way."""
        raise NotImplementedError

    def _before_poll(self, consumer: Consumer) -> None:
        """Work between batches on this thread (assignment commands)."""

    def _keep(self, msg: Message) -> bool:
        if err := msg.error():
            CONSUMER_ERRORS.labels(worker=self.thread_name, error=err.name()).inc()
            log.warning("%s consumer: %s", self.thread_name, err)
            return False
        return True

    async def _idle(self) -> None:
        """While the topic is quiet (no message within `poll_s`)."""

    async def _handle(self, events: list[Consumed]) -> None:
        raise NotImplementedError

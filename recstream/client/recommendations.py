"""Ask for recommendations/search results over Kafka and wait for the answer by request_id.

A background thread reads the recommendations topic from its end (no consumer group: every
application instance sees every result and picks its own request ids), so a request's latency
as measured here is the true produce-to-consume time an application would see.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from recstream.client.producer import DeliveryError, EventProducer
from recstream.config import Settings
from recstream.contracts.events import RecommendationRequest, RecommendationResult
from recstream.contracts.topics import RECOMMENDATIONS
from recstream.kafka.serde import InvalidEvent, decode


class TopicUnavailable(RuntimeError):
    """The recommendations topic cannot be read (missing, or no partitions yet): a client built now
    would listen to nothing and time out on every request, so none is built."""


#: How long a request may wait to be sent before it is dropped (a caller waits 5 s by default).
REQUEST_TTL_MS = 10_000


class RecommendationClient:
    def __init__(self, settings: Settings, producer: EventProducer | None = None) -> None:
        self.settings = settings
        self._owns_producer = producer is None
        # A request nobody waits for any more is not worth sending: librdkafka's default keeps one
        # queued for 5 minutes, and a broker back from an outage got every abandoned request at once.
        self.producer = producer or EventProducer(
            settings, worker="rec-client", **{"linger.ms": 0, "message.timeout.ms": REQUEST_TTL_MS}
        )
        self._pending: dict[str, Future[RecommendationResult]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._consumer = Consumer(
            {
                "bootstrap.servers": settings.kafka_bootstrap,
                "group.id": "recstream-rec-client",  # required by librdkafka; offsets are never committed
                "enable.auto.commit": False,
                # Long polling: with fetch.min.bytes=1 the broker answers a parked fetch the moment a
                # result arrives, so a short wait adds no latency, only empty fetches (5 ms was ~200
                # fetch requests/s per client for the broker to serve, on the same cores)
                "fetch.wait.max.ms": 100,
                "fetch.min.bytes": 1,
            }
        )
        try:
            self._consumer.assign(self._current_ends(RECOMMENDATIONS.name(settings.topic_prefix)))
        except BaseException:
            self._consumer.close()
            if self._owns_producer:
                self.producer.close(0)
            raise
        self._thread = threading.Thread(target=self._run, name="rec-client", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def _current_ends(self, topic: str, timeout_s: float = 30.0) -> list[TopicPartition]:
        """Each partition at its end offset as of now, asked of its leader before any request goes out.

        Assigning OFFSET_END instead leaves the end to be looked up when the partition's first fetch
        starts: after a broker dies that waits for the new leader, and every result written in the
        meantime falls before the offset found and is never read (seen: 14 of 33 requests unanswered
        for 2 minutes on a 3-broker cluster after one broker was killed).
        """
        meta = self._consumer.list_topics(topic, timeout=10).topics[topic]
        if meta.error is not None or not meta.partitions:
            raise TopicUnavailable(
                f"topic {topic} cannot be read ({meta.error or 'no partitions'}): start the stream worker "
                "or run `python -m recstream.ops.cli topics`, which create it"
            )
        ends = []
        for p in sorted(meta.partitions):
            for attempt in Retrying(
                retry=retry_if_exception_type(KafkaException),
                stop=stop_after_delay(timeout_s),
                wait=wait_fixed(0.5),
                reraise=True,
            ):
                with attempt:
                    _, high = self._consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)
            ends.append(TopicPartition(topic, p, high))
        return ends

    def _run(self) -> None:
        while not self._stop.is_set():
            # poll() returns at the first message; consume(n, timeout) would wait until n messages or
            # the whole timeout (measured: +50 ms median per result at a 50 ms timeout). Then take
            # whatever else is already fetched, without waiting.
            self.producer.serve_reports()  # a dropped request fails its caller now (submit's not_sent)
            first = self._consumer.poll(0.05)
            msgs = [first, *self._consumer.consume(num_messages=500, timeout=0)] if first is not None else []
            self._ready.set()
            for msg in msgs:
                if msg.error():
                    continue
                try:
                    result = decode(RECOMMENDATIONS, msg.value(), self.settings.max_message_bytes)
                except InvalidEvent:
                    continue
                with self._lock:
                    fut = self._pending.pop(result.request_id, None)
                # A caller's deadline cancels its future from another thread at any moment: claiming
                # it first (False once cancelled) keeps set_result from raising on this thread,
                # which would end it, and with it every later answer.
                if fut is not None and fut.set_running_or_notify_cancel():
                    fut.set_result(result)

    def submit(self, request: RecommendationRequest) -> Future[RecommendationResult]:
        """Send a request; the future resolves when its result appears on the topic. Raises
        MessageTooLarge (nothing sent, nothing left waiting) for a request the worker would refuse."""
        out = self.producer.prepare("requests", request)
        fut: Future[RecommendationResult] = Future()
        with self._lock:
            self._pending[request.request_id] = fut

        def not_sent(err: KafkaError) -> None:
            # dropped (REQUEST_TTL_MS passed, the broker refused it): its caller hears so now,
            # not at its own deadline, and nothing is left for flush() to report later
            with self._lock:
                waiting = self._pending.pop(request.request_id, None)
            if waiting is not None and waiting.set_running_or_notify_cancel():
                waiting.set_exception(DeliveryError(f"request {request.request_id} was not sent: {err}"))

        try:
            self.producer.send_raw(out.topic, out.key, out.value, on_failure=not_sent)
        except BaseException:
            self.forget(request.request_id)
            raise
        return fut

    def forget(self, request_id: str) -> None:
        """Stop waiting for `request_id` (its caller gave up); a late result is then ignored."""
        with self._lock:
            self._pending.pop(request_id, None)

    async def ask(self, request: RecommendationRequest, deadline: float) -> RecommendationResult:
        """`request` from an event loop, waiting without a thread until `deadline` (time.monotonic()).
        Raises TimeoutError at the deadline."""
        fut = self.submit(request)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise TimeoutError(f"no result for request {request.request_id} by its deadline") from None
        finally:
            # a result pops its own entry; a timeout or a cancelled caller (shutdown, a client gone)
            # must too, or the entry waits for a result that may never come
            self.forget(request.request_id)

    def request(self, request: RecommendationRequest, timeout_s: float = 5.0) -> RecommendationResult:
        fut = self.submit(request)
        self.producer._producer.flush(timeout_s)
        try:
            return fut.result(timeout=timeout_s)
        except FutureTimeout as exc:
            with self._lock:
                self._pending.pop(request.request_id, None)
            raise TimeoutError(f"no result for request {request.request_id} within {timeout_s}s") from exc

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._consumer.close()
        if self._owns_producer:
            self.producer.close(5)
        else:
            self.producer.flush(5)

    def __enter__(self) -> RecommendationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(predicate, timeout_s: float, interval_s: float = 0.02) -> bool:
    """Poll `predicate` until true or timeout; for tests and demos."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return bool(predicate())

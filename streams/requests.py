"""The requests topic on its own thread: a librdkafka consumer and a private asyncio loop running
the request processor (streams.recommender.answer_batch), so requests never queue behind behaviour
or catalog batches.

Co-partitioning: a request reads the sessions table of its user's partition, so this consumer is
assigned exactly the partition numbers the behaviour consumer holds (`follow`: the behaviour
consumer's rebalance callbacks assign and revoke them here, after its tables are recovered). Only
without a behaviour consumer in the process does it join a group itself. Offsets live in the group
`<app id>-requests`, stored after a request's answer is published and committed every second (at
least once: a crash re-answers at most the last second of requests; they are over budget by then
and answered from retrieval).

Latency: the first message of a batch is taken with poll() (returns on arrival), then whatever else
is already fetched, up to BATCH_MAX, without waiting: under load batches grow on their own and
share one encoder, store and ranker call; at low rates nothing waits for a batch to fill.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from recstream.contracts.topics import REQUESTS
from recstream.telemetry import STAGE_LATENCY
from streams.consumer_threads import Consumed, ConsumerThread, consumer_config

log = logging.getLogger(__name__)

#: Requests per batch at most: 32 requests share one encoder call and 32 / max_batch ranker calls.
BATCH_MAX = 32
#: How long poll() waits for a first request before the loop looks at its commands again.
POLL_S = 0.05
#: Stored offsets are committed this often (librdkafka's auto-commit, after processing only).
COMMIT_INTERVAL_MS = 1000


class RequestLoop(ConsumerThread):
    """One thread: consume requests, answer them in batches, store offsets of what was answered."""

    thread_name = "requests"

    def __init__(self, ctx: Any, answer: Callable[[Any, list], Awaitable[None]], group_id: str) -> None:
        """`answer(ctx, decoded)`: the request processor (streams.registry), awaited per batch."""
        super().__init__()
        self.ctx = ctx
        self.answer = answer
        self.settings = ctx.settings
        self.group_id = group_id
        self.topic = REQUESTS.name(self.settings.topic_prefix)
        self._commands: queue.Queue[tuple[str, list[int], threading.Event | None]] = queue.Queue()
        self._following = False
        self.assigned: set[int] = set()

    # --- lifecycle ----------------------------------------------------------------------------

    def follow(self) -> RequestLoop:
        """Take partition assignments from assign()/revoke() (the behaviour consumer's rebalances)."""
        self._following = True
        return self

    def assign(self, partitions: list[int]) -> None:
        """Called from the behaviour consumer's thread once the tables of these partitions are recovered."""
        self._commands.put(("assign", list(partitions), None))

    def revoke(self, partitions: list[int]) -> None:
        """Called from the behaviour consumer's thread; returns once this consumer let them go, so no
        request of a revoked partition is answered from a table this process no longer owns."""
        if self._thread is None or not self._thread.is_alive():
            return  # stopped (worker shutdown): nothing is being answered
        done = threading.Event()
        self._commands.put(("revoke", list(partitions), done))
        done.wait(30)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        # offsets are stored only once answered, and committed every COMMIT_INTERVAL_MS
        consumer = Consumer(
            consumer_config(
                self.settings,
                self.group_id,
                **{"enable.auto.commit": True, "auto.commit.interval.ms": COMMIT_INTERVAL_MS},
            )
        )
        if not self._following:
            consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not self._stop.is_set():
                self._apply_commands(consumer)
                first = consumer.poll(POLL_S)
                if first is None:
                    continue
                msgs = [first, *consumer.consume(BATCH_MAX - 1, timeout=0)]
                self._answer(loop, consumer, msgs)
        finally:
            try:
                consumer.commit(asynchronous=False)
            except Exception as exc:  # nothing stored yet, or the broker is gone
                log.debug("requests: final commit: %s", exc)
            consumer.close()
            loop.close()

    def _apply_commands(self, consumer: Consumer) -> None:
        while True:
            try:
                cmd, parts, done = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd == "assign":
                new = [p for p in parts if p not in self.assigned]
                if new:
                    # incremental: keeps the positions of partitions already held
                    consumer.incremental_assign([TopicPartition(self.topic, p) for p in new])
                    self.assigned.update(new)
                log.info("requests: assigned partitions %s", sorted(self.assigned))
                self.ready.set()
            elif cmd == "revoke":
                gone = [p for p in parts if p in self.assigned]
                if gone:
                    try:
                        consumer.commit(asynchronous=False)
                    except Exception as exc:
                        log.debug("requests: commit before revoke: %s", exc)
                    consumer.incremental_unassign([TopicPartition(self.topic, p) for p in gone])
                    self.assigned.difference_update(gone)
                if done is not None:
                    done.set()

    # standalone mode (no behaviour consumer in this process): our own group membership
    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned.update(tp.partition for tp in partitions)
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.assigned.difference_update(tp.partition for tp in partitions)

    # --- the batch ----------------------------------------------------------------------------

    def _answer(self, loop: asyncio.AbstractEventLoop, consumer: Consumer, msgs: list[Message]) -> None:
        t0 = time.perf_counter()
        events = []
        for msg in msgs:
            if msg.error():
                log.warning("requests consumer: %s", msg.error())
                continue
            if msg.partition() not in self.assigned:
                continue  # fetched just before a revoke: another worker owns it now
            events.append(Consumed(msg))
        decoded = self.ctx.decode_events(REQUESTS, events)
        STAGE_LATENCY.labels(stage="decode").observe(time.perf_counter() - t0)
        loop.run_until_complete(self.answer(self.ctx, decoded))
        last: dict[int, int] = {}
        for ev in events:
            last[ev.message.partition] = ev.message.offset
        consumer.store_offsets(offsets=[TopicPartition(self.topic, p, off + 1) for p, off in last.items()])

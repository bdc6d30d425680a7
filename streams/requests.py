"""The requests topic on its own thread: a librdkafka consumer and a private asyncio loop running
the request processor (streams.recommender.answer_batch), so requests never queue behind behaviour
or catalog batches.

Co-partitioning: a request reads the sessions table of its user's partition, so this consumer is
assigned exactly the partition numbers the behaviour consumer holds (`follow`: the behaviour
consumer's rebalance callbacks assign and revoke them here, after its tables are recovered). Only
without a behaviour consumer in the process does it join a group itself. Offsets live in the group
`<app id>-requests`, stored once the broker acknowledged the batch's answers and dead letters and
committed every second (at least once: a crash re-answers at most the last second of requests;
they are over budget by then and answered from retrieval).

Latency: the first message of a batch is taken with poll() (returns on arrival), then whatever else
is already fetched, up to BATCH_MAX, without waiting: under load batches grow on their own and
share one encoder, store and ranker call; at low rates nothing waits for a batch to fill.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from recstream.contracts.topics import REQUESTS
from recstream.telemetry import STAGE_LATENCY
from streams.consumer_threads import AsyncBatchLoop, Consumed

log = logging.getLogger(__name__)

#: Requests per batch at most: 32 requests share one encoder call and 32 / max_batch ranker calls.
BATCH_MAX = 32
#: How long poll() waits for a first request before the loop looks at its commands again.
POLL_S = 0.05


class RequestLoop(AsyncBatchLoop):
    """One thread: consume requests, answer them in batches, store offsets of what was answered."""

    thread_name = "requests"
    batch_max = BATCH_MAX
    poll_s = POLL_S

    def __init__(self, ctx: Any, answer: Callable[[Any, list], Awaitable[None]], group_id: str) -> None:
        """`answer(ctx, decoded)`: the request processor (streams.registry), awaited per batch."""
        super().__init__(ctx.settings, REQUESTS.name(ctx.settings.topic_prefix), group_id)
        self.ctx = ctx
        self.answer = answer
        self._commands: queue.Queue[tuple[str, list[int], threading.Event | None]] = queue.Queue()
        self._following = False
        self.assigned: set[int] = set()

    def outputs(self) -> Any:
        return self.ctx.producer

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

    def _join(self, consumer: Consumer) -> None:
        if not self._following:
            consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)

    def _before_poll(self, consumer: Consumer) -> None:
        self._apply_commands(consumer)

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
                        self.settle(consumer)
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

    def _keep(self, msg: Message) -> bool:
        # fetched just before a revoke: another worker owns that partition now
        return super()._keep(msg) and msg.partition() in self.assigned

    async def _handle(self, events: list[Consumed]) -> None:
        t0 = time.perf_counter()
        decoded = self.ctx.decode_events(REQUESTS, events)
        STAGE_LATENCY.labels(stage="decode").observe(time.perf_counter() - t0)
        await self.answer(self.ctx, decoded)

"""The behaviour topic, consumed in batches by librdkafka on its own thread.

(The worker ran these processors as faust-streaming agents first: faust's per-event stream
machinery cost ~720 Python calls per behaviour event, which capped the worker at ~5,000 events/s
on 2 cores and shared the event loop with requests.) Here one confluent-kafka consumer reads
batches of up to BATCH_MAX messages, decodes each message once, and hands the batch to every
processor (session features, feedback joiner), which fold it into their ChangelogTables.

Ordering: one user's events are on one partition and a batch keeps partition order, so each user
is folded in offset order. Delivery: at least once, with the tables never behind the committed
offsets: every COMMIT_INTERVAL_S the consumed positions are checkpointed together with the last
output produced so far (changelog writes, training examples and dead letters share one producer),
and a checkpoint is committed only once the broker acknowledged every output up to it (tracked
per record from delivery reports, so the consumer never stops to wait for the broker; on revoke
and stop the producer is flushed and the positions committed synchronously). The fold functions
skip events they already applied, so the replayed tail after a crash changes nothing. On
assignment, the tables of the assigned partitions are recovered from their changelogs before any
input of those partitions is processed, and then handed to the request consumer (streams.requests).

Requests run on their own thread; this one holds the GIL only while it folds a batch (the waits
for Kafka release it).
"""

from __future__ import annotations

import functools
import heapq
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

from recstream.client.producer import produce_or_wait, producer_config
from recstream.contracts.events import BehaviourEvent
from recstream.contracts.topics import BEHAVIOUR
from recstream.kafka.dead_letters import DeadLetterSink, RefusedMessage
from recstream.kafka.serde import InvalidEvent, decode
from recstream.telemetry import EVENTS_IN, EVENTS_OUT, FEATURE_EVENTS, PRODUCE_ERRORS, STAGE_LATENCY
from streams.changelog import ChangelogTable, ensure_changelog
from streams.consumer_threads import ConsumerThread, consumer_config

log = logging.getLogger(__name__)

#: Up to 5,000 messages per batch: at 20k events/s a batch is a quarter second of input, big
#: enough to amortise per-batch work (one state write per touched user).
BATCH_MAX = 5000
#: consume() returns when BATCH_MAX messages are there or after this long: 5 ms is 5 % of the
#: 100 ms freshness budget, and at low rates keeps the thread from waking per message.
BATCH_WITHIN_S = 0.005
#: Positions are checkpointed this often (and committed once their outputs are acknowledged); a
#: kill -9 replays about this much input, which the idempotent folds skip.
COMMIT_INTERVAL_S = 1.0
#: On revoke and stop: how long to wait for the broker to acknowledge the outputs before giving up
#: the final commit (the offsets stay uncommitted and are replayed).
FLUSH_TIMEOUT_S = 10.0
#: Timers of the processors (feedback windows) run this often, between batches.
TICK_S = 0.25


class Record:
    """One decoded behaviour message: the message (for dead letters), where it came from, the event."""

    __slots__ = ("event", "msg", "offset", "partition", "ts_s")

    def __init__(self, msg: Message, partition: int, offset: int, ts_s: float, event: BehaviourEvent) -> None:
        self.msg = msg
        self.partition = partition
        self.offset = offset
        self.ts_s = ts_s  # producer CreateTime, seconds
        self.event = event


class Processor(Protocol):
    tables: Sequence[ChangelogTable]

    def process(self, batch: list[Record]) -> None: ...

    def tick(self) -> None: ...

    def recovered(self) -> None: ...

    # Optional: `flush()` writes what a processor buffered across batches. It is called right
    # before each checkpoint and each blocking commit, so committed offsets never run ahead of it.


class BehaviourLoop(ConsumerThread):
    """One consumer thread for the behaviour topic feeding `processors` (in order, same batch)."""

    thread_name = "behaviour"

    def __init__(self, ctx: Any, processors: Sequence[Processor], group_id: str) -> None:
        super().__init__()
        self.ctx = ctx
        self.settings = ctx.settings
        self.processors = list(processors)
        self.group_id = group_id
        self.topic = BEHAVIOUR.name(self.settings.topic_prefix)
        self._positions: dict[int, int] = {}  # partition -> next offset to commit
        self._event_ids: dict[int, OrderedDict[str, None]] = {}  # partition -> recent event ids
        self._delivery_errors = 0
        self._consumer: Consumer | None = None
        # streams.requests.RequestLoop following this consumer's partitions (co-partitioning)
        self.requests: Any = None
        # Changelog records, training examples and dead letters: one producer, so its acknowledgements
        # cover everything this consumer's offsets stand for. 20 ms linger: nobody waits for these
        # records (tables are read from memory), and fewer, larger requests save broker CPU.
        self.producer = Producer(producer_config(self.settings, **{"linger.ms": 20}))
        self.dead_letters = DeadLetterSink(self.produce, ctx.worker)
        # Acknowledgement tracking: every output gets a sequence number; a checkpoint (the consumed
        # positions and the last sequence number produced when it was taken) is committed once no
        # record up to that number is unacknowledged. The consumer never waits for the broker.
        self._seq = 0
        self._unacked: list[int] = []  # heap of produced sequence numbers (acked ones removed lazily)
        self._acked: set[int] = set()
        self._checkpoints: deque[tuple[int, dict[int, int]]] = deque()
        for proc in self.processors:
            for table in proc.tables:
                table.bind(self.send)

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> BehaviourLoop:
        for proc in self.processors:
            for table in proc.tables:
                ensure_changelog(self.settings, table.topic, table.partitions)
        return super().start()

    def _run(self) -> None:
        self._consumer = Consumer(
            consumer_config(
                self.settings,
                self.group_id,
                **{"enable.auto.commit": False, "queued.max.messages.kbytes": 65536},
            )
        )
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        next_commit = time.monotonic() + COMMIT_INTERVAL_S
        next_tick = time.monotonic() + TICK_S
        try:
            while not self._stop.is_set():
                msgs = self._consumer.consume(BATCH_MAX, timeout=BATCH_WITHIN_S)
                if msgs:
                    self._process(msgs)
                now = time.monotonic()
                if now >= next_tick and self.ready.is_set():
                    for proc in self.processors:
                        proc.tick()
                    next_tick = now + TICK_S
                self.producer.poll(0)  # delivery reports: acknowledgements
                if now >= next_commit:
                    self._flush_processors()
                    self._checkpoint()
                    next_commit = now + COMMIT_INTERVAL_S
                self._commit_acknowledged()
            self._commit()
        finally:
            try:
                self._consumer.close()  # revokes: the last commit, which flushes the producer
            finally:
                # Release the librdkafka handle: left to the garbage collector, its threads keep
                # reconnecting (and logging) after the broker is gone. Nothing uses it after the loop.
                self.producer.flush(FLUSH_TIMEOUT_S)
                self.producer.close()

    # --- rebalance ----------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        t0 = time.perf_counter()
        for proc in self.processors:
            for table in proc.tables:
                table.recover(self.settings, parts)
            proc.recovered()
        log.info("behaviour: assigned partitions %s, tables recovered in %.2fs", parts, time.perf_counter() - t0)
        if self.requests is not None:  # requests of these users may now be answered here
            self.requests.assign(parts)
        self.ready.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        parts = [tp.partition for tp in partitions]
        if self.requests is not None:  # first stop answering from tables this process is giving up
            self.requests.revoke(parts)
        self._commit()
        self._checkpoints.clear()  # never commit positions of partitions another member may own now
        for p in parts:
            # _event_ids[p] stays: an eager rebalance revokes every partition and hands most back,
            # and an id remembered from an earlier tenure is still a real event (bounded per partition)
            self._positions.pop(p, None)
        for proc in self.processors:
            revoked = getattr(proc, "revoked", None)
            if revoked is not None:
                revoked(parts)

    # --- the batch ----------------------------------------------------------------------------

    def _process(self, msgs: list[Message]) -> None:
        t0 = time.perf_counter()
        max_bytes = self.settings.max_message_bytes
        batch: list[Record] = []
        consumed: dict[int, int] = {}
        duplicates = 0
        for msg in msgs:
            if msg.error():
                log.warning("behaviour consumer: %s", msg.error())
                continue
            partition, offset = msg.partition(), msg.offset()
            consumed[partition] = offset + 1
            try:
                event = decode(BEHAVIOUR, msg.value(), max_bytes, msg.key(), partition)
            except InvalidEvent as exc:
                self.dead_letter(msg, exc.detail, exc.reason)
                continue
            if self._duplicate(partition, event.user_id, event.event_id):
                duplicates += 1
                continue
            batch.append(Record(msg, partition, offset, msg.timestamp()[1] / 1000.0, event))
        if duplicates:
            FEATURE_EVENTS.labels(result="duplicate").inc(duplicates)
        EVENTS_IN.labels(topic=self.topic, worker=self.ctx.worker).inc(len(msgs))
        STAGE_LATENCY.labels(stage="behaviour_decode").observe(time.perf_counter() - t0)
        for proc in self.processors:
            proc.process(batch)
        # Only a batch every processor folded moves the positions: one a processor failed on (a
        # store timeout, say) is never committed, neither by a checkpoint nor by the revoke that
        # closing the consumer runs, so the restarted worker replays it instead of losing it.
        self._positions.update(consumed)

    def _duplicate(self, partition: int, user_id: str, event_id: str) -> bool:
        """True for a user's event_id seen among the partition's last `event_dedupe_ids` events: a
        client's retry (after a 503 or a timeout whose write did land) is applied once. Per user: an
        application's own ids ("evt-1" for each user) must not make one user's event another's
        repeat. (A restart forgets the window; replays after one are the offsets' business.)"""
        seen = self._event_ids.get(partition)
        if seen is None:
            seen = self._event_ids[partition] = OrderedDict()
        key = f"{user_id}\x00{event_id}"
        if key in seen:
            return True
        seen[key] = None
        if len(seen) > self.settings.event_dedupe_ids:
            seen.popitem(last=False)
        return False

    def dead_letter(self, msg: Message, error: str, error_type: str) -> None:
        self.dead_letters.publish(RefusedMessage.from_confluent(msg), error=error, error_type=error_type)

    # --- output ---------------------------------------------------------------------------------

    def produce(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.send(topic, key, value, None)

    def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None) -> None:
        """Produce one output (changelog record, example, dead letter) under acknowledgement tracking."""
        self._seq += 1
        seq = self._seq
        heapq.heappush(self._unacked, seq)
        produce_or_wait(self.producer, topic, key, value, functools.partial(self._on_delivery, seq), partition)

    def _on_delivery(self, seq: int, err: Any, msg: Any) -> None:
        if err is not None:
            self._delivery_errors += 1
            PRODUCE_ERRORS.labels(topic=msg.topic()).inc()
            log.error("delivery to %s failed: %s", msg.topic(), err)
            return  # never acknowledged: no checkpoint past it is committed
        self._acked.add(seq)
        if msg.value() is not None and not msg.topic().endswith("-changelog"):
            EVENTS_OUT.labels(topic=msg.topic(), worker=self.ctx.worker).inc()

    def _lowest_unacked(self) -> int | None:
        heap, acked = self._unacked, self._acked
        while heap and heap[0] in acked:
            acked.discard(heapq.heappop(heap))
        return heap[0] if heap else None

    def _checkpoint(self) -> None:
        """Remember what the consumed positions need acknowledged before they may be committed."""
        if self._positions and (not self._checkpoints or self._checkpoints[-1][1] != self._positions):
            self._checkpoints.append((self._seq, dict(self._positions)))

    def _commit_acknowledged(self) -> None:
        """Commit the newest checkpoint whose outputs are all acknowledged (asynchronously)."""
        if self._delivery_errors:
            # An output is lost: committing past it would make the loss permanent. Stop (the guard
            # stops the worker); a restart recovers the tables and replays from the last good commit.
            raise RuntimeError(f"{self._delivery_errors} outputs of the behaviour consumer were not delivered")
        if not self._checkpoints or self._consumer is None:
            return
        low = self._lowest_unacked()
        ready = None
        while self._checkpoints and (low is None or low > self._checkpoints[0][0]):
            ready = self._checkpoints.popleft()[1]
        if ready:
            t0 = time.perf_counter()
            offsets = [TopicPartition(self.topic, p, off) for p, off in ready.items()]
            self._consumer.commit(offsets=offsets, asynchronous=True)
            STAGE_LATENCY.labels(stage="behaviour_commit").observe(time.perf_counter() - t0)

    def _flush_processors(self) -> None:
        for proc in self.processors:
            flush = getattr(proc, "flush", None)
            if flush is not None:
                flush()

    def _commit(self) -> None:
        """Blocking (revoke and stop): flush every output, then commit the consumed positions."""
        if not self._positions or self._consumer is None:
            return
        self._flush_processors()
        positions = dict(self._positions)
        remaining = self.producer.flush(FLUSH_TIMEOUT_S)
        self._lowest_unacked()
        if self._delivery_errors:
            # A changelog record is lost: committing would make it permanent. Stop (the guard stops
            # the worker); a restart recovers the tables and replays from the last good commit.
            raise RuntimeError(f"{self._delivery_errors} outputs of the behaviour consumer were not delivered")
        if remaining:
            # Not acknowledged yet (a slow broker): keep the offsets uncommitted, try next round.
            log.warning(
                "behaviour: %d records unacknowledged after %.0fs; offsets not committed", remaining, FLUSH_TIMEOUT_S
            )
            return
        offsets = [TopicPartition(self.topic, p, off) for p, off in positions.items()]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:  # e.g. a rebalance in progress: the next round commits
            log.warning("behaviour: commit failed (%s); retrying next round", exc)
            return
        self._checkpoints.clear()  # all covered

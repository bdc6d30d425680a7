"""The catalog topic on its own thread: a librdkafka consumer and a private asyncio loop running the
catalog processor (streams.catalog_indexer), in batches of up to BATCH_MAX items.

The group is streams.naming.catalog_group: workers sharing a Qdrant server split the catalog; in
local mode each worker's index reads the whole catalog and resumes where that index stopped.
Offsets are stored once a batch is indexed and committed every COMMIT_INTERVAL_MS (at least once:
indexing is idempotent by item id, so a replayed batch changes nothing). While the topic is quiet
the processor's `idle` runs between polls (it notices a newly served item encoder).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from confluent_kafka import Consumer, Message, TopicPartition

from recstream.contracts.topics import CATALOG
from streams.consumer_threads import Consumed, ConsumerThread, consumer_config

log = logging.getLogger(__name__)

#: 256 items per batch: 4 Triton requests of 64 (the model's max batch), ~1 s of encoding on 2 cores.
BATCH_MAX = 256
#: How long a batch may wait to fill once its first item arrived (bulk work, not the online path).
BATCH_WITHIN_S = 0.2
#: How long poll() waits for a first item before the processor's idle check runs again.
POLL_S = 1.0
COMMIT_INTERVAL_MS = 1000


class CatalogLoop(ConsumerThread):
    """One thread: consume catalog operations, index them in batches, store offsets of what was indexed."""

    thread_name = "catalog"

    def __init__(self, ctx: Any, indexer: Any, group_id: str) -> None:
        """`indexer`: the catalog processor (`await process(decoded)`, `await idle()`)."""
        super().__init__()
        self.ctx = ctx
        self.indexer = indexer
        self.group_id = group_id
        self.topic = CATALOG.name(ctx.settings.topic_prefix)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        consumer = Consumer(
            consumer_config(
                self.ctx.settings,
                self.group_id,
                **{"enable.auto.commit": True, "auto.commit.interval.ms": COMMIT_INTERVAL_MS},
            )
        )
        consumer.subscribe([self.topic], on_assign=self._on_assign)
        try:
            while not self._stop.is_set():
                first = consumer.poll(POLL_S)
                if first is None:
                    loop.run_until_complete(self.indexer.idle())
                    continue
                msgs = [first, *consumer.consume(BATCH_MAX - 1, timeout=BATCH_WITHIN_S)]
                self._index(loop, consumer, msgs)
        finally:
            try:
                consumer.commit(asynchronous=False)
            except Exception as exc:  # nothing stored yet, or the broker is gone
                log.debug("catalog: final commit: %s", exc)
            consumer.close()
            loop.close()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("catalog: assigned partitions %s", sorted(tp.partition for tp in partitions))
        self.ready.set()

    def _index(self, loop: asyncio.AbstractEventLoop, consumer: Consumer, msgs: list[Message]) -> None:
        events = []
        for msg in msgs:
            if msg.error():
                log.warning("catalog consumer: %s", msg.error())
                continue
            events.append(Consumed(msg))
        decoded = self.ctx.decode_events(CATALOG, events)
        if decoded:
            loop.run_until_complete(self.indexer.process(decoded))
        last: dict[int, int] = {}
        for ev in events:
            last[ev.message.partition] = ev.message.offset
        consumer.store_offsets(offsets=[TopicPartition(self.topic, p, off + 1) for p, off in last.items()])

"""The catalog topic on its own thread, feeding the catalog processor (streams.catalog_indexer) in
batches of up to BATCH_MAX items (streams.consumer_threads.AsyncBatchLoop).

The group is streams.naming.catalog_group: workers sharing a Qdrant server split the catalog; in
local mode each worker's index reads the whole catalog and resumes where that index stopped.
Indexing is idempotent by item id, so a batch replayed after a crash changes nothing. While the
topic is quiet the processor's `idle` runs between polls (it notices a newly served item encoder).
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from recstream.contracts.topics import CATALOG
from streams.consumer_threads import AsyncBatchLoop, Consumed

log = logging.getLogger(__name__)

#: 256 items per batch: 4 Triton requests of 64 (the model's max batch), ~1 s of encoding on 2 cores.
BATCH_MAX = 256
#: How long a batch may wait to fill once its first item arrived (bulk work, not the online path).
BATCH_WITHIN_S = 0.2
#: How long poll() waits for a first item before the processor's idle check runs again.
POLL_S = 1.0


class CatalogLoop(AsyncBatchLoop):
    """One thread: consume catalog operations, index them in batches, store offsets of what was indexed."""

    thread_name = "catalog"
    batch_max = BATCH_MAX
    batch_wait_s = BATCH_WITHIN_S
    poll_s = POLL_S
    #: Indexing waits for Triton without bound (streams.catalog_indexer) and is idempotent by item id.
    abandon_on_stop = True

    def __init__(self, ctx: Any, indexer: Any, group_id: str) -> None:
        """`indexer`: the catalog processor (`await process(decoded)`, `await idle()`)."""
        super().__init__(ctx.settings, CATALOG.name(ctx.settings.topic_prefix), group_id)
        self.ctx = ctx
        self.indexer = indexer

    def outputs(self) -> Any:
        return self.ctx.producer  # dead letters of refused catalog operations

    def _join(self, consumer: Consumer) -> None:
        consumer.subscribe([self.topic], on_assign=self._on_assign)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("catalog: assigned partitions %s", sorted(tp.partition for tp in partitions))
        self.ready.set()

    async def _idle(self) -> None:
        await self.indexer.idle()

    async def _handle(self, events: list[Consumed]) -> None:
        decoded = self.ctx.decode_events(CATALOG, events)
        if decoded:
            await self.indexer.process(decoded)

"""Catalog upserts/deletes -> text embeddings on Triton -> Qdrant. Idempotent by item id.

Within a batch only the last operation per item counts (the catalog is keyed and ordered by
item_id), so a replay after a crash re-applies the same final state. Embedding needs Triton: if
it is unreachable the batch is retried with backoff rather than skipped, because an item indexed
without a vector would be invisible forever; recommendations keep flowing meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time

from recstream.contracts.events import ItemDelete, ItemUpsert
from recstream.contracts.topics import CATALOG
from recstream.metrics import INDEXED_ITEMS, STAGE_LATENCY
from streams.app import StreamContext, source_topic
from streams.inference import ModelUnavailable

log = logging.getLogger(__name__)

#: 256 items per batch: 4 Triton requests of 64 (the model's max batch), ~1 s of encoding on 2 cores.
BATCH_MAX = 256
BATCH_WITHIN_S = 0.2
#: Catalog batches are bulk work, not the online path: 30 s covers 256 texts on a contended CPU.
ENCODE_TIMEOUT_S = 30.0
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)


def payload_of(item: ItemUpsert) -> dict:
    """What Qdrant keeps next to the vector: the filterable fields plus what a result displays."""
    return {
        "item_id": item.item_id,
        "title": item.title,
        "category": item.category,
        "price": item.price,
        "in_stock": item.in_stock,
        "tags": list(item.tags),
        "updated_at": item.ts_ms,
    }


def register(ctx: StreamContext) -> None:
    @ctx.app.agent(source_topic(ctx, "catalog"), name="catalog-indexer")
    async def catalog_indexer(stream) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            t0 = time.perf_counter()
            latest: dict[str, ItemUpsert | ItemDelete] = {}
            for _, model in ctx.decode_events(CATALOG, events):
                latest[model.item_id] = model
            upserts = [m for m in latest.values() if isinstance(m, ItemUpsert)]
            deletes = [m.item_id for m in latest.values() if isinstance(m, ItemDelete)]
            if upserts:
                vectors = await _encode_with_retry(ctx, upserts)
                await ctx.in_thread(ctx.store.upsert, [payload_of(m) for m in upserts], vectors)
            if deletes:
                await ctx.in_thread(ctx.store.delete, deletes)
            lookup = ctx.tables.get("_item_lookup")
            if lookup is not None:
                lookup.invalidate([m.item_id for m in upserts] + deletes)
            STAGE_LATENCY.labels(stage="catalog_batch").observe(time.perf_counter() - t0)
            count = ctx.store.count()
            INDEXED_ITEMS.set(count)
            log.info("catalog: %d upserts, %d deletes indexed (%d items in store)", len(upserts), len(deletes), count)


async def _encode_with_retry(ctx: StreamContext, upserts: list[ItemUpsert]):
    """Item vectors from the item encoder (text + learned ID residual for items it was trained on,
    text alone for new ones), or the text encoder where no trained item encoder is served."""
    embedder = ctx.item_embedder
    texts = [m.text() for m in upserts]
    ids = [m.item_id for m in upserts] if embedder is not ctx.embedder else None
    attempt = 0
    while True:
        try:
            return await ctx.in_thread(embedder.encode, texts, ENCODE_TIMEOUT_S, False, ids)
        except ModelUnavailable as exc:
            delay = RETRY_BACKOFF_S[min(attempt, len(RETRY_BACKOFF_S) - 1)]
            log.warning("catalog: encoder unavailable (%s); retrying %d texts in %.1f s", exc, len(texts), delay)
            attempt += 1
            await asyncio.sleep(delay)

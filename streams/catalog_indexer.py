"""Catalog upserts/deletes -> text embeddings on Triton -> Qdrant. Idempotent by item id.

Within a batch only the last operation per item counts (the catalog is keyed and ordered by
item_id), so a replay after a crash re-applies the same final state. Embedding needs Triton: if
it is unreachable (or refuses the batch) the batch is retried with backoff rather than skipped,
because an item indexed without a vector would be invisible forever; recommendations keep flowing
meanwhile, and a stop does not wait for Triton (streams.catalog abandons the batch; a restart
indexes it again).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np

from recstream.client.consumer import committed_offsets, read_to_end
from recstream.contracts.events import ItemDelete, ItemUpsert
from recstream.contracts.models import SESSION_ENCODER
from recstream.telemetry import INDEXED_ITEMS, REEMBEDS, STAGE_LATENCY
from streams.context import StreamContext
from streams.inference import ModelRefused, ModelUnavailable, matching_session_version
from streams.naming import catalog_group

log = logging.getLogger(__name__)

#: Items per encoder call of a re-embed: 4 Triton requests of 64 (the model's max batch).
ENCODE_CHUNK = 256

#: Catalog batches are bulk work, not the online path: 30 s covers 256 texts on a contended CPU.
ENCODE_TIMEOUT_S = 30.0
RETRY_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
#: How often a quiet catalog agent asks Triton which item-encoder version it serves.
REEMBED_CHECK_S = 10.0
#: Reading the compacted catalog topic for a re-embed: minutes for millions of items.
REEMBED_READ_TIMEOUT_S = 600.0


def payload_of(item: ItemUpsert) -> dict:
    """What Qdrant keeps next to the vector: the filterable fields plus what a result displays."""
    return {
        "item_id": item.item_id,
        "title": item.title,
        "category": item.category,
        "price": item.price,
        "in_stock": item.in_stock,
        "tags": list(item.tags),
        "description": item.description,
        "updated_at": item.ts_ms,
    }


class CatalogIndexer:
    """The catalog processor: the catalog consumer (streams.catalog) hands it each batch, and calls
    `idle` while the topic is quiet so that a newly served item encoder is still noticed."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.follow = EncoderFollower(ctx)

    async def idle(self) -> None:
        await self.follow.check()

    async def process(self, decoded: list[tuple[Any, Any]]) -> None:
        ctx = self.ctx
        await self.follow.check()  # a new item-encoder version re-embeds the catalog before this batch
        t0 = time.perf_counter()
        latest = _last_per_item(model for _, model in decoded)
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


def _last_per_item(operations: Iterable[Any]) -> dict[str, ItemUpsert | ItemDelete]:
    """Only the last operation per item counts: the catalog is keyed and ordered by item_id (one
    item's operations share a partition, in order), so replaying them gives the same final state."""
    return {op.item_id: op for op in operations}


class EncoderFollower:
    """Keeps the vector store on the item encoder Triton serves: when a newer version goes live,
    the whole catalog (the compacted catalog topic read to its end) is embedded with it into a new
    collection, which replaces the old one in one step (VectorStore.rebuild). Checked before each
    catalog batch and every REEMBED_CHECK_S when the catalog is quiet; the agent writes nothing
    while a rebuild runs, and requests read the old vectors until the switch."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.lock = asyncio.Lock()
        self.checked_at = -float("inf")
        self.waiting_for: str | None = None  # a served item encoder whose session encoder is not loaded

    async def check(self) -> None:
        if time.monotonic() - self.checked_at < REEMBED_CHECK_S:
            return
        async with self.lock:
            self.checked_at = time.monotonic()
            ctx = self.ctx
            tag = await ctx.in_thread(ctx.item_embedder.served_tag)
            store = ctx.store
            if not tag or tag == store.tag:
                return
            # the handle may be opened here, which asks Triton: off the event loop
            session, wanted = await ctx.in_thread(lambda: ctx.session_encoder), matching_session_version(tag)
            if session is not None and wanted is not None and not await ctx.in_thread(session.ready, wanted):
                # Requests pin the session encoder to the item vectors' version: switching before
                # it is loaded would fail every session encode (all answers degraded) until it is.
                if self.waiting_for != tag:
                    log.warning("catalog: %s served, %s v%s not yet: re-embedding waits", tag, SESSION_ENCODER, wanted)
                    self.waiting_for = tag
                return
            self.waiting_for = None
            t0 = time.perf_counter()
            if store.count() == 0 and not await ctx.in_thread(_catalog_consumed_before, ctx.settings):
                # a first start: the catalog consumer indexes the topic from its beginning anyway
                await ctx.in_thread(store.rebuild, tag, [], np.zeros((0, store.dim), np.float32))
                return
            log.warning("catalog: item vectors are %r, Triton serves %r: re-embedding the catalog", store.tag, tag)
            events, invalid = await ctx.in_thread(read_to_end, ctx.settings, "catalog", REEMBED_READ_TIMEOUT_S)
            upserts = [m for m in _last_per_item(events).values() if isinstance(m, ItemUpsert)]
            chunks = [
                await _encode_with_retry(ctx, upserts[lo : lo + ENCODE_CHUNK])
                for lo in range(0, len(upserts), ENCODE_CHUNK)
            ]
            vectors = np.concatenate(chunks) if chunks else np.zeros((0, store.dim), np.float32)
            await ctx.in_thread(store.rebuild, tag, [payload_of(m) for m in upserts], vectors)
            lookup = ctx.tables.get("_item_lookup")
            if lookup is not None:
                lookup.invalidate(list(lookup.cache))
            REEMBEDS.inc()
            INDEXED_ITEMS.set(store.count())
            log.warning(
                "catalog: %d items re-embedded with %s in %.1f s (%d invalid catalog messages skipped)",
                len(upserts),
                tag,
                time.perf_counter() - t0,
                invalid,
            )


def _catalog_consumed_before(settings: Any) -> bool:
    """Whether this index's catalog group has committed offsets: then an empty store lost its items
    (a wiped folder, a fresh Qdrant server behind QDRANT_URL) and the consumer will not read them
    again, so the whole catalog is re-read (an empty rebuild kept them missing for good)."""
    try:
        return any(committed_offsets(settings, "catalog", catalog_group(settings)).values())
    except Exception as exc:  # Kafka not reachable: re-read, the safe side
        log.warning("catalog: committed offsets unknown (%s); re-reading the catalog", exc)
        return True


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
            if isinstance(exc, ModelRefused):  # nothing is skipped: an operator fixes the model or worker
                log.error(
                    "catalog: Triton refuses to encode (%s): do the worker and the served model agree on the inputs? "
                    "Retrying %d texts in %.1f s",
                    exc,
                    len(texts),
                    delay,
                )
            else:
                log.warning("catalog: encoder unavailable (%s); retrying %d texts in %.1f s", exc, len(texts), delay)
            attempt += 1
            await asyncio.sleep(delay)

"""Behaviour events -> the `sessions` table (user_id -> SessionState bytes).

Batches with stream.take_events for throughput: per batch each touched user is decoded once,
folded over their events in offset order (recstream.recommend.session.apply_event, which skips
offsets it has already applied, so at-least-once replays after a crash change nothing), and
written once, with its changelog record sent to the partition the user's events came from.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from recstream.contracts.topics import BEHAVIOUR
from recstream.metrics import FEATURE_EVENTS, FEATURE_FRESHNESS, STAGE_LATENCY
from recstream.recommend.session import SessionState, apply_event
from streams.app import RAW_SCHEMA, StreamContext, source_topic

log = logging.getLogger(__name__)

TABLE = "sessions"
#: Up to 5,000 events or 20 ms per batch: big enough to amortise per-batch costs at 20k events/s,
#: short enough to stay well inside the 100 ms freshness target.
BATCH_MAX = 5000
BATCH_WITHIN_S = 0.02


def declare_table(ctx: StreamContext):
    if TABLE not in ctx.tables:
        ctx.tables[TABLE] = ctx.app.Table(
            TABLE, default=None, partitions=BEHAVIOUR.partitions, schema=RAW_SCHEMA,
            key_type=bytes, value_type=bytes,
        )
        ctx.tables["_session_cache"] = {}
    return ctx.tables[TABLE]


def read_session(ctx: StreamContext, user_id: str) -> SessionState | None:
    """The current state of one user (decoded once per stored version, then cached)."""
    table = ctx.tables[TABLE]
    key = user_id.encode()
    raw = table.data.get(key)
    if raw is None:
        return None
    cache: dict[bytes, tuple[bytes, SessionState]] = ctx.tables["_session_cache"]
    hit = cache.get(key)
    if hit is not None and hit[0] is raw:
        return hit[1]
    state = SessionState.from_bytes(raw)
    cache[key] = (raw, state)
    return state


class ItemLookup:
    """item_id -> (vector, category) from the vector store, cached; refreshed on catalog changes."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.cache: dict[str, tuple[np.ndarray | None, str | None]] = {}
        # Interactions per item seen by this process (a ranker feature). In memory only: after a
        # restart it re-grows from new events; exactness is not worth a changelog write per item.
        self.popularity: dict[str, int] = {}
        self.max_popularity = 1

    def invalidate(self, item_ids: list[str]) -> None:
        for i in item_ids:
            self.cache.pop(i, None)

    def get_many(self, item_ids: set[str]) -> dict[str, tuple[np.ndarray | None, str | None]]:
        missing = [i for i in item_ids if i not in self.cache]
        if missing:
            hits = self.ctx.store.retrieve(missing)
            for i in missing:
                h = hits.get(i)
                # Unknown items are not cached: the catalog may index them a moment later.
                if h is not None:
                    self.cache[i] = (h.vector, h.payload.get("category"))
        return {i: self.cache.get(i, (None, None)) for i in item_ids}


def register(ctx: StreamContext) -> None:
    table = declare_table(ctx)
    cache: dict[bytes, tuple[bytes, SessionState]] = ctx.tables["_session_cache"]
    items = ItemLookup(ctx)
    ctx.tables["_item_lookup"] = items

    @ctx.app.agent(source_topic(ctx, "behaviour"), name="session-features")
    async def session_features(stream) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            t0 = time.perf_counter()
            decoded = ctx.decode_events(BEHAVIOUR, events)
            lookup = items.get_many({m.item_id for _, m in decoded})
            touched: dict[bytes, tuple[int, SessionState]] = {}
            applied = skipped = 0
            for ev, m in decoded:
                key = m.user_id.encode()
                entry = touched.get(key)
                if entry is None:
                    raw = table.data.get(key)
                    hit = cache.get(key)
                    state = hit[1] if hit is not None and hit[0] is raw else SessionState.from_bytes(raw)
                    entry = touched[key] = (ev.message.partition, state)
                vec, category = lookup[m.item_id]
                try:
                    ok = apply_event(
                        entry[1], offset=ev.message.offset, event_type=m.type.value, item_id=m.item_id,
                        ts_ms=m.ts_ms, item_vec=vec, item_category=category,
                    )
                except Exception as exc:  # a bug must not kill the worker: keep the event, move on
                    log.exception("feature update failed at %s[%d]@%d", ev.message.topic,
                                  ev.message.partition, ev.message.offset)
                    ctx.dead_letter(ev, repr(exc), "processing")
                    continue
                applied += ok
                skipped += not ok
                if ok and m.type.value != "impression":
                    count = items.popularity.get(m.item_id, 0) + 1
                    items.popularity[m.item_id] = count
                    items.max_popularity = max(items.max_popularity, count)
            for key, (partition, state) in touched.items():
                raw = state.to_bytes()
                # Written through .data plus an explicit changelog send: faust would otherwise pick
                # the partition of whatever event was current, which in a batch may be another one.
                table.data[key] = raw
                table.send_changelog(partition, key, raw, key_serializer="raw", value_serializer="raw")
                cache[key] = (raw, state)
            now = time.time()
            for ev in events:
                FEATURE_FRESHNESS.observe(max(0.0, now - ev.message.timestamp))
            FEATURE_EVENTS.labels(result="applied").inc(applied)
            FEATURE_EVENTS.labels(result="skipped_replay").inc(skipped)
            STAGE_LATENCY.labels(stage="features_batch").observe(time.perf_counter() - t0)

"""Behaviour events -> the `sessions` table (user_id -> SessionState bytes) and item popularity.

Fed in batches by streams.behaviour (one librdkafka consumer on its own thread): per batch each touched
user is decoded once, folded over their events in offset order (recstream.recommend.session.apply_event,
which skips offsets it has already applied, so at-least-once replays after a crash change nothing),
and written once, with its changelog record sent to the partition the user's events came from.

Popularity (interactions per item, a ranker feature) is counted from the same applied events and
kept in its own changelog table, one row per (source partition, item): a restart or a rebalance
recovers the counts of its partitions instead of starting every item at 0. Its rows are written at
each `flush` (before every offset checkpoint, about once a second), not per batch: at full speed a
batch touches nearly as many items as events, and per-batch rows cost ~20 % of the worker's CPU
per event. Offsets are never committed ahead of the rows; a kill -9 between the rows and the
session writes of the same second can lose or double that second's counts, never more.
"""

from __future__ import annotations

import contextlib
import logging
import time

from recstream.contracts.partitioning import partition_for
from recstream.contracts.topics import BEHAVIOUR
from recstream.recommend.session import SessionState, apply_event, is_first_touch
from recstream.recommend.trending import TREND_DAYS, day_of
from recstream.telemetry import FEATURE_EVENTS, FEATURE_FRESHNESS, STAGE_LATENCY
from streams.context import StreamContext
from streams.state import ItemLookup, declare_popularity, declare_table, popularity_key, trend_key, trend_row

log = logging.getLogger(__name__)

#: Decoded sessions kept beside the table's bytes (a decode costs more than a fold). Past this, the
#: oldest-cached entries go down to half of it: without a bound every user ever seen stayed decoded.
SESSION_CACHE_MAX = 100_000


class SessionFeatures:
    """The features processor of the behaviour consumer: folds each batch into the sessions table."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.table = declare_table(ctx)
        self.popularity_table = declare_popularity(ctx)
        self.tables = [self.table, self.popularity_table]
        self.cache: dict[bytes, tuple[bytes, SessionState]] = ctx.tables["_session_cache"]
        self.items = ItemLookup(ctx)
        ctx.tables["_item_lookup"] = self.items
        self.unwritten: dict[tuple[int, str], int] = {}  # (partition, item) -> counts not yet in the table
        self.unwritten_trend: dict[tuple[int, int, str], int] = {}  # (partition, day, item) -> counts
        # Event-time UTC day of the newest event folded, and the day before which trend rows are
        # gone: a request near the newest events reads only the TREND_DAYS days before its own.
        self.newest_day: int | None = None
        self.trend_cutoff: int | None = None

    def recovered(self) -> None:
        self.cache.clear()
        self.flush()
        self.items.rebuild_popularity(self.popularity_table)
        latest_day = day_of(time.time()) + 1
        days = [d for per_day in self.items.trend.values() for d in per_day if d <= latest_day]
        if days and (self.newest_day is None or max(days) > self.newest_day):
            self.newest_day = max(days)
        self.prune_trend()

    def revoked(self, partitions: list[int]) -> None:
        """Counts and sessions of partitions another worker now owns are that worker's (it recovers
        them; so does this one if they come back); the rows were flushed by the commit that precedes
        this call. Sessions were kept before: a worker that once held every partition kept every
        user's session in memory for good."""
        prefixes = tuple(f"{p}{sep}".encode() for p in partitions for sep in "/#")
        data = self.popularity_table.data
        for key in [k for k in data if k.startswith(prefixes)]:
            del data[key]
        self.items.rebuild_popularity(self.popularity_table)
        gone = set(partitions)
        sessions = self.table.data  # keyed by user id, partitioned by it (the topic's own rule)
        for key in [k for k in sessions if partition_for(k, BEHAVIOUR.partitions) in gone]:
            del sessions[key]
            self.cache.pop(key, None)

    def flush(self) -> None:
        """Write the popularity and trend rows counted since the last flush."""
        rows = self.popularity_table
        counted = [(p, popularity_key(p, item), n) for (p, item), n in self.unwritten.items()]
        counted += [(p, trend_key(p, day, item), n) for (p, day, item), n in self.unwritten_trend.items()]
        for partition, key, n in counted:
            rows.put(partition, key, str(int(rows.data.get(key, b"0")) + n).encode())
        self.unwritten.clear()
        self.unwritten_trend.clear()
        self.prune_trend()

    def prune_trend(self) -> None:
        """Delete the trend rows of days more than TREND_DAYS + 1 before the newest event's day,
        which no request near the newest events reads: a row per item and day was kept forever,
        and recovery (which reads every row at each start and rebalance) grew with the worker's
        age. Runs when the newest day moves on (event time, so a replay of old data prunes too)."""
        if self.newest_day is None:
            return
        cutoff = self.newest_day - TREND_DAYS - 1
        if self.trend_cutoff is not None and cutoff <= self.trend_cutoff:
            return
        self.trend_cutoff = cutoff
        rows = self.popularity_table
        for key in list(rows.data):
            row = trend_row(key)
            if row is not None and row[1] < cutoff:
                rows.delete(row[0], key)
        trend = self.items.trend  # request threads only .get from it
        for item_id, per_day in list(trend.items()):
            for day in [d for d in per_day if d < cutoff]:
                del per_day[day]
            if not per_day:
                del trend[item_id]

    def tick(self) -> None:
        pass

    def process(self, batch) -> None:
        t0 = time.perf_counter()
        table, cache, items = self.table, self.cache, self.items
        data = table.data
        lookup = items.get_many({r.event.item_id for r in batch})
        popularity = items.popularity
        touched: dict[bytes, tuple[int, SessionState]] = {}
        unwritten, unwritten_trend, trend = self.unwritten, self.unwritten_trend, items.trend
        latest_day = day_of(time.time()) + 1  # what a client's clock may run ahead by, at most
        applied = skipped = 0
        for rec in batch:
            m = rec.event
            key = m.user_id.encode()
            entry = touched.get(key)
            if entry is None:
                raw = data.get(key)
                hit = cache.get(key)
                # Requests read the cached state on their own thread: fold into a private copy and
                # publish it with the new bytes, never mutate what a reader may hold.
                state = hit[1].copy() if hit is not None and hit[0] is raw else SessionState.from_bytes(raw)
                entry = touched[key] = (rec.partition, state)
            vec, category = lookup[m.item_id]
            event_type = m.type.value
            # Popularity counts users, not events: a rating replayed as view + click + purchase, or
            # a user clicking one item ten times, is one interaction (as in training data).
            first_touch = is_first_touch(entry[1], m.item_id)
            try:
                ok = apply_event(
                    entry[1],
                    offset=rec.offset,
                    event_type=event_type,
                    item_id=m.item_id,
                    ts_ms=m.ts_ms,
                    item_vec=vec,
                    item_category=category,
                )
            except Exception as exc:  # a bug must not kill the worker: keep the event, move on
                log.exception(
                    "feature update failed at %s[%d]@%d",
                    BEHAVIOUR.name(self.ctx.settings.topic_prefix),
                    rec.partition,
                    rec.offset,
                )
                self.ctx.behaviour.dead_letter(rec.msg, repr(exc), "processing")
                continue
            if ok:
                applied += 1
                if event_type != "impression" and first_touch:
                    count = popularity.get(m.item_id, 0) + 1
                    popularity[m.item_id] = count
                    if count > items.max_popularity:
                        items.max_popularity = count
                    slot = (rec.partition, m.item_id)
                    unwritten[slot] = unwritten.get(slot, 0) + 1
                    day = day_of(m.ts_ms / 1000)
                    if (self.newest_day is None or day > self.newest_day) and day <= latest_day:
                        self.newest_day = day  # never from a future-dated event: it would prune real days
                    if self.trend_cutoff is None or day >= self.trend_cutoff:  # else: too late to trend
                        per_day = trend.setdefault(m.item_id, {})
                        per_day[day] = per_day.get(day, 0) + 1
                        tslot = (rec.partition, day, m.item_id)
                        unwritten_trend[tslot] = unwritten_trend.get(tslot, 0) + 1
            else:
                skipped += 1
        for key, (partition, state) in touched.items():
            raw = state.to_bytes()
            # Cache first: a reader that finds the new bytes also finds their decoded state.
            cache[key] = (raw, state)
            table.put(partition, key, raw)
        if len(cache) > SESSION_CACHE_MAX:  # a dropped entry is decoded again when next read
            with contextlib.suppress(RuntimeError):  # a request thread cached one meanwhile: next batch
                for key in list(cache)[: len(cache) - SESSION_CACHE_MAX // 2]:
                    cache.pop(key, None)
        vectors = getattr(self.ctx, "_session_vectors", None)
        if vectors is not None:  # their session vectors are now stale: re-encode those of active users
            vectors.changed([k.decode() for k in touched])
        now = time.time()
        for rec in batch:
            FEATURE_FRESHNESS.observe(max(0.0, now - rec.ts_s))
        FEATURE_EVENTS.labels(result="applied").inc(applied)
        FEATURE_EVENTS.labels(result="skipped_replay").inc(skipped)
        STAGE_LATENCY.labels(stage="features_batch").observe(time.perf_counter() - t0)

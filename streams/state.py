"""The stream state the processors share: the `sessions` table (user_id -> SessionState bytes), the
item popularity and trend table, and the item lookup the recommender and the features read.

The features processor (streams.session_features) writes them; the recommender, the feedback joiner
and the session vectors read them. Both tables are changelog-backed and co-partitioned with
behaviour and requests by user_id.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np

from recstream.contracts.topics import BEHAVIOUR
from recstream.recommend.feedback import SearchQueries
from recstream.recommend.session import SessionState
from recstream.recommend.trending import trend_days
from streams.changelog import ChangelogTable, changelog_topic
from streams.naming import app_id

if TYPE_CHECKING:  # the context builds handles that read this state: a runtime import would circle
    from streams.context import StreamContext

log = logging.getLogger(__name__)

TABLE = "sessions"
POPULARITY_TABLE = "item-popularity"


#: In memory only: request id -> query of the searches this worker answered, until their impressions
#: arrive (the recommender writes it, the feedback joiner reads it; see SearchQueries for why).
SEARCH_QUERIES = "search-queries"


def declare_search_queries(ctx: StreamContext) -> SearchQueries:
    if SEARCH_QUERIES not in ctx.tables:
        ctx.tables[SEARCH_QUERIES] = SearchQueries()
    return ctx.tables[SEARCH_QUERIES]


def search_queries(ctx: StreamContext) -> SearchQueries:
    """The search-queries table (declared before any processor is built: streams.registry)."""
    return ctx.tables[SEARCH_QUERIES]


def declare_table(ctx: StreamContext) -> ChangelogTable:
    if TABLE not in ctx.tables:
        topic = changelog_topic(app_id(ctx.settings), TABLE)
        ctx.tables[TABLE] = ChangelogTable(TABLE, topic, BEHAVIOUR.partitions)
        ctx.tables["_session_cache"] = {}
    return ctx.tables[TABLE]


def declare_popularity(ctx: StreamContext) -> ChangelogTable:
    """b"<partition>/<item_id>" -> interactions with the item in that partition (ascii int)."""
    if POPULARITY_TABLE not in ctx.tables:
        topic = changelog_topic(app_id(ctx.settings), POPULARITY_TABLE)
        ctx.tables[POPULARITY_TABLE] = ChangelogTable(POPULARITY_TABLE, topic, BEHAVIOUR.partitions)
    return ctx.tables[POPULARITY_TABLE]


def popularity_key(partition: int, item_id: str) -> bytes:
    return f"{partition}/{item_id}".encode()


def trend_key(partition: int, day: int, item_id: str) -> bytes:
    """Row of one item's interactions on one UTC day (event time), for the trending feature."""
    return f"{partition}#{day}/{item_id}".encode()


def trend_row(key: bytes) -> tuple[int, int, str] | None:
    """(partition, day, item) of a `trend_key` row; None for any other key."""
    head, sep, item_id = key.decode().partition("/")
    partition, hash_, day = head.partition("#")
    if not (sep and hash_ and partition.isdigit() and day.lstrip("-").isdigit()):
        return None
    return int(partition), int(day), item_id


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
        # Bumped by every invalidation (the catalog thread): a store read that began before one
        # may hold the old vector, so it answers its caller but is not cached.
        self.generation = 0
        # The store's tag (which encoder made its vectors) the cache was filled under: a re-embed
        # changes it, and a session encoded from old-space vectors under the new tag would be
        # served as the new version's until the user acted again.
        self._tag: str | None = None
        # Interactions per item in this process's partitions (a ranker feature), summed over the
        # rows of the popularity table; rebuilt from it after every recovery.
        self.popularity: dict[str, int] = {}
        self.max_popularity = 1
        # item_id -> {UTC day of the event: interactions}, for the trending feature.
        self.trend: dict[str, dict[int, int]] = {}

    def rebuild_popularity(self, table: ChangelogTable) -> None:
        totals: dict[str, int] = {}
        trend: dict[str, dict[int, int]] = {}
        for key, value in table.data.items():
            head, sep, item_id = key.decode().partition("/")
            if not sep or not value.isdigit():  # anything else is not a row this version wrote
                continue
            if "#" not in head:
                totals[item_id] = totals.get(item_id, 0) + int(value)
            elif (row := trend_row(key)) is not None:
                days = trend.setdefault(item_id, {})
                days[row[1]] = days.get(row[1], 0) + int(value)
        # New dicts, swapped in whole: request threads only ever `.get` from whichever they hold.
        self.popularity = totals
        self.trend = trend
        self.max_popularity = max(totals.values(), default=1)

    def trending(self, item_ids: list[str], now_s: float) -> list[int]:
        """Interactions per item on the days `trend_days(now_s)` (the ranker's trending feature)."""
        days = trend_days(now_s)
        out = []
        for item_id in item_ids:
            per_day = self.trend.get(item_id)
            out.append(sum(per_day.get(d, 0) for d in days) if per_day else 0)
        return out

    def invalidate(self, item_ids: list[str]) -> None:
        self.generation += 1  # before the pops: a read racing them must not cache what it read
        for i in item_ids:
            self.cache.pop(i, None)

    def get_many(self, item_ids: set[str]) -> dict[str, tuple[np.ndarray | None, str | None]]:
        tag = getattr(self.ctx.store, "tag", None)
        if tag != self._tag:  # the catalogue was re-embedded: every cached vector is of the old space
            self.generation += 1
            self.cache.clear()
            self._tag = tag
        missing = [i for i in item_ids if i not in self.cache]
        read: dict[str, tuple[np.ndarray | None, str | None]] = {}
        if missing:
            generation = self.generation
            hits = self.ctx.store.retrieve(missing)
            # Unknown items are not cached: the catalog may index them a moment later.
            read = {i: (h.vector, h.payload.get("category")) for i in missing if (h := hits.get(i)) is not None}
            if generation == self.generation:
                self.cache.update(read)
        return {i: read.get(i) or self.cache.get(i, (None, None)) for i in item_ids}

"""What "trending" means, once, for the ranker's training lists and for serving.

An item's trending count for a request is its interactions on the TREND_DAYS whole UTC days before
the request's own day (event time). Whole days make the count a sum of per-day rows that a stream
worker can keep in a changelog table; "before the request's day" means a request never counts
itself, nor anything after it.
"""

from __future__ import annotations

DAY_S = 86400
TREND_DAYS = 7


def trend_days(now_s: float) -> range:
    """UTC day numbers (unix seconds // DAY_S) that count as trending for a request at `now_s`."""
    today = int(now_s // DAY_S)
    return range(today - TREND_DAYS, today)


def day_of(ts_s: float) -> int:
    """The UTC day number of an event at unix time `ts_s` (what per-day trend rows are keyed by)."""
    return int(ts_s // DAY_S)

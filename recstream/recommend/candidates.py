"""Which items may be shown for one request: business filters plus what the session rules out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from recstream.contracts.events import RecommendationRequest
from recstream.recommend.session import MAX_SEEN, SessionState

#: How many of the most recently seen items a 'recommend' request hides (search shows them): all
#: the session remembers, as offline evaluation excludes the whole history.
RECOMMEND_HIDE_SEEN = MAX_SEEN


@dataclass(frozen=True)
class CandidateFilter:
    """A store-independent filter; the vector store translates it to its own query language."""

    in_stock_only: bool = True
    exclude_ids: frozenset[str] = field(default_factory=frozenset)
    categories: tuple[str, ...] | None = None
    exclude_categories: tuple[str, ...] = ()
    max_price: float | None = None

    def allows(self, item_id: str, payload: dict) -> bool:
        """The same rule in Python, for tests and for re-checking results from any store."""
        if item_id in self.exclude_ids:
            return False
        if self.in_stock_only and not payload.get("in_stock", True):
            return False
        category = payload.get("category")
        if self.categories is not None and category not in self.categories:
            return False
        if category in self.exclude_categories:
            return False
        if self.max_price is not None:
            price = payload.get("price")
            if price is None or price > self.max_price:
                return False
        return True

    def allows_rows(self, columns: FilterColumns) -> np.ndarray:
        """`allows` for every row of a catalogue snapshot at once (a boolean mask)."""
        ok = columns.in_stock.copy() if self.in_stock_only else np.ones(len(columns.in_stock), dtype=bool)
        if self.categories is not None:
            ok &= np.isin(columns.category, list(self.categories))
        if self.exclude_categories:
            ok &= ~np.isin(columns.category, list(self.exclude_categories))
        if self.max_price is not None:
            ok &= columns.price <= self.max_price  # no price (NaN) is refused, as in `allows`
        ok[[columns.row_of[i] for i in self.exclude_ids if i in columns.row_of]] = False
        return ok


@dataclass(frozen=True)
class FilterColumns:
    """A catalogue snapshot's filterable payload fields as arrays (row r is item_ids[r]), so that
    one request's filter is applied to the whole snapshot in a few vector operations: BM25's best
    items must be taken among those the request allows, not filtered after the cut."""

    row_of: dict[str, int]
    category: np.ndarray  # object: str or None
    price: np.ndarray  # float, NaN where the item has none
    in_stock: np.ndarray  # bool

    @classmethod
    def of(cls, item_ids: Sequence[str], payloads: Sequence[dict]) -> FilterColumns:
        if len(item_ids) != len(payloads):
            raise ValueError("item_ids and payloads must cover the same items")
        category = np.empty(len(payloads), dtype=object)
        category[:] = [p.get("category") for p in payloads]
        price = np.array([np.nan if p.get("price") is None else float(p["price"]) for p in payloads], np.float64)
        in_stock = np.array([bool(p.get("in_stock", True)) for p in payloads], dtype=bool)
        return cls({i: n for n, i in enumerate(item_ids)}, category, price, in_stock)


def build_filter(request: RecommendationRequest, session: SessionState | None) -> CandidateFilter:
    """Request filters + never re-recommend purchases; 'recommend' also hides recently seen items."""
    f = request.filters
    exclude = set(f.exclude_items)
    if session is not None:
        exclude.update(session.purchased)
        if request.kind == "recommend":
            exclude.update(list(session.seen)[-RECOMMEND_HIDE_SEEN:])
    return CandidateFilter(
        in_stock_only=f.in_stock_only,
        exclude_ids=frozenset(exclude),
        categories=tuple(f.categories) if f.categories is not None else None,
        exclude_categories=tuple(f.exclude_categories),
        max_price=f.max_price,
    )

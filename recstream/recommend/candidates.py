"""Which items may be shown for one request: business filters plus what the session rules out."""

from __future__ import annotations

from dataclasses import dataclass, field

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

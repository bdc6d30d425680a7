"""The served search's catalogue snapshot: recstream.search.served.HybridSearch over what the vector
store holds now, with the fusion weights the served text_encoder version ships.

Rebuilt when this worker wrote to the store (VectorStore.revision) and at least every REFRESH_S
seconds (popularity moves with every interaction; in server mode other processes may write).
Without weights in the text_encoder config (a repository with the zero-shot encoder only) there is
no hybrid search and searches go through the ranker as recommendations do.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from recstream.contracts.events import item_text
from recstream.search.served import HybridSearch, SearchWeights

log = logging.getLogger(__name__)

REFRESH_S = 30.0


def payload_text(payload: dict[str, Any]) -> str:
    """An indexed item's text from its stored payload (ItemUpsert.text() of the upsert)."""
    return item_text(
        str(payload.get("title", "")), payload.get("category"), payload.get("tags") or (), payload.get("description")
    )


class LiveHybridSearch:
    """The current HybridSearch of one worker (built lazily on the request path)."""

    def __init__(self, ctx: Any, weights: SearchWeights, version: str) -> None:
        self.ctx = ctx
        self.weights = weights
        self.version = version
        self._search: HybridSearch | None = None
        self._revision = -1
        self._built = 0.0
        self._lock = threading.Lock()

    def current(self) -> HybridSearch | None:
        store = self.ctx.store
        now = time.monotonic()
        with self._lock:
            if self._search is None or store.revision != self._revision or now - self._built > REFRESH_S:
                t0 = time.perf_counter()
                revision = store.revision
                hits = [h for h in store.snapshot() if h.vector is not None]
                if not hits:
                    return None
                lookup = self.ctx.tables.get("_item_lookup")
                popularity = lookup.popularity if lookup is not None else {}
                self._search = HybridSearch(
                    [h.item_id for h in hits],
                    np.stack([h.vector for h in hits]),
                    [payload_text(h.payload) for h in hits],
                    np.array([float(popularity.get(h.item_id, 0)) for h in hits]),
                    self.weights,
                )
                self._revision, self._built = revision, now
                log.info("hybrid search over %d items rebuilt in %.0f ms", len(hits), (time.perf_counter() - t0) * 1000)
            return self._search

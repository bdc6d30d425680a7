"""The served search's catalogue snapshot: recstream.search.served.HybridSearch over what the vector
store holds now, with the fusion weights the served text_encoder version ships.

Rebuilt when this worker wrote to the store (VectorStore.revision; at most every MIN_REBUILD_GAP_S)
and at least every REFRESH_S seconds (popularity moves with every interaction; in server mode
other processes may write). A rebuild costs ~30-40 ms for 1,700 items, on the request path.
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
#: A catalogue write triggers a rebuild at most this often (a steady upsert stream must not make
#: every search pay for one).
MIN_REBUILD_GAP_S = 2.0
#: After a failed rebuild (the store unreachable, say), the previous snapshot serves this long.
RETRY_S = 10.0


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
        self._retry_at = 0.0
        self._lock = threading.Lock()

    def current(self) -> HybridSearch | None:
        """The snapshot to answer with; None (searches go through the ranker) while there is none.
        A rebuild that fails keeps the previous snapshot and is retried after RETRY_S: it must never
        fail the batch, whose recommendations do not need it."""
        store = self.ctx.store
        now = time.monotonic()
        with self._lock:
            age = now - self._built
            stale = self._search is None or age > REFRESH_S
            changed = store.revision != self._revision and age > MIN_REBUILD_GAP_S
            if (stale or changed) and now >= self._retry_at:
                try:
                    self._rebuild(store, now)
                except Exception:
                    self._retry_at = now + RETRY_S
                    log.exception("hybrid search rebuild failed; answering from the previous snapshot")
            return self._search

    def _rebuild(self, store: Any, now: float) -> None:
        t0 = time.perf_counter()
        revision = store.revision
        hits = [h for h in store.snapshot() if h.vector is not None]
        if not hits:
            self._search = None
            self._revision, self._built = revision, now
            return
        lookup = self.ctx.tables.get("_item_lookup")
        popularity = lookup.popularity if lookup is not None else {}
        search = HybridSearch(
            [h.item_id for h in hits],
            np.stack([h.vector for h in hits]),
            [payload_text(h.payload) for h in hits],
            np.array([float(popularity.get(h.item_id, 0)) for h in hits]),
            self.weights,
            [h.payload for h in hits],
        )
        # Marked built only once it is: a failed build is retried after RETRY_S, not REFRESH_S.
        self._search, self._revision, self._built = search, revision, now
        log.info("hybrid search over %d items rebuilt in %.0f ms", len(hits), (time.perf_counter() - t0) * 1000)

"""The worker's item cache (streams.state.ItemLookup) against the real vector store: a store read
that a catalog update overtakes answers with what it read but is not cached, so the updated vector
is what the next request sees (a stale vector would otherwise stay until the item changes again)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np

from recstream.config import Settings
from recstream.vectorstore.store import DIM, VectorStore
from streams.state import ItemLookup


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def test_a_read_overtaken_by_a_catalog_update_is_not_cached(tmp_path: Path) -> None:
    store = VectorStore(Settings(run_dir=tmp_path, qdrant_path=tmp_path / "qdrant"))
    old, new = _unit(0), _unit(1)
    store.upsert([{"item_id": "i1", "category": "old"}], old[None])
    lookup = ItemLookup(SimpleNamespace(store=None))

    class CatalogUpdateDuringRead:
        """The store, with the catalog thread's upsert + invalidate landing between read and return."""

        def retrieve(self, item_ids):
            hits = store.retrieve(item_ids)
            store.upsert([{"item_id": "i1", "category": "new"}], new[None])
            lookup.invalidate(["i1"])
            return hits

    lookup.ctx = SimpleNamespace(store=CatalogUpdateDuringRead())
    vector, category = lookup.get_many({"i1"})["i1"]
    assert category == "old" and np.allclose(vector, old, atol=1e-6)  # answers with what it read
    assert "i1" not in lookup.cache

    lookup.ctx = SimpleNamespace(store=store)
    vector, category = lookup.get_many({"i1"})["i1"]
    assert category == "new" and np.allclose(vector, new, atol=1e-6)
    assert lookup.cache["i1"][1] == "new"  # an undisturbed read is cached
    store.close()


def test_a_re_embedded_catalogue_is_read_anew_without_an_invalidation(tmp_path: Path) -> None:
    """A re-embed switches the store's tag (the encoder of its vectors) and its vectors at once;
    the item cache must not hand out the old space's vectors under the new tag until the catalog
    thread gets round to invalidating (a request in between encoded the session from them and
    filed it under the new session-encoder version)."""
    store = VectorStore(Settings(run_dir=tmp_path, qdrant_path=tmp_path / "qdrant"))
    old, new = _unit(0), _unit(1)
    store.upsert([{"item_id": "i1", "category": "c"}], old[None])
    lookup = ItemLookup(SimpleNamespace(store=store))
    assert np.allclose(lookup.get_many({"i1"})["i1"][0], old, atol=1e-6)
    store.rebuild("item_encoder-v2", [{"item_id": "i1", "category": "c"}], new[None])
    assert store.tag == "item_encoder-v2"
    assert np.allclose(lookup.get_many({"i1"})["i1"][0], new, atol=1e-6)
    store.close()

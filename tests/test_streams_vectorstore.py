"""The Qdrant wrapper in local mode: idempotent upserts, deletes, filters; read index == Qdrant."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recstream.config import Settings
from recstream.recommend.candidates import CandidateFilter
from recstream.vectorstore import VectorStore, point_id


def _items(n: int) -> tuple[list[dict], np.ndarray]:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, 384)).astype(np.float32)
    items = [
        {"item_id": f"m{i}", "title": f"t{i}", "category": ["Drama", "Comedy", "Horror"][i % 3],
         "price": None if i % 7 == 0 else float(i % 50), "in_stock": i % 5 != 0, "tags": [], "updated_at": i}
        for i in range(n)
    ]
    return items, vecs


def test_local_store_index_matches_qdrant_and_is_idempotent(tmp_path: Path) -> None:
    settings = Settings(qdrant_path=tmp_path / "q")
    items, vecs = _items(300)
    store = VectorStore(settings)
    store.upsert(items, vecs)
    store.upsert(items[:50], vecs[:50])  # replay: same ids, no duplicates
    store.delete(["m1", "m2"])
    assert store.count() == 298
    assert point_id("m1") == point_id("m1") != point_id("m2")
    filters = [
        None,
        CandidateFilter(),
        CandidateFilter(exclude_ids=frozenset({"m3", "m4", "m6"}), max_price=30.0),
        CandidateFilter(categories=("Drama", "Horror"), exclude_categories=("Horror",), in_stock_only=False),
    ]
    direct = VectorStore.__new__(VectorStore)  # same client, reads forced through Qdrant
    direct.__dict__.update(store.__dict__)
    direct._index = None
    q = vecs[10]
    for f in filters:
        a = store.search(q, 20, f)
        b = direct.search(q, 20, f)
        assert [h.item_id for h in a] == [h.item_id for h in b]
        assert np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5)
        assert all(f is None or f.allows(h.item_id, h.payload) for h in a)
        assert np.allclose(a[0].vector, b[0].vector, atol=1e-6)
    got = store.retrieve(["m0", "m1", "m9"])
    assert set(got) == {"m0", "m9"} and got["m9"].payload["category"] == "Drama"
    expected = [h.item_id for h in direct.search(q, 5)]
    store.close()
    reopened = VectorStore(settings)  # the index is rebuilt from Qdrant at open
    assert reopened.count() == 298
    assert [h.item_id for h in reopened.search(q, 5)] == expected
    reopened.close()

"""The Qdrant wrapper in local mode: idempotent upserts, deletes, filters; read index == Qdrant."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from qdrant_client import models

from recstream.config import Settings
from recstream.recommend.candidates import CandidateFilter
from recstream.vectorstore import VectorStore, point_id


def _items(n: int) -> tuple[list[dict], np.ndarray]:
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, 384)).astype(np.float32)
    items = [
        {
            "item_id": f"m{i}",
            "title": f"t{i}",
            "category": ["Drama", "Comedy", "Horror"][i % 3],
            "price": None if i % 7 == 0 else float(i % 50),
            "in_stock": i % 5 != 0,
            "tags": [],
            "updated_at": i,
        }
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
    # the hybrid search's catalogue snapshot: the same items with vectors, from the index or Qdrant
    # (the scroll path server mode takes)
    snap, scrolled = store.snapshot(), direct.snapshot()
    assert len(snap) == len(scrolled) == 298 and {h.item_id for h in snap} == {h.item_id for h in scrolled}
    by_id = {h.item_id: h for h in scrolled}
    assert all(np.allclose(h.vector, by_id[h.item_id].vector, atol=1e-6) for h in snap)
    revision = store.revision
    store.upsert(items[:1], vecs[:1])
    assert store.revision == revision + 1  # readers that derive state from the store see the write
    got = store.retrieve(["m0", "m1", "m9"])
    assert set(got) == {"m0", "m9"} and got["m9"].payload["category"] == "Drama"
    expected = [h.item_id for h in direct.search(q, 5)]
    store.close()
    reopened = VectorStore(settings)  # the index is rebuilt from Qdrant at open
    assert reopened.count() == 298
    assert [h.item_id for h in reopened.search(q, 5)] == expected
    reopened.close()


def test_search_many_equals_one_search_per_query(tmp_path: Path) -> None:
    """The batched read (one matrix product locally, query_batch_points through Qdrant) returns what
    one search per query returns, filters included."""
    items, vecs = _items(300)
    store = VectorStore(Settings(qdrant_path=tmp_path / "q"))
    store.upsert(items, vecs)
    direct = VectorStore.__new__(VectorStore)  # same client, reads forced through Qdrant
    direct.__dict__.update(store.__dict__)
    direct._index = None
    queries = [
        (vecs[3], 10, None),
        (vecs[40] * 5.0, 25, CandidateFilter(exclude_ids=frozenset({"m40", "m41"}), max_price=20.0)),
        (vecs[7], 5, CandidateFilter(categories=("Comedy",), in_stock_only=True)),
        (vecs[9], 3, CandidateFilter(categories=("Nothing",))),  # nothing passes
    ]
    for impl in (store, direct):
        many = impl.search_many(queries)
        assert len(many) == len(queries)
        for (v, k, f), got in zip(queries, many, strict=True):
            one = store.search(v, k, f)
            assert [h.item_id for h in got] == [h.item_id for h in one]
            assert np.allclose([h.score for h in got], [h.score for h in one], atol=1e-5)
            assert all(np.allclose(a.vector, b.vector, atol=1e-6) for a, b in zip(got, one, strict=True))
    assert store.search_many([]) == []
    store.close()


def test_a_rebuild_with_vectors_of_another_width_is_refused_before_anything_changes(tmp_path: Path) -> None:
    """An encoder of another width: refused with a message, the store still on its collection and
    no half-built collection left behind (it was created at the old width, failed on the first
    write, and every restart re-embedded the catalogue into the same failure)."""
    store = VectorStore(Settings(qdrant_path=tmp_path / "q"))
    try:
        store.upsert([{"item_id": "a"}], np.ones((1, 384), np.float32))
        with pytest.raises(ValueError, match="768-dimensional vectors, the store holds 384"):
            store.rebuild("enc-v2", [{"item_id": "a"}], np.ones((1, 768), np.float32))
        assert store.tag == "initial" and store.count() == 1
        names = {c.name for c in store.client.get_collections().collections}
        assert not any(n.endswith("enc-v2") for n in names)
    finally:
        store.close()


def test_an_initial_collection_without_its_alias_is_taken_as_it_is(tmp_path: Path) -> None:
    """A first start stopped between creating `items__initial` and pointing the alias at it (or, on
    a server, another worker created it a moment before): the next start keeps what it holds (it
    deleted and recreated the collection)."""
    settings = Settings(qdrant_path=tmp_path / "q")
    store = VectorStore(settings)
    store.upsert([{"item_id": "a"}], np.ones((1, 384), np.float32))
    store.client.update_collection_aliases(
        change_aliases_operations=[models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=store.alias))]
    )
    store.close()
    again = VectorStore(settings)
    try:
        assert again.tag == "initial" and again.count() == 1
    finally:
        again.close()


def test_writes_ride_out_a_server_that_is_briefly_unreachable(tmp_path: Path, monkeypatch) -> None:
    """A Qdrant server restarting (connection refused, a timeout, a 503) failed the write, and the
    catalog agent's exception stopped the worker. Transient errors are now retried with backoff;
    anything else still raises at once."""
    import httpx
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    import recstream.vectorstore.store as store_module

    monkeypatch.setattr(store_module, "WRITE_RETRY_S", 5.0)
    store = VectorStore(Settings(qdrant_path=tmp_path / "q"))
    real_upsert, real_delete = store.client.upsert, store.client.delete
    failures = [
        ResponseHandlingException(ConnectionError("refused")),
        UnexpectedResponse(503, "Service Unavailable", b"", httpx.Headers()),
    ]

    def flaky(call):
        def wrapped(*args, **kwargs):
            if failures:
                raise failures.pop(0)
            return call(*args, **kwargs)

        return wrapped

    try:
        monkeypatch.setattr(store.client, "upsert", flaky(real_upsert))
        store.upsert([{"item_id": "a"}, {"item_id": "b"}], np.ones((2, 384), np.float32))
        assert not failures and store.count() == 2
        failures.append(UnexpectedResponse(400, "Bad Request", b"", httpx.Headers()))  # not transient
        monkeypatch.setattr(store.client, "delete", flaky(real_delete))
        with pytest.raises(UnexpectedResponse):
            store.delete(["a"])
        store.delete(["a"])
        assert store.count() == 1
    finally:
        store.close()

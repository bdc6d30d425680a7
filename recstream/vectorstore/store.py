"""The VectorStore: writes go to Qdrant (the store of record) and, in local mode, to the read index;
reads come from the read index in local mode and from the server otherwise (see the package doc)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse
from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from recstream.config import Settings
from recstream.recommend.candidates import CandidateFilter
from recstream.vectorstore.qdrant import (
    COLLECTION,
    DIM,
    INITIAL_TAG,
    SERVER_TIMEOUT_S,
    hit_from_point,
    physical_name,
    point_id,
    to_qdrant_filter,
)
from recstream.vectorstore.read_index import Hit, ReadIndex, normalise

log = logging.getLogger(__name__)


#: How long a write (and the count the catalog agent asks after it) is retried while a Qdrant server
#: restarts or answers slowly: raising stopped the catalog agent, and with it the whole worker.
WRITE_RETRY_S = 30.0


def _transient(exc: BaseException) -> bool:
    """A server that cannot be reached, timed out, or answers 502/503/504: worth another try."""
    if isinstance(exc, ResponseHandlingException):
        return True
    return isinstance(exc, UnexpectedResponse) and exc.status_code in (502, 503, 504)


def _retried(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call` retried with backoff for WRITE_RETRY_S on transient errors (idempotent writes only:
    an upsert or delete by point id gives the same state however often it runs)."""
    for attempt in Retrying(
        retry=retry_if_exception(_transient),
        stop=stop_after_delay(WRITE_RETRY_S),
        wait=wait_exponential(multiplier=0.2, max=5.0),
        before_sleep=lambda state: log.warning(
            "Qdrant %s failed (%s); retrying", call.__name__, state.outcome.exception() if state.outcome else "?"
        ),
        reraise=True,
    ):
        with attempt:
            return call(*args, **kwargs)
    raise AssertionError("unreachable: Retrying reraises")


class VectorStore:
    """Qdrant wrapper for the 'items' collection (cosine, 384-d)."""

    def __init__(
        self, settings: Settings, collection: str = COLLECTION, dim: int = DIM, read_index: bool | None = None
    ) -> None:
        self.alias = collection
        self.collection = collection  # the physical collection behind the alias (set by ensure_collection)
        self.dim = dim
        #: Bumped by every write through this object: readers that keep derived state (the hybrid
        #: search's catalogue statistics) know when to rebuild it.
        self.revision = 0
        if settings.qdrant_url:
            self.client = QdrantClient(url=settings.qdrant_url, timeout=SERVER_TIMEOUT_S)
            self.mode = "server"
        else:
            settings.qdrant_path.mkdir(parents=True, exist_ok=True)
            self.client = QdrantClient(path=str(settings.qdrant_path))
            self.mode = "local"
        self.ensure_collection()
        if self.mode == "local":
            self._tune_local_storage()
        use_index = self.mode == "local" if read_index is None else read_index
        if use_index and self.mode != "local":
            raise ValueError("the in-process read index is only exact in local mode (single writer)")
        self._index: ReadIndex | None = ReadIndex(dim) if use_index else None
        if self._index is not None:
            self._load_index()

    def _tune_local_storage(self) -> None:
        """Local mode commits (and fsyncs) SQLite once per point: 20 ms each, 35 s for the catalog.

        WAL + synchronous=NORMAL keeps every commit safe against a killed process (the case that
        matters for a worker) while skipping the per-point fsync; measured 0.6 s for 1,682 items.
        """
        try:
            conn = self.client._client.collections[self.collection].storage.storage
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
        except (AttributeError, KeyError) as exc:  # a future qdrant-client layout: keep defaults
            log.warning("could not tune Qdrant local storage (%s); writes will be slower", exc)

    def _load_index(self) -> None:
        assert self._index is not None
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection, limit=1000, offset=offset, with_payload=True, with_vectors=True
            )
            for p in points:
                hit = hit_from_point(p, 0.0)
                # Reopened local collections hand back the vectors as upserted; cosine wants units.
                vec = None if hit.vector is None else normalise(hit.vector)
                self._index.put(hit.item_id, vec, hit.payload)
            if offset is None:
                break
        log.info("read index loaded: %d items", len(self._index.row_of))

    def ensure_collection(self) -> None:
        """Resolve the alias to its physical collection; on first use create `<alias>__initial`.
        A collection named like the alias itself (made before versioned collections) is used as is."""
        aliases = {a.alias_name: a.collection_name for a in self.client.get_aliases().aliases}
        if self.alias in aliases:
            self.collection = aliases[self.alias]
        elif self.client.collection_exists(self.alias):
            self.collection = self.alias
        else:
            self.collection = physical_name(self.alias, INITIAL_TAG)
            # An `initial` collection without the alias (a start that stopped between the two, or
            # another worker starting at the same moment on a server) is taken as it is: recreating
            # it dropped what was written there, and on a server the other worker's first batch.
            if not self.client.collection_exists(self.collection):
                self._create(self.collection)
            self._point_alias(self.collection)

    @property
    def tag(self) -> str:
        """Which encoder made the vectors: the physical collection's suffix ('' for a pre-alias store)."""
        prefix = f"{self.alias}__"
        return self.collection[len(prefix) :] if self.collection.startswith(prefix) else ""

    def _create(self, name: str) -> None:
        if self.client.collection_exists(name):
            self.client.delete_collection(name)  # left over from an interrupted rebuild
        self.client.create_collection(
            name, vectors_config=models.VectorParams(size=self.dim, distance=models.Distance.COSINE)
        )
        if self.mode == "server":  # local mode scans anyway; indexes only matter on a server
            for field, schema in (
                ("category", models.PayloadSchemaType.KEYWORD),
                ("in_stock", models.PayloadSchemaType.BOOL),
                ("price", models.PayloadSchemaType.FLOAT),
            ):
                self.client.create_payload_index(name, field, field_schema=schema)
        log.info("created Qdrant collection %s (%s mode)", name, self.mode)

    def _point_alias(self, name: str) -> None:
        ops: list[Any] = []
        aliases = {a.alias_name for a in self.client.get_aliases().aliases}
        if self.alias in aliases:
            ops.append(models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.alias)))
        ops.append(
            models.CreateAliasOperation(create_alias=models.CreateAlias(collection_name=name, alias_name=self.alias))
        )
        self.client.update_collection_aliases(change_aliases_operations=ops)  # one atomic change

    def rebuild(self, tag: str, items: Sequence[dict[str, Any]], vectors: np.ndarray, batch: int = 256) -> None:
        """Write `items` with `vectors` (made by encoder `tag`) into a new collection, then switch the
        alias, the read index and the writes over to it in one step and drop the old collection.
        Readers keep the old vectors until the switch. The caller must not write meanwhile."""
        new = physical_name(self.alias, tag)
        old = self.collection
        if new == old:
            return
        if len(items) and vectors.shape[1] != self.dim:  # before anything is created or switched
            raise ValueError(
                f"encoder {tag} gives {vectors.shape[1]}-dimensional vectors, the store holds {self.dim}: "
                "the served models expect one width (VectorStore dim, the ranker's ITEM_DIM)"
            )
        self._create(new)
        index = ReadIndex(self.dim) if self._index is not None else None
        for lo in range(0, len(items), batch):
            self._write(new, index, items[lo : lo + batch], vectors[lo : lo + batch])
        if old == self.alias:  # a pre-alias store: its collection holds the alias's name
            self.client.delete_collection(old)
        self._point_alias(new)
        if index is not None:
            self._index = index  # one reference swap: a search in flight finishes on the old index
        # The tag (this name) after the index: a reader that sees the new tag must find the new
        # vectors too, or it encodes a session from old-space vectors and files it under the new
        # version. The revision after the name: a snapshot taken for the new revision reads the
        # new collection (server mode reads by name).
        self.collection = new
        self.revision += 1
        if self.mode == "local":
            self._tune_local_storage()
        if old != self.alias and self.client.collection_exists(old):
            self.client.delete_collection(old)
        log.info("item vectors switched from %s to %s (%d items)", old, new, len(items))

    # --- writes -------------------------------------------------------------------------------

    def upsert(self, items: Sequence[dict[str, Any]], vectors: np.ndarray) -> None:
        """Items are payload dicts with at least item_id; replaying the same upsert is a no-op."""
        if items:
            self._write(self.collection, self._index, items, vectors)
            self.revision += 1

    def _write(
        self, collection: str, index: ReadIndex | None, items: Sequence[dict[str, Any]], vectors: np.ndarray
    ) -> None:
        points = [
            models.PointStruct(id=point_id(it["item_id"]), vector=vec.astype(np.float32).tolist(), payload=dict(it))
            for it, vec in zip(items, vectors, strict=True)
        ]
        _retried(self.client.upsert, collection, points=points, wait=True)
        if index is not None:
            for it, p in zip(items, points, strict=True):
                # Qdrant stores cosine vectors normalised; the index keeps exactly what Qdrant returns.
                index.put(it["item_id"], normalise(np.asarray(p.vector, np.float32)), dict(it))

    def delete(self, item_ids: Iterable[str]) -> None:
        ids = [point_id(i) for i in item_ids]
        if ids:
            _retried(self.client.delete, self.collection, points_selector=models.PointIdsList(points=ids), wait=True)
        if self._index is not None:
            for i in item_ids:
                self._index.remove(i)
        self.revision += 1

    # --- reads --------------------------------------------------------------------------------

    def count(self) -> int:
        if self._index is not None:
            return len(self._index.row_of)
        return _retried(self.client.count, self.collection, exact=True).count

    def retrieve(self, item_ids: Sequence[str], with_vectors: bool = True) -> dict[str, Hit]:
        """item_id -> Hit (payload and vector) for the ids that exist."""
        if not item_ids:
            return {}
        if self._index is not None:
            return self._index.get(item_ids)
        points = self.client.retrieve(
            self.collection, ids=[point_id(i) for i in item_ids], with_payload=True, with_vectors=with_vectors
        )
        return {p.payload["item_id"]: hit_from_point(p, 1.0) for p in points}

    def search(
        self, vector: np.ndarray, limit: int, filt: CandidateFilter | None = None, with_vectors: bool = True
    ) -> list[Hit]:
        """Nearest items to `vector` that pass `filt`, best first."""
        if self._index is not None:
            return self._index.search(np.asarray(vector, np.float32), limit, filt)
        res = self.client.query_points(
            self.collection,
            query=np.asarray(vector, dtype=np.float32).tolist(),
            query_filter=to_qdrant_filter(filt) if filt is not None else None,
            limit=limit,
            with_payload=True,
            with_vectors=with_vectors,
        )
        return [hit_from_point(p, p.score) for p in res.points]

    def search_many(
        self, queries: Sequence[tuple[np.ndarray, int, CandidateFilter | None]], with_vectors: bool = True
    ) -> list[list[Hit]]:
        """`search` for several (vector, limit, filter) at once, same results: in local mode one
        matrix product for all of them (a batch of requests shares the pass over the catalogue), on
        a server one query_batch_points round trip."""
        if not queries:
            return []
        if self._index is not None:
            return self._index.search_many([(np.asarray(v, np.float32), k, f) for v, k, f in queries])
        res = self.client.query_batch_points(
            self.collection,
            requests=[
                models.QueryRequest(
                    query=np.asarray(v, dtype=np.float32).tolist(),
                    filter=to_qdrant_filter(f) if f is not None else None,
                    limit=k,
                    with_payload=True,
                    with_vector=with_vectors,
                )
                for v, k, f in queries
            ],
        )
        return [[hit_from_point(p, p.score) for p in r.points] for r in res]

    def snapshot(self) -> list[Hit]:
        """Every item with its vector and payload (catalogue-wide statistics; a full scan)."""
        if self._index is not None:
            return self._index.search(None, len(self._index.row_of), None)
        out: list[Hit] = []
        offset = None
        while True:
            points, offset = self.client.scroll(
                self.collection, limit=1024, offset=offset, with_payload=True, with_vectors=True
            )
            out += [hit_from_point(p, 0.0) for p in points]
            if offset is None:
                return out

    def scroll(self, limit: int, filt: CandidateFilter | None = None, with_vectors: bool = True) -> list[Hit]:
        """Any `limit` items passing `filt` (no query vector: a cold user with no session yet)."""
        if self._index is not None:
            return self._index.search(None, limit, filt)
        points, _ = self.client.scroll(
            self.collection,
            scroll_filter=to_qdrant_filter(filt) if filt is not None else None,
            limit=limit,
            with_payload=True,
            with_vectors=with_vectors,
        )
        return [hit_from_point(p, 0.0) for p in points]

    def close(self) -> None:
        self.client.close()

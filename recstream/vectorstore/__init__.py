"""The item vector store: one Qdrant collection, embedded local mode or a server, same code path.

Local mode (the default, `settings.qdrant_path`) lets only one process open the directory, which is
why the embedded stack runs every stream agent in one worker; `settings.qdrant_url` switches to a
server and the agents may then run as separate processes.

Point ids are UUIDv5 of the item id, so an upsert replays idempotently and a delete needs no lookup;
the item id itself stays in the payload.

Reads in local mode: qdrant-client's local mode evaluates filters per point in Python and deep-copies
every returned payload; measured here on the 1,682-item MovieLens catalog that is 5-15 ms for an
unfiltered top-100 and 110-125 ms with the request filters, against a 50 ms end-to-end budget. Local
mode is single-process by construction (it locks the directory), so this wrapper is the only writer
and can keep an exact in-process read index (recstream.vectorstore.read_index: a numpy matrix plus payload columns)
updated on every write and loaded from Qdrant at open. Qdrant stays the store of record (durable,
restart-safe); `read_index=False` forces reads through Qdrant and a test checks both agree.
Server mode always reads from the server (other processes may write).

Versions of item vectors: vectors belong to the item encoder that made them (and to the session
encoder trained with it), so each encoder version gets its own physical collection,
`items__<model>-v<N>`, behind the alias `items` (`tag` says which). `rebuild` fills a new
collection and swaps the alias and the read index in one step, so readers see the old vectors or
the new ones, never a mix or an empty store (streams.catalog_indexer re-embeds the catalog when a
new item-encoder version goes live).
"""

from recstream.vectorstore.qdrant import COLLECTION, DIM, INITIAL_TAG, physical_name, point_id
from recstream.vectorstore.read_index import Hit
from recstream.vectorstore.store import VectorStore

__all__ = ["COLLECTION", "DIM", "INITIAL_TAG", "Hit", "VectorStore", "physical_name", "point_id"]

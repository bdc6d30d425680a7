"""How the store's concepts map onto Qdrant: collection names per encoder version, point ids, points
back to hits, and request filters as Qdrant filters."""

from __future__ import annotations

import re
import uuid
from typing import Any

import numpy as np
from qdrant_client import models

from recstream.recommend.candidates import CandidateFilter
from recstream.vectorstore.read_index import Hit

COLLECTION = "items"
DIM = 384
#: The tag of a store created before any encoder wrote to it.
INITIAL_TAG = "initial"
_NAMESPACE = uuid.UUID("6f1c2b1e-4d7a-5c7e-9f3a-2b8d4e6a1c90")
# Server mode only: a search on a few-thousand-item collection answers in a few ms; 5 s means the
# server is gone, and the caller's degraded path takes over instead of hanging the stream.
SERVER_TIMEOUT_S = 5


def physical_name(alias: str, tag: str) -> str:
    """The collection that holds the vectors of encoder `tag` behind `alias`."""
    return f"{alias}__{re.sub(r'[^A-Za-z0-9_.-]', '_', tag)}"


def point_id(item_id: str) -> str:
    """Deterministic point id for an item id (stable across processes and restarts)."""
    return str(uuid.uuid5(_NAMESPACE, item_id))


def hit_from_point(point: Any, score: float) -> Hit:
    vec = point.vector
    if isinstance(vec, dict):  # named vectors; we use the default unnamed one
        vec = next(iter(vec.values()), None)
    return Hit(
        item_id=point.payload["item_id"],
        score=float(score),
        payload=point.payload,
        vector=None if vec is None else np.asarray(vec, dtype=np.float32),
    )


def to_qdrant_filter(f: CandidateFilter) -> models.Filter | None:
    must: list[Any] = []
    must_not: list[Any] = []
    if f.in_stock_only:
        must.append(models.FieldCondition(key="in_stock", match=models.MatchValue(value=True)))
    if f.categories is not None:
        must.append(models.FieldCondition(key="category", match=models.MatchAny(any=list(f.categories))))
    if f.max_price is not None:
        must.append(models.FieldCondition(key="price", range=models.Range(lte=f.max_price)))
    if f.exclude_categories:
        must_not.append(models.FieldCondition(key="category", match=models.MatchAny(any=list(f.exclude_categories))))
    if f.exclude_ids:
        must_not.append(models.HasIdCondition(has_id=[point_id(i) for i in sorted(f.exclude_ids)]))
    if not must and not must_not:
        return None
    return models.Filter(must=must or None, must_not=must_not or None)

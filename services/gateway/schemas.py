"""The gateway's HTTP bodies and answers, built from the event contracts' own fields, and its limits.

No `from __future__ import annotations`: FastAPI reads these annotations at runtime.
"""

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, Field, create_model

from recstream.contracts.events import (
    ID_MAX_LENGTH,
    ID_PATTERN,
    Inbound,
    ItemUpsert,
    RecommendationRequest,
    RecommendationResult,
    SearchQuery,
)

# Mirrors contracts.events.Id for path parameters (FastAPI needs Path(), not Field()); the contract
# model built from the path value re-validates it anyway.
ItemIdPath = Annotated[
    str, Path(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN, description="Catalog item id")
]


class GatewayLimits(BaseModel):
    """Per-deployment limits; defaults suit an interactive app talking to one local stack."""

    max_batch: int = Field(500, ge=1, description="Most behaviour events in one POST /v1/events (413 beyond)")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body in bytes (413 beyond)")
    request_timeout_s: float = Field(
        5.0, gt=0, description="How long search/recommend wait for the stream worker before answering 504"
    )
    publish_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long a write may take to be acknowledged, counted from its body's receipt (waiting "
        "for a thread included); one left with under a fifth of it is refused (503) before it sends",
    )


def _body(name: str, doc: str, contract: type[BaseModel], fields: set[str]) -> type[BaseModel]:
    """An HTTP body made of the contract's own field definitions (types, bounds, descriptions), so
    the gateway takes exactly what the worker takes; unknown fields are refused (Inbound)."""
    picked = {n: (f.annotation, f) for n, f in contract.model_fields.items() if n in fields}
    return create_model(name, __base__=Inbound, __doc__=doc, **picked)  # type: ignore[call-overload]


SearchBody = _body(
    "SearchBody",
    "A text search for one user (optionally within a session).",
    SearchQuery,
    {"user_id", "session_id", "query", "k", "filters"},
)
RecommendBody = _body(
    "RecommendBody",
    "'More for this user/session', from the session's live features.",
    RecommendationRequest,
    {"user_id", "session_id", "k", "filters"},
)


class GatewayResult(RecommendationResult):
    """The worker's RecommendationResult plus display titles from the catalog (best effort)."""

    titles: dict[str, str] = Field(default_factory=dict, description="item_id -> title, where known")


class Accepted(BaseModel):
    accepted: int = Field(description="Events the broker acknowledged")
    ids: list[str] = Field(description="event_id of each behaviour event, or the item_id written")


class Readiness(BaseModel):
    """/readyz: can this gateway answer at all. /modelz: is every served model there."""

    ready: bool = Field(description="Requests can be answered: Kafka is reachable (answers may be degraded)")
    degraded: bool = Field(description="Triton or a served model is missing: answers fall back to retrieval")
    kafka: str
    triton: str
    models: dict[str, str] = Field(default_factory=dict, description="Each served model: ok, or why not")


# Item fields without the identity/envelope ones: PUT takes the id from the path.
_ITEM_ENVELOPE = {"item_id", "op", "schema_version", "ts_ms"}
ItemFields = _body(
    "ItemFields",
    "An item's fields; the id comes from the path.",
    ItemUpsert,
    set(ItemUpsert.model_fields) - _ITEM_ENVELOPE,
)


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "No X-API-Key header"},
    403: {"description": "X-API-Key is not a valid key"},
    413: {"description": "Body over max_body_bytes, batch over max_batch, or a message over MAX_MESSAGE_BYTES"},
    503: {"description": "The broker did not acknowledge in time"},
}
WAIT_ERRORS = {
    **ERRORS,
    503: {"description": "The broker did not acknowledge in time, or the results topic cannot be read yet"},
    504: {"description": "No stream worker answered within request_timeout_s"},
}

"""Event schemas (version 1). Every message on every topic is one of these models as JSON.

Changing a field is a contract change: bump SCHEMA_VERSION, re-export the JSON Schemas
(`make schemas`) and keep readers tolerant of the previous version.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    model_validator,
)

SCHEMA_VERSION = 1
#: 9999-12-31T23:59:59.999Z: a timestamp past it is a unit mistake (1e23 was accepted once)
MAX_TS_MS = 253_402_300_799_999
#: Deepest slot a shown item can have (endless scrolling included)
MAX_POSITION = 1_000_000

#: What a shown slot's propensity is, for every policy the worker serves.
PROPENSITY_DOC = (
    "Probability the policy showed this item in this slot: 1 for greedy answers; the marginal for "
    "epsilon-greedy (eps:), exact, and for the Thompson policies (ts:, lift:), estimated from "
    "posterior draws; for Plackett-Luce (pl:) the probability given the items in the slots above "
    "(their product is the list's probability). Off-policy evaluation recomputes the marginals "
    "from the ranking log's pool."
)

#: What an id (user, item, session, request, event) may be: the key of a Kafka message and a path segment.
ID_PATTERN = r"^[A-Za-z0-9_.:@\-]+$"
ID_MAX_LENGTH = 128
Id = Annotated[str, Field(min_length=1, max_length=ID_MAX_LENGTH, pattern=ID_PATTERN)]


def _has_text(query: str) -> str:
    if not query.strip():
        raise ValueError("a search query needs some text, not only whitespace")
    return query


#: A search's text: whitespace alone is no query (BM25 scores nothing, the dense half ranks by the
#: embedding of an empty string), so it is refused like an empty one, at the gateway too.
QUERY_HAS_TEXT = r"\S"  # the JSON Schema's form of the rule, for non-Python producers
QueryText = Annotated[
    str, Field(min_length=1, max_length=1024, json_schema_extra={"pattern": QUERY_HAS_TEXT}), AfterValidator(_has_text)
]


def _unencodable(value: Any, path: str = "") -> str | None:
    """Path of the first string in `value` that UTF-8 cannot encode (a lone surrogate), or None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "value"
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        name = str(key).encode("utf-8", "backslashreplace").decode("utf-8")  # the path itself must print
        where = f"{path}.{name}" if path else name
        bad = (_unencodable(key, where + " (key)") if isinstance(key, str) else None) or _unencodable(item, where)
        if bad:
            return bad
    return None


class Inbound(BaseModel):
    """Base of what applications send (events, requests, catalog writes, gateway bodies): unknown
    fields, NaN/Infinity and text that is not valid Unicode (a lone surrogate from a JSON escape)
    are refused at the boundary with the field named, so they become a 422 or a dead letter and
    never a 500 deep inside a serializer. (What the worker itself writes is built from checked
    values and skips the walk.)"""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any, info: ValidationInfo) -> Any:
        if info.mode == "json":  # pydantic's JSON parser already refuses lone surrogates (malformed JSON)
            return data
        bad = _unencodable(data)
        if bad:
            raise ValueError(f"{bad}: text is not valid Unicode (lone surrogate)")
        return data


def _json_number(value: Any) -> Any:
    """Numbers arrive as JSON numbers: "3" or true for a number is a client bug, refused, not coerced."""
    if isinstance(value, str | bytes | bool):
        raise ValueError(f"must be a JSON number, got {type(value).__name__}")
    return value


def _json_bool(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {type(value).__name__}")
    return value


def json_number(kind: type, **bounds: float) -> Any:
    """`kind` with `bounds` (ge, gt, le), refusing strings and booleans. The bounds come before the
    check so they stay in the JSON Schema as minimum/maximum."""
    return Annotated[kind, Field(**bounds), BeforeValidator(_json_number)]


JsonBool = Annotated[bool, BeforeValidator(_json_bool)]


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id() -> str:
    return uuid.uuid4().hex


class Event(BaseModel):
    """Base of every event: strict about unknown fields so typos fail loudly, not silently, and
    about non-finite numbers (JSON has none: a NaN was written as null, which every reader refused)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    schema_version: Annotated[Literal[1], BeforeValidator(_json_number)] = Field(  # true == 1 in Python: refused
        SCHEMA_VERSION, description="Contract version of this message"
    )
    ts_ms: json_number(int, ge=0, le=MAX_TS_MS) = Field(  # type: ignore[valid-type]
        default_factory=now_ms, description="Event time, Unix milliseconds"
    )


# --- catalog -----------------------------------------------------------------------------------


def item_text(title: str, category: str | None = "", tags: Sequence[str] = (), description: str | None = "") -> str:
    """The one text of an item that encoders embed and lexical search indexes (from an upsert or a
    stored payload alike)."""
    parts = [title, category or "", " ".join(tags or ()), description or ""]
    return " | ".join(p for p in parts if p)


class ItemUpsert(Event, Inbound):
    """Create or replace one catalog item; idempotent by item_id."""

    op: Literal["upsert"] = "upsert"
    item_id: Id
    title: str = Field(min_length=1, max_length=512)
    description: str = Field("", max_length=8192)
    category: str = Field("unknown", max_length=128, description="Primary category, used for diversity")
    tags: list[str] = Field(default_factory=list, max_length=64)
    price: json_number(float, ge=0) | None = None  # type: ignore[valid-type]
    in_stock: JsonBool = True
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)

    def text(self) -> str:
        """The text the encoder sees for this item."""
        return item_text(self.title, self.category, self.tags, self.description)


def _op_required(schema: dict[str, Any]) -> None:
    schema["required"] = sorted({*schema.get("required", []), "op"})


class ItemDelete(Event, Inbound):
    """Remove one item. On the wire `op: "delete"` is required (without `op` a message is an upsert);
    in Python it is the default."""

    op: Literal["delete"] = "delete"
    item_id: Id

    model_config = ConfigDict(json_schema_extra=_op_required)


def _catalog_op(value: Any) -> str | None:
    """`op` picks the model; a message without one is an upsert, as its schema's default says."""
    return value.get("op", "upsert") if isinstance(value, dict) else getattr(value, "op", None)


CatalogEvent = Annotated[
    Annotated[ItemUpsert, Tag("upsert")] | Annotated[ItemDelete, Tag("delete")], Discriminator(_catalog_op)
]


# --- requests --------------------------------------------------------------------------------


class RequestFilters(Inbound):
    """Business filters a caller may put on one request."""

    categories: list[str] | None = Field(None, description="Only these categories")
    exclude_categories: list[str] = Field(default_factory=list)
    max_price: json_number(float, ge=0) | None = None  # type: ignore[valid-type]
    in_stock_only: JsonBool = True
    exclude_items: list[Id] = Field(default_factory=list)


def _request_wire_rules(schema: dict[str, Any]) -> None:
    """What the worker requires of a request on the wire, in the JSON Schema too, so that a
    non-Python client's validator agrees with it: a request_id, and a query for a search."""
    schema["required"] = sorted({*schema.get("required", []), "request_id"})
    schema["if"] = {"properties": {"kind": {"const": "search"}}, "required": ["kind"]}
    query = {"type": "string", "minLength": 1, "pattern": QUERY_HAS_TEXT}
    schema["then"] = {"required": ["query"], "properties": {"query": query}}


class RecommendationRequest(Event, Inbound):
    """Ask for items. With `query` it is a search; without, 'more for this session'.

    On the wire `request_id` is required: the answer carries it and it is how the caller finds its
    answer on the recommendations topic (a worker-made id would leave the answer unclaimed). In
    Python it defaults to a new id, which the SDK and the gateway send."""

    kind: Literal["recommend", "search"] = "recommend"
    request_id: Id = Field(default_factory=new_id)
    user_id: Id
    session_id: Id | None = None
    query: QueryText | None = None
    k: json_number(int, ge=1, le=100) = 10  # type: ignore[valid-type]
    filters: RequestFilters = Field(default_factory=RequestFilters)

    model_config = ConfigDict(json_schema_extra=_request_wire_rules)

    @model_validator(mode="before")
    @classmethod
    def _request_id_on_the_wire(cls, data: Any, info: ValidationInfo) -> Any:
        if info.mode == "json" and isinstance(data, dict) and "request_id" not in data:
            raise ValueError("request_id is required: the answer carries it, and the caller finds its answer by it")
        return data

    @model_validator(mode="after")
    def _search_has_text(self) -> RecommendationRequest:
        if self.kind == "search" and not self.query:
            raise ValueError("a search request needs a non-empty query")
        return self


class SearchQuery(RecommendationRequest):
    """A text search; same wire form as a request with kind='search'."""

    kind: Literal["search"] = "search"
    query: QueryText


# --- behaviour -------------------------------------------------------------------------------


class BehaviourType(StrEnum):
    impression = "impression"
    view = "view"
    click = "click"
    add_to_cart = "add_to_cart"
    purchase = "purchase"


class BehaviourEvent(Event, Inbound):
    """Something a user did with an item. request_id + position tie it to what was shown."""

    event_id: Id = Field(default_factory=new_id)
    type: BehaviourType
    user_id: Id
    session_id: Id | None = None
    item_id: Id
    request_id: Id | None = Field(None, description="The recommendation/search that showed the item")
    position: json_number(int, ge=0, le=MAX_POSITION) | None = Field(  # type: ignore[valid-type]
        None, description="0-based slot the item was shown in"
    )
    model_version: str | None = Field(None, max_length=128, description="Version that scored what was shown")
    propensity: json_number(float, gt=0, le=1) | None = Field(  # type: ignore[valid-type]
        None, description=PROPENSITY_DOC
    )


# --- results ---------------------------------------------------------------------------------


class RankedItem(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    item_id: Id
    score: float
    position: int = Field(ge=0)
    propensity: float = Field(gt=0, le=1, description=PROPENSITY_DOC)
    retrieval_score: float | None = None
    category: str | None = None
    reasons: dict[str, float] = Field(default_factory=dict, description="Top contributing signals")


class RecommendationResult(Event):
    request_id: Id
    user_id: Id
    session_id: Id | None = None
    kind: Literal["recommend", "search"] = "recommend"
    items: list[RankedItem]
    model_version: str = Field(description="Ranker version that scored the list ('retrieval' if degraded)")
    degraded: bool = Field(False, description="True when ranking fell back to retrieval scores")
    policy: str = Field("greedy", description="Exploration policy/arm that ordered the list")
    latency_ms: float | None = None

    def feedback(self, item: RankedItem, type: BehaviourType | str = BehaviourType.impression) -> BehaviourEvent:
        """The behaviour event an application logs about one item of this answer. Request id, slot,
        propensity and scoring version tie it to what was shown: the feedback joiner, the learner's
        position-bias weights and off-policy evaluation each need them."""
        return BehaviourEvent(
            type=type,
            user_id=self.user_id,
            session_id=self.session_id,
            item_id=item.item_id,
            request_id=self.request_id,
            position=item.position,
            propensity=item.propensity,
            model_version=self.model_version,
        )

    def impressions(self) -> list[BehaviourEvent]:
        """One impression per shown slot: what an application logs when it displays the answer."""
        return [self.feedback(item) for item in self.items]


class PoolCandidate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    item_id: Id
    score: float = Field(description="The ranker's logit for this request")
    category: str | None = None
    features: list[float] | None = Field(
        None,
        description="The ranker's CAND_FEATURES row as served (recstream.models.ranker.CAND_FEATURE_NAMES order), "
        "so another model version can rescore the pool offline; None when the ranker is not the learned one",
    )


class RankingLog(Event):
    """What an exploring policy chose from, for off-policy evaluation of other policies.

    Why: a shown slot's propensity says how likely the logging policy was to show *that* item
    there; estimating another policy's click-through rate also needs what *it* would have shown,
    which depends on every candidate the logging policy drew from. The worker publishes one per
    answer of a stochastic policy, and with RANKING_LOG=all also one per greedy answer of the
    learned ranker (pool = the answer): no other policy can be evaluated from those, but their
    logged inputs let the continual trainer learn from exactly what serving saw. Degraded answers
    publish nothing."""

    request_id: Id
    user_id: Id
    session_id: Id | None = None
    model_version: str
    policy_spec: str = Field(description="EXPLORATION_POLICY spec that drew the answer, e.g. pl:0.5:2")
    k: int = Field(ge=1)
    pool: list[PoolCandidate] = Field(description="Candidates the policy drew from, in the order it ranked by")
    greedy: list[PoolCandidate] = Field(description="The answer the greedy policy would have given, in order")
    context: list[float] | None = Field(
        None,
        description="The ranker's CONTEXT input as served (session vector ++ query vector, zeros = none), "
        "so another model version can rescore the pool offline; None when the ranker is not the learned one",
    )

    @model_validator(mode="after")
    def _one_features_width(self) -> RankingLog:
        """One ranker scored the whole pool: rows of different widths cannot be its inputs (they
        made every consumer that stacks them fail on this message)."""
        widths = {len(c.features) for c in (*self.pool, *self.greedy) if c.features is not None}
        if len(widths) > 1:
            raise ValueError(f"candidate features rows of different widths {sorted(widths)}; one ranker scores a pool")
        return self

    def outcome(self, item_id: str, position: int, propensity: float, clicked: bool) -> TrainingExample:
        """The training example the feedback joiner writes for one shown slot of this answer: what a
        simulator replays to produce logs in production's shape for off-policy evaluation."""
        return TrainingExample(
            request_id=self.request_id,
            user_id=self.user_id,
            session_id=self.session_id,
            item_id=item_id,
            position=position,
            propensity=propensity,
            model_version=self.model_version,
            clicked=clicked,
            label=1.0 if clicked else 0.0,
        )


class TrainingExample(Event):
    """An impression joined with what followed it, for the continual learner."""

    request_id: Id
    user_id: Id
    session_id: Id | None = None
    item_id: Id
    position: int = Field(ge=0)
    propensity: float = Field(gt=0, le=1, description=PROPENSITY_DOC)
    model_version: str | None = None
    clicked: bool
    purchased: bool = False
    label: float = Field(ge=0, le=1, description="1 for a click/purchase, 0 for a skipped impression")
    context_items: list[Id] = Field(default_factory=list, description="Session items before the impression")
    query: str | None = Field(
        None, description="The search's query, when the worker that answered the search also joined its impressions"
    )


class DeadLetter(BaseModel):
    """A message that failed validation or processing, with enough to replay it."""

    model_config = ConfigDict(extra="forbid")

    source_topic: str
    partition: int
    offset: int
    key_b64: str | None = Field(None, description="Original message key, base64 (its first 16 KiB)")
    key_truncated: bool = Field(False, description="True when the key was too long to keep whole")
    value_b64: str = Field(description="Original message bytes, base64")
    value_size: int = Field(0, ge=0, description="Size of the original value in bytes")
    value_truncated: bool = Field(False, description="True when the value was too large to keep whole")
    error: str
    error_type: str
    worker: str
    ts_ms: int = Field(default_factory=now_ms)


ALL_MODELS: dict[str, type[BaseModel]] = {
    "item_upsert": ItemUpsert,
    "item_delete": ItemDelete,
    "recommendation_request": RecommendationRequest,
    "search_query": SearchQuery,
    "behaviour_event": BehaviourEvent,
    "recommendation_result": RecommendationResult,
    "training_example": TrainingExample,
    "ranking_log": RankingLog,
    "dead_letter": DeadLetter,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in ALL_MODELS.items()}

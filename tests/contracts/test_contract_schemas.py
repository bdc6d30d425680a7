"""The published JSON Schemas and the worker agree: what schemas/v1 accepts, the worker accepts, and
what the worker dead-letters for its content, the schema refuses. A non-Python producer that
validates against the schemas never has a message dead-lettered for its schema (size and JSON
syntax aside), and never has one accepted that the schema calls invalid.

Messages are generated around the valid ones (hypothesis): every field valid, missing, of another
JSON type, out of range, or joined by an unknown field.
"""

from __future__ import annotations

import json

import jsonschema_rs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recstream.contracts.export import schema_dir
from recstream.contracts.topics import BEHAVIOUR, CATALOG, REQUESTS, TopicSpec
from recstream.kafka.serde import InvalidEvent, decode

LIMIT = 1 << 20
IDS = st.sampled_from(["u1", "item-7", "a:b@c.d_e", "", "has space", "x" * 129, "é"])
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)


def _validator(name: str) -> jsonschema_rs.Validator:
    return jsonschema_rs.validator_for(json.loads((schema_dir() / f"{name}.json").read_text()))


def _perturbed(valid: dict, fields: dict[str, st.SearchStrategy]) -> st.SearchStrategy[dict]:
    """`valid` with up to two fields changed (dropped, or set to a field-specific or junk value),
    and sometimes an unknown field: about half of them stay valid, so both verdicts are exercised."""

    @st.composite
    def build(draw: st.DrawFn) -> dict:
        out = dict(valid)
        changed = draw(st.lists(st.sampled_from(sorted(fields)), max_size=2, unique=True))
        for name in changed:
            if draw(st.integers(0, 4)) == 0:
                out.pop(name, None)
            else:
                out[name] = draw(st.one_of(fields[name], JUNK) if draw(st.booleans()) else fields[name])
        if draw(st.integers(0, 9)) == 0:
            out["surprise"] = 1
        return out

    return build()


def _agree(spec: TopicSpec, schemas: list[jsonschema_rs.Validator], message: dict) -> None:
    schema_ok = any(v.is_valid(message) for v in schemas)
    try:
        decode(spec, json.dumps(message).encode(), LIMIT)
        worker_ok, reason = True, ""
    except InvalidEvent as exc:
        worker_ok, reason = False, exc.detail
    assert schema_ok == worker_ok, (message, "schema accepts" if schema_ok else "schema refuses", reason)


BEHAVIOUR_SCHEMA = _validator("behaviour_event")
BEHAVIOUR_FIELDS = {
    "type": st.sampled_from(["impression", "view", "click", "add_to_cart", "purchase", "teleport", "CLICK"]),
    "user_id": IDS,
    "item_id": IDS,
    "session_id": IDS,
    "request_id": IDS,
    "event_id": IDS,
    "position": st.one_of(st.integers(-2, 5), st.just("3"), st.just(2.0), st.just(2.5)),
    "propensity": st.one_of(st.floats(-0.5, 1.5), st.just(0), st.just(1), st.just("0.5")),
    "model_version": st.one_of(st.just("ranker-v1"), st.just("v" * 129)),
    "ts_ms": st.one_of(st.integers(-5, 2**53), st.just(253402300800000), st.just(1e23), st.just("123")),
    "schema_version": st.sampled_from([1, 2, "1"]),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_perturbed({"type": "click", "user_id": "u1", "item_id": "i1"}, BEHAVIOUR_FIELDS))
def test_behaviour_events(message: dict) -> None:
    _agree(BEHAVIOUR, [BEHAVIOUR_SCHEMA], message)


REQUEST_SCHEMA = _validator("recommendation_request")
REQUEST_FIELDS = {
    "kind": st.sampled_from(["recommend", "search", "browse"]),
    "user_id": IDS,
    "request_id": IDS,
    "query": st.sampled_from(["star wars", "", " \t\n ", " é ", "q" * 1025]),
    "k": st.one_of(st.integers(-1, 102), st.just("10"), st.just(10.0), st.just(True)),
    "filters": st.one_of(
        st.just({}),
        st.just({"max_price": 10}),
        st.just({"max_price": -1}),
        st.just({"max_price": "10"}),
        st.just({"in_stock_only": "yes"}),
        st.just({"categories": ["Drama"], "exclude_items": ["bad id"]}),
        st.just({"colour": "red"}),
    ),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_perturbed({"user_id": "u1", "kind": "search", "query": "star wars"}, REQUEST_FIELDS))
def test_requests(message: dict) -> None:
    _agree(REQUESTS, [REQUEST_SCHEMA], message)


CATALOG_SCHEMAS = [_validator("item_upsert"), _validator("item_delete")]
CATALOG_FIELDS = {
    "op": st.sampled_from(["upsert", "delete", "merge"]),
    "item_id": IDS,
    "title": st.one_of(st.just("Toy Story"), st.just(""), st.just("t" * 513)),
    "price": st.one_of(st.floats(-1, 100), st.just("9.99")),
    "in_stock": st.one_of(st.booleans(), st.just("yes"), st.just(1)),
    "tags": st.one_of(st.just(["a", "b"]), st.just([1, 2]), st.just(["t"] * 65)),
    "attributes": st.one_of(st.just({"colour": "red", "size": 3}), st.just({"nested": {"a": 1}})),
}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_perturbed({"op": "upsert", "item_id": "i1", "title": "Toy Story"}, CATALOG_FIELDS))
def test_catalog_operations(message: dict) -> None:
    _agree(CATALOG, CATALOG_SCHEMAS, message)


def test_a_request_without_request_id_is_refused_on_the_wire_and_defaulted_in_python() -> None:
    """The caller finds its answer by request_id: a wire request must carry one (schema and worker
    agree), while Python callers (SDK, gateway) get a fresh id by default and send it."""
    import pytest

    from recstream.contracts.events import RecommendationRequest

    message = {"user_id": "u1", "kind": "search", "query": "star wars"}
    assert not REQUEST_SCHEMA.is_valid(message)
    with pytest.raises(InvalidEvent) as refused:
        decode(REQUESTS, json.dumps(message).encode(), LIMIT)
    assert "request_id" in refused.value.detail
    assert decode(REQUESTS, json.dumps({**message, "request_id": "r1"}).encode(), LIMIT).request_id == "r1"
    sent = RecommendationRequest(user_id="u1")
    assert sent.request_id and decode(REQUESTS, sent.model_dump_json().encode(), LIMIT).request_id == sent.request_id

"""decode(): the one place every consumer turns bytes into contract models, and says why not."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recstream.contracts.events import BehaviourEvent, ItemDelete, ItemUpsert
from recstream.contracts.topics import BEHAVIOUR, CATALOG
from recstream.kafka.serde import InvalidEvent, decode, encode

LIMIT = 65_536


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty"),
        (b'{"type": "click", "user_id": ', "malformed_json"),
        (b"\xff\xfe not utf-8", "malformed_json"),
        (b"[1, 2]", "schema"),
        (b'{"type": "teleport", "user_id": "u", "item_id": "i"}', "schema"),
        (b'{"type": "click", "user_id": "u", "item_id": "i", "surprise": 1}', "schema"),
        (b'{"type": "view", "user_id": "u", "item_id": "' + b"x" * LIMIT + b'"}', "oversize"),
    ],
)
def test_refusals_carry_a_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(BEHAVIOUR, raw, LIMIT)
    assert info.value.reason == reason


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"type": "click", "user_id": "u", "item_id": "i", "position": "3"}', "position"),
        (b'{"type": "click", "user_id": "u", "item_id": "i", "propensity": true}', "propensity"),
        (b'{"type": "click", "user_id": "u", "item_id": "i", "ts_ms": 1e23}', "ts_ms"),
        (b'{"type": "click", "user_id": "u", "item_id": "i", "ts_ms": 253402300800000}', "ts_ms"),
        (b'{"type": "click", "user_id": "u", "item_id": "i", "model_version": "' + b"v" * 129 + b'"}', "model_version"),
    ],
)
def test_numbers_are_numbers_and_bounded(raw: bytes, field: str) -> None:
    """What the JSON Schema says is what the worker takes: no "3" for 3, no true for 1, no 1e23 ms."""
    with pytest.raises(InvalidEvent) as info:
        decode(BEHAVIOUR, raw, LIMIT)
    assert info.value.reason == "schema" and field in info.value.detail


def test_an_upsert_without_op_is_an_upsert_as_its_schema_says() -> None:
    event = decode(CATALOG, b'{"item_id": "i1", "title": "t", "price": 3}', LIMIT)
    assert isinstance(event, ItemUpsert) and event.price == 3.0
    with pytest.raises(InvalidEvent, match="in_stock"):
        decode(CATALOG, b'{"item_id": "i1", "title": "t", "in_stock": "yes"}', LIMIT)


def test_committed_json_schemas_are_what_the_models_say() -> None:
    """schemas/v1 is the contract non-Python apps read: it must be regenerated with every change
    (`make schemas`), and it states the search rule (kind=search needs a query)."""
    import json

    from recstream.contracts.export import render, schema_dir

    on_disk = {p.name: p.read_text() for p in schema_dir().glob("*.json")}
    assert on_disk == render(), "schemas/v1 is stale: run `make schemas`"
    request = json.loads(on_disk["recommendation_request.json"])
    assert request["then"]["required"] == ["query"]
    assert request["if"]["properties"]["kind"] == {"const": "search"}


def test_schema_errors_name_the_field() -> None:
    with pytest.raises(InvalidEvent) as info:
        decode(BEHAVIOUR, b'{"type": "click", "user_id": 4.5, "item_id": "i"}', LIMIT)
    assert "user_id" in info.value.detail


def test_a_catalog_tombstone_deletes_its_key_and_needs_one() -> None:
    """A null value on the compacted catalog topic is the usual Kafka delete: it means ItemDelete of
    its key. Without a valid key it is refused; on other topics a null is always refused."""
    assert decode(CATALOG, None, LIMIT, key=b"item-7") == ItemDelete(item_id="item-7")
    for key in (None, b"", b"has space", b"\xff"):
        with pytest.raises(InvalidEvent) as info:
            decode(CATALOG, None, LIMIT, key=key)
        assert info.value.reason == "empty" and "item_id" in info.value.detail
    with pytest.raises(InvalidEvent):
        decode(BEHAVIOUR, None, LIMIT, key=b"u1")


def test_catalog_union_is_discriminated_by_op() -> None:
    assert isinstance(decode(CATALOG, encode(ItemDelete(item_id="i1")), LIMIT), ItemDelete)
    assert isinstance(decode(CATALOG, encode(ItemUpsert(item_id="i1", title="t")), LIMIT), ItemUpsert)


@given(
    user=st.from_regex(r"[A-Za-z0-9_.:@\-]{1,40}", fullmatch=True),
    position=st.none() | st.integers(0, 1000),
    kind=st.sampled_from(["impression", "view", "click", "add_to_cart", "purchase"]),
)
def test_encode_decode_round_trip(user: str, position: int | None, kind: str) -> None:
    event = BehaviourEvent(type=kind, user_id=user, item_id="i", position=position)
    assert decode(BEHAVIOUR, encode(event), LIMIT) == event


def test_feedback_on_an_answer_carries_what_ties_it_to_the_answer() -> None:
    from recstream.contracts.events import RankedItem, RecommendationResult

    res = RecommendationResult(
        request_id="r9",
        user_id="u9",
        session_id="s9",
        model_version="3",
        items=[RankedItem(item_id=f"i{n}", score=1.0 - n, position=n, propensity=0.5) for n in range(3)],
    )
    shown = res.impressions()
    assert [(e.type, e.item_id, e.position) for e in shown] == [("impression", f"i{n}", n) for n in range(3)]
    click = res.feedback(res.items[2], "click")
    for ev in [*shown, click]:
        tie = (ev.request_id, ev.user_id, ev.session_id, ev.model_version, ev.propensity)
        assert tie == ("r9", "u9", "s9", "3", 0.5)
        assert decode(BEHAVIOUR, encode(ev), LIMIT) == ev  # valid on the behaviour topic's contract
    assert (click.type, click.item_id, click.position) == ("click", "i2", 2)


def test_the_sdk_refuses_what_the_worker_would_dead_letter_for_size() -> None:
    """One size limit: an event larger as a message than MAX_MESSAGE_BYTES is refused before it is
    sent (the gateway turns this into a 413), instead of being written and then dead-lettered."""
    from recstream.client.producer import EventProducer, MessageTooLarge
    from recstream.config import Settings

    producer = EventProducer(Settings(kafka_bootstrap="127.0.0.1:9", max_message_bytes=1024))
    try:
        small = producer.prepare("catalog", ItemUpsert(item_id="i1", title="t"))
        assert small.topic.endswith("catalog") and small.key == b"i1" and len(small.value) <= 1024
        with pytest.raises(MessageTooLarge, match="at most 1024"):
            producer.prepare("catalog", ItemUpsert(item_id="i1", title="t", description="d" * 2000))
    finally:
        producer.close(0)


def test_a_dead_letter_of_a_huge_key_still_fits_a_message() -> None:
    """The key travelled whole, twice (record key and key_b64): a 200 kB key on an 800 kB message
    made the dead letter too large to send, and the consumer stopped on it at every restart."""
    import base64

    from recstream.kafka.dead_letters import MAX_KEPT_KEY_BYTES, RefusedMessage, build_dead_letter, kept_key

    source = RefusedMessage("t.behaviour", 0, 7, b"k" * 200_000, b"v" * 600_000)
    letter = build_dead_letter(source, error="too large", error_type="oversize", worker="test")
    assert letter.key_truncated and base64.b64decode(letter.key_b64) == b"k" * MAX_KEPT_KEY_BYTES
    assert len(letter.model_dump_json()) + len(kept_key(source.key)) < 1_000_000
    small = build_dead_letter(RefusedMessage("t", 0, 1, b"u1", b"x"), error="e", error_type="schema", worker="w")
    assert not small.key_truncated and base64.b64decode(small.key_b64) == b"u1"

"""Kafka's partitioner, reimplemented for the worker's placement check: it must equal Java's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from recstream.contracts.events import BehaviourEvent, RecommendationRequest
from recstream.contracts.partitioning import murmur2, partition_for
from recstream.contracts.topics import BEHAVIOUR, CATALOG, REQUESTS
from recstream.kafka.serde import InvalidEvent, decode, encode

LIMIT = 65_536


@pytest.mark.parametrize(
    ("text", "java"),
    [  # Kafka's UtilsTest.testMurmur2 (signed 32-bit, as Java prints them)
        ("21", -973932308),
        ("foobar", -790332482),
        ("a-little-bit-long-string", -985981536),
        ("a-little-bit-longer-string", -1486304829),
        ("lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
        ("abc", 479470107),
    ],
)
def test_murmur2_is_kafkas(text: str, java: int) -> None:
    assert murmur2(text.encode()) == java & 0xFFFFFFFF


@given(st.binary(max_size=64), st.integers(1, 64))
def test_partitions_are_in_range(key: bytes, n: int) -> None:
    assert 0 <= partition_for(key, n) < n


def test_placement_is_checked_where_state_is_per_partition() -> None:
    event = BehaviourEvent(type="click", user_id="u1", item_id="i1")
    right = partition_for(b"u1", BEHAVIOUR.partitions)
    assert decode(BEHAVIOUR, encode(event), LIMIT, b"u1", right) == event
    assert decode(BEHAVIOUR, encode(event), LIMIT) == event  # an application's consumer: no check
    with pytest.raises(InvalidEvent) as info:
        decode(BEHAVIOUR, encode(event), LIMIT, b"u1", (right + 1) % BEHAVIOUR.partitions)
    assert info.value.reason == "wrong_partition" and "partitioner=murmur2_random" in info.value.detail
    for key in (b"u2", None):
        with pytest.raises(InvalidEvent) as info:
            decode(BEHAVIOUR, encode(event), LIMIT, key, right)
        assert info.value.reason == "wrong_key" and "user_id" in info.value.detail
    request = RecommendationRequest(user_id="u1")
    with pytest.raises(InvalidEvent, match="wrong_partition"):
        decode(REQUESTS, encode(request), LIMIT, b"u1", (partition_for(b"u1", 4) + 1) % 4)
    assert not CATALOG.keyed_placement  # compacted by item: any partitioner keeps an item in one place

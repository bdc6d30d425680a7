"""Turning contract models into bytes and back, with validation on both sides.

Every consumer decodes through `decode`, so the reasons a message is refused are the same
everywhere and end up, verbatim, in the dead-letter record.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from recstream.contracts.partitioning import PARTITIONER, partition_for
from recstream.contracts.topics import TopicSpec


class InvalidEvent(ValueError):
    """A message that cannot become a contract model. `reason` is a short machine-friendly tag."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def encode(model: BaseModel) -> bytes:
    return model.model_dump_json(exclude_none=False).encode()


def validate(spec: TopicSpec, value: BaseModel | dict[str, Any]) -> BaseModel:
    """Validate an outgoing value against the topic's schema; raises pydantic's ValidationError."""
    if isinstance(value, BaseModel):
        value = value.model_dump()
    return spec.adapter.validate_python(value)


def key_of(spec: TopicSpec, model: BaseModel) -> bytes | None:
    key = getattr(model, spec.key_field, None)
    return None if key is None else str(key).encode()


def decode(
    spec: TopicSpec, raw: bytes | None, max_bytes: int, key: bytes | None = None, partition: int | None = None
) -> BaseModel:
    """Bytes from the wire to a validated model, or InvalidEvent saying why not. A tombstone (null
    value) means what the topic's spec says it means (a catalog delete), given a valid key. Given the
    partition it arrived on, a keyed-placement topic's event must carry its key field as the key
    and sit on the partition Kafka's partitioner gives that key (recstream.contracts.partitioning)."""
    if raw is None:
        if spec.tombstone is None:
            raise InvalidEvent("empty", "message has no value (tombstone or null)")
        try:
            return spec.tombstone(key.decode("utf-8") if key else "")
        except (ValidationError, UnicodeDecodeError) as exc:
            raise InvalidEvent("empty", f"a tombstone needs the {spec.key_field} as its key, got {key!r}") from exc
    if len(raw) > max_bytes:
        raise InvalidEvent("oversize", f"{len(raw)} bytes > limit {max_bytes}")
    try:
        # validate_json parses and validates in one pass in pydantic-core: ~2.5x faster per event than
        # json.loads + validate_python, which matters at tens of thousands of behaviour events per second.
        model = spec.adapter.validate_json(raw)
    except ValidationError as exc:
        errors = exc.errors()
        if errors and errors[0]["type"] == "json_invalid":
            raise InvalidEvent("malformed_json", errors[0]["msg"]) from exc
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in errors[:5])
        raise InvalidEvent("schema", detail) from exc
    if partition is not None and spec.keyed_placement:
        check_placement(spec, model, key, partition)
    return model


def check_placement(spec: TopicSpec, model: BaseModel, key: bytes | None, partition: int) -> None:
    """InvalidEvent unless `key` is the model's key field and `partition` the one Kafka's murmur2
    partitioner gives it: state kept per partition must see every event of its key."""
    expected = key_of(spec, model)
    if key != expected:
        raise InvalidEvent(
            "wrong_key", f"the message key must be the event's {spec.key_field} {expected!r}, got {key!r}"
        )
    want = partition_for(key, spec.partitions)
    if partition != want:
        raise InvalidEvent(
            "wrong_partition",
            f"key {key!r} belongs on partition {want} (Kafka's murmur2 partitioner over {spec.partitions}), "
            f"arrived on {partition}: produce with Java's default partitioner or librdkafka's "
            f"partitioner={PARTITIONER} (kcat: -X partitioner={PARTITIONER})",
        )

"""Dead-letter handling: a refused message keeps its bytes, its origin and the reason.

Nothing is dropped silently: every refusal is produced to `<topic>.dlq` and counted in
`recstream_dead_letters_total{topic, reason, worker}`.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Protocol

from confluent_kafka import Message

from recstream.contracts.events import DeadLetter
from recstream.contracts.topics import dead_letter_topic
from recstream.telemetry import DEAD_LETTERS

log = logging.getLogger(__name__)

# Keep dead letters well under the broker's 1 MiB message limit even after base64 (+33%):
# a refused giant message must still leave a record, so its value is cut, and flagged as cut.
MAX_KEPT_VALUE_BYTES = 512 * 1024
# The key travels twice (the record's key and key_b64): a 200 kB key on an 800 kB message made the
# dead letter too large to send, and the consumer stopped on it at every restart. Keys are ids;
# a longer one is cut in both places, and flagged as cut.
MAX_KEPT_KEY_BYTES = 16 * 1024


class _Send(Protocol):
    def __call__(self, topic: str, key: bytes | None, value: bytes) -> None: ...


@dataclass(frozen=True)
class RefusedMessage:
    """Where a refused message came from and its raw bytes: everything needed to find or replay it."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    @classmethod
    def from_confluent(cls, msg: Message) -> RefusedMessage:
        return cls(msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value())


def kept_key(key: bytes | None) -> bytes | None:
    """The part of a refused message's key a dead letter keeps (and is keyed by)."""
    return key if key is None else key[:MAX_KEPT_KEY_BYTES]


def build_dead_letter(source: RefusedMessage, *, error: str, error_type: str, worker: str) -> DeadLetter:
    value = source.value or b""
    key = kept_key(source.key)
    return DeadLetter(
        source_topic=source.topic,
        partition=source.partition,
        offset=source.offset,
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        key_truncated=key != source.key,
        value_b64=base64.b64encode(value[:MAX_KEPT_VALUE_BYTES]).decode(),
        value_size=len(value),
        value_truncated=len(value) > MAX_KEPT_VALUE_BYTES,
        error=error[:4000],
        error_type=error_type,
        worker=worker,
    )


class DeadLetterSink:
    """Routes refused messages to their topic's dead-letter topic through any producer `send`."""

    def __init__(self, send: _Send, worker: str) -> None:
        self._send = send
        self.worker = worker

    def publish(self, source: RefusedMessage, *, error: str, error_type: str) -> DeadLetter:
        letter = build_dead_letter(source, error=error, error_type=error_type, worker=self.worker)
        topic = source.topic
        self._send(dead_letter_topic(topic), kept_key(source.key), letter.model_dump_json().encode())
        DEAD_LETTERS.labels(topic=topic, reason=error_type, worker=self.worker).inc()
        log.warning("dead-lettered %s[%d]@%d (%s): %s", topic, source.partition, source.offset, error_type, error[:200])
        return letter

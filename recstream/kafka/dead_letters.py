"""Dead-letter handling: a refused message keeps its bytes, its origin and the reason.

Nothing is dropped silently: every refusal is produced to `<topic>.dlq` and counted in
`recstream_dead_letters_total{topic, reason, worker}`.
"""

from __future__ import annotations

import base64
import logging
from typing import Protocol

from recstream.contracts.events import DeadLetter
from recstream.contracts.topics import dead_letter_topic
from recstream.metrics import DEAD_LETTERS

log = logging.getLogger(__name__)

# Keep dead letters well under the broker's 1 MiB message limit even after base64 (+33%):
# a refused giant message must still leave a record, so its value is cut, and flagged as cut.
MAX_KEPT_VALUE_BYTES = 512 * 1024


class _Send(Protocol):
    def __call__(self, topic: str, key: bytes | None, value: bytes) -> None: ...


def build_dead_letter(
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    error: str,
    error_type: str,
    worker: str,
) -> DeadLetter:
    return DeadLetter(
        source_topic=topic,
        partition=partition,
        offset=offset,
        key_b64=base64.b64encode(key).decode() if key is not None else None,
        value_b64=base64.b64encode((value or b"")[:MAX_KEPT_VALUE_BYTES]).decode(),
        value_size=len(value or b""),
        value_truncated=len(value or b"") > MAX_KEPT_VALUE_BYTES,
        error=error[:4000],
        error_type=error_type,
        worker=worker,
    )


class DeadLetterSink:
    """Routes refused messages to their topic's dead-letter topic through any producer `send`."""

    def __init__(self, send: _Send, worker: str) -> None:
        self._send = send
        self.worker = worker

    def publish(
        self,
        *,
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        error: str,
        error_type: str,
    ) -> DeadLetter:
        letter = build_dead_letter(
            topic=topic,
            partition=partition,
            offset=offset,
            key=key,
            value=value,
            error=error,
            error_type=error_type,
            worker=self.worker,
        )
        self._send(dead_letter_topic(topic), key, letter.model_dump_json().encode())
        DEAD_LETTERS.labels(topic=topic, reason=error_type, worker=self.worker).inc()
        log.warning("dead-lettered %s[%d]@%d (%s): %s", topic, partition, offset, error_type, error[:200])
        return letter

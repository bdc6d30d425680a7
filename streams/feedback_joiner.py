"""Impressions joined with later clicks/purchases of the same request_id + item -> TrainingExample.

State lives in the `impressions` table (key `request_id|item_id`, changelogged, so a restart keeps
open windows). An outcome inside the window sets the labels; a timer closes due windows and emits
one example per impression (label 0 when nothing followed). Windows use processing time: the
join waits for events that are still in flight, which event time alone cannot bound.
"""

from __future__ import annotations

import logging
import time

from recstream.contracts.events import BehaviourType
from recstream.contracts.topics import BEHAVIOUR
from recstream.kafka.serde import encode
from recstream.metrics import STAGE_LATENCY
from recstream.recommend.feedback import POSITIVE, PendingImpression, impression_key
from streams.app import RAW_SCHEMA, StreamContext, source_topic
from streams.session_features import read_session

log = logging.getLogger(__name__)

TABLE = "impressions"
BATCH_MAX = 5000
BATCH_WITHIN_S = 0.05
#: Windows are checked 4x a second: examples are for training, a 250 ms delay is irrelevant.
TICK_S = 0.25


def register(ctx: StreamContext) -> None:
    table = ctx.app.Table(
        TABLE, default=None, partitions=BEHAVIOUR.partitions, schema=RAW_SCHEMA, key_type=bytes,
        value_type=bytes,
    )
    ctx.tables[TABLE] = table
    window_ms = int(ctx.feedback_window_s * 1000)
    # key -> (deadline_ms, partition): lets the timer find due windows without decoding the table.
    deadlines: dict[bytes, tuple[int, int]] = {}
    state = {"indexed": False}

    def put(key: bytes, pending: PendingImpression) -> None:
        raw = pending.to_bytes()
        table.data[key] = raw
        table.send_changelog(pending.partition, key, raw, key_serializer="raw", value_serializer="raw")
        deadlines[key] = (pending.deadline_ms, pending.partition)

    @ctx.app.agent(source_topic(ctx, "behaviour"), name="feedback-joiner")
    async def feedback_joiner(stream) -> None:
        async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
            t0 = time.perf_counter()
            now = int(time.time() * 1000)
            owner = "features" not in ctx.agents  # else the features agent dead-letters behaviour
            if not owner:
                # Most behaviour has no request id and cannot join; skip it before the (costly)
                # validation. Our encoder always writes the field, so the bytes test is exact.
                events = [ev for ev in events if b'"request_id":null' not in (ev.message.value or b"")]
            for ev, m in ctx.decode_events(BEHAVIOUR, events, owner=owner):
                if m.request_id is None:
                    continue
                key = impression_key(m.request_id, m.item_id).encode()
                if m.type == BehaviourType.impression:
                    if key in table.data:
                        continue  # a replayed impression: its window is already open
                    session = read_session(ctx, m.user_id) if "sessions" in ctx.tables else None
                    pending = PendingImpression.from_event(
                        m, now_ms=now, window_ms=window_ms, partition=ev.message.partition,
                        context_items=session.recent if session is not None else [],
                    )
                    if pending is not None:
                        put(key, pending)
                elif m.type.value in POSITIVE:
                    raw = table.data.get(key)
                    if raw is None:
                        continue  # outcome without a known impression (or after its window): no label
                    pending = PendingImpression.from_bytes(raw)
                    if pending.record(m.type.value):
                        put(key, pending)
            STAGE_LATENCY.labels(stage="feedback_batch").observe(time.perf_counter() - t0)

    @ctx.app.timer(TICK_S)
    async def close_windows() -> None:
        if not state["indexed"]:
            if not ctx.app.tables.recovery.completed.is_set():
                return
            # After recovery the table holds windows opened before a restart: index them once.
            for key, raw in list(table.data.items()):
                p = PendingImpression.from_bytes(raw)
                deadlines[key] = (p.deadline_ms, p.partition)
            state["indexed"] = True
        now = int(time.time() * 1000)
        due = [k for k, (deadline, _) in deadlines.items() if deadline <= now]
        for key in due:
            _, partition = deadlines.pop(key)
            raw = table.data.pop(key, None)
            if raw is None:
                continue
            example = PendingImpression.from_bytes(raw).to_example()
            ctx.send("training-examples", example.user_id.encode(), encode(example))
            # Tombstone: the window is closed, recovery must not reopen it.
            table.send_changelog(partition, key, None, key_serializer="raw", value_serializer="raw")
        if due:
            log.debug("feedback: closed %d windows", len(due))

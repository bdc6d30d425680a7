"""Impressions joined with later clicks/purchases of the same request_id + item -> TrainingExample.

Fed in batches by streams.behaviour, before the session features fold the same batch, so an
example's context is the session as it was before its own batch (never the clicks it is labelled
with). State lives in the `impressions` table (key `request_id|item_id`, changelogged, so a restart
keeps open windows). An outcome inside the window sets the labels; `tick` closes due windows and
emits one example per impression (label 0 when nothing followed). Windows use processing time: the
join waits for events that are still in flight, which event time alone cannot bound.
"""

from __future__ import annotations

import logging
import time

from recstream.contracts.events import BehaviourType
from recstream.contracts.topics import BEHAVIOUR, TOPICS
from recstream.explore.feedback import POLICY_SAVE_S
from recstream.kafka.serde import encode
from recstream.recommend.feedback import POSITIVE, PendingImpression, impression_key
from recstream.telemetry import STAGE_LATENCY
from streams.changelog import ChangelogTable, changelog_topic
from streams.context import StreamContext
from streams.naming import app_id
from streams.state import read_session, search_queries

log = logging.getLogger(__name__)

TABLE = "impressions"


class FeedbackJoiner:
    """The feedback processor of the behaviour consumer (its tick runs on the same thread)."""

    def __init__(self, ctx: StreamContext) -> None:
        self.ctx = ctx
        self.table = ChangelogTable(TABLE, changelog_topic(app_id(ctx.settings), TABLE), BEHAVIOUR.partitions)
        ctx.tables[TABLE] = self.table
        self.tables = [self.table]
        self.window_ms = int(ctx.settings.feedback_window_s * 1000)
        self.queries = search_queries(ctx)
        self.examples_topic = TOPICS["training-examples"].name(ctx.settings.topic_prefix)
        # key -> (deadline_ms, partition): lets the tick find due windows without decoding the table.
        self.deadlines: dict[bytes, tuple[int, int]] = {}
        # The exploration policy learns from the outcomes of this worker's own answers (ts:/lift:).
        self.policy_feedback = ctx.policy_feedback if "recommender" in ctx.agents else None
        self.next_policy_save = time.monotonic() + POLICY_SAVE_S

    def recovered(self) -> None:
        """Index the windows opened before a restart. Each gets at least a full window from now:
        their outcomes may wait unread in the backlog behind the committed offset, and the first
        tick runs before that backlog is read, so a window that closed while the worker was down
        would be emitted unclicked and its click then dropped as unknown."""
        reopen_ms = int(time.time() * 1000) + self.window_ms
        for key, raw in list(self.table.data.items()):
            p = PendingImpression.from_bytes(raw)
            self.deadlines[key] = (max(p.deadline_ms, reopen_ms), p.partition)

    def revoked(self, partitions: list[int]) -> None:
        """Windows of partitions another worker now owns are closed there, not here."""
        gone = set(partitions)
        for key in [k for k, (_, p) in self.deadlines.items() if p in gone]:
            del self.deadlines[key]
            self.table.data.pop(key, None)

    def _put(self, key: bytes, pending: PendingImpression) -> None:
        self.table.put(pending.partition, key, pending.to_bytes())
        indexed = self.deadlines.get(key, (0, 0))[0]  # a recovered window's reopened deadline holds
        self.deadlines[key] = (max(pending.deadline_ms, indexed), pending.partition)

    def process(self, batch) -> None:
        t0 = time.perf_counter()
        now = int(time.time() * 1000)
        data = self.table.data
        have_sessions = "sessions" in self.ctx.tables
        for rec in batch:
            m = rec.event
            if m.request_id is None:  # most behaviour has no request id and cannot join
                continue
            key = impression_key(m.request_id, m.item_id).encode()
            if m.type == BehaviourType.impression:
                if key in data:
                    continue  # a replayed impression: its window is already open
                session = read_session(self.ctx, m.user_id) if have_sessions else None
                pending = PendingImpression.from_event(
                    m,
                    now_ms=now,
                    window_ms=self.window_ms,
                    partition=rec.partition,
                    context_items=session.recent if session is not None else [],
                    query=self.queries.get(m.request_id),
                )
                if pending is not None:
                    self._put(key, pending)
            elif m.type.value in POSITIVE:
                raw = data.get(key)
                if raw is None:
                    continue  # outcome without a known impression (or after its window): no label
                pending = PendingImpression.from_bytes(raw)
                if pending.record(m.type.value):
                    self._put(key, pending)
        STAGE_LATENCY.labels(stage="feedback_batch").observe(time.perf_counter() - t0)

    def tick(self) -> None:
        """Close due windows: emit their examples, then tombstone them (recovery must not reopen)."""
        now = int(time.time() * 1000)
        due = [k for k, (deadline, _) in self.deadlines.items() if deadline <= now]
        for key in due:
            _, partition = self.deadlines.pop(key)
            raw = self.table.data.get(key)
            if raw is None:
                continue
            example = PendingImpression.from_bytes(raw).to_example()
            self.ctx.behaviour.produce(self.examples_topic, example.user_id.encode(), encode(example))
            self.table.delete(partition, key)
            if self.policy_feedback is not None:
                self.policy_feedback.observe(example.request_id, example.item_id, example.position, example.label)
        if due:
            log.debug("feedback: closed %d windows", len(due))
        fb = self.policy_feedback
        if fb is not None and fb.unsaved and time.monotonic() >= self.next_policy_save:
            self.next_policy_save = time.monotonic() + POLICY_SAVE_S
            self.ctx.save_policy_state()

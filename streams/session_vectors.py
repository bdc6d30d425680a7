"""Session vectors of the users who are asking, kept fresh between their requests.

The session encoder is a transformer served by Triton; asking it at request time costs every
request batch a second Triton round trip before retrieval (retrieval needs the vector, so it cannot
share the ranker's call). Instead, a background thread re-encodes, every SESSION_REFRESH_S (settings), the sessions of
users who asked in the last ACTIVE_S whose state changed since their vector was computed, all in one
call. A request then finds its vector ready unless the user acted in the last few tens of
milliseconds; those (and first requests) are encoded in the request batch's own call.

A vector is used only for exactly the state it was computed from (the state's last applied
offset), so precomputing never serves a stale session. Vectors live in memory only: after a
restart they are recomputed on demand.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from recstream.recommend.session import SessionState

log = logging.getLogger(__name__)

#: A user counts as active this long after a request.
ACTIVE_S = 300.0
#: Most sessions one refresh encodes (the rest are encoded when they ask, or at the next refresh).
MAX_PER_REFRESH = 128
#: After a failed refresh the next waits this long, doubling per failure up to the maximum.
REFRESH_BACKOFF_MIN_S = 0.5
REFRESH_BACKOFF_MAX_S = 8.0
#: The session's most recent items whose categories make its category affinity (as in training).
AFFINITY_WINDOW = 20


def session_history(ctx: Any, state: SessionState, depth: int) -> tuple[np.ndarray | None, list[str]]:
    """The session encoder's input, the vectors of the session's last `depth` items as stored
    (oldest first; items the store does not know are skipped), and the categories of its last
    AFFINITY_WINDOW items (the ranker's affinity features; "" where unknown)."""
    lookup = ctx.tables.get("_item_lookup")
    recent = state.recent[-max(depth, AFFINITY_WINDOW) :]
    if lookup is None or not recent:
        return None, []
    known = lookup.get_many(set(recent))
    # "" for an item without a known category: it keeps its place in the window, as in training
    categories = [known[i][1] or "" for i in recent[-AFFINITY_WINDOW:]]
    if depth <= 0:
        return None, categories
    vectors = [known[i][0] for i in recent[-depth:] if known[i][0] is not None]
    return (np.stack(vectors) if vectors else None), categories


class SessionVectors:
    """user_id -> (state offset, session vector), refreshed for active users by one thread."""

    def __init__(self, ctx: Any, encoder: Any) -> None:
        self.ctx = ctx
        self.encoder = encoder
        self.vectors: dict[str, tuple[int, str, np.ndarray]] = {}  # user -> (offset, encoder version, vector)
        self.active: dict[str, float] = {}
        # users whose state changed since the last refresh (the session features processor adds them)
        self.dirty: set[str] = set()
        self._dirty_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_expiry = 0.0  # when request-time encoding (no refresh thread) next forgets idle users
        # After a failed refresh the next ones wait, doubling up to REFRESH_BACKOFF_MAX_S: a busy box
        # that cannot fit the batch in the deadline must not be sent it again every 50 ms.
        self._backoff_s = 0.0
        self._resume_at = 0.0

    def version(self) -> str | None:
        """The session-encoder version for the store's current item vectors (None: do not encode)."""
        from streams.inference import matching_session_version

        return matching_session_version(self.ctx.store.tag)

    def lookup(self, user_id: str, state: SessionState, version: str) -> np.ndarray | None:
        """The vector of exactly this state by this encoder version, if computed; marks the user active."""
        self.active[user_id] = time.monotonic()
        hit = self.vectors.get(user_id)
        return hit[2] if hit is not None and hit[0] == state.last_offset and hit[1] == version else None

    def changed(self, user_ids: list[str]) -> None:
        """Called by the session features processor with the users a behaviour batch touched."""
        if self._thread is None:
            return
        with self._dirty_lock:
            self.dirty.update(user_ids)

    def store(self, user_id: str, state: SessionState, version: str, vector: np.ndarray) -> None:
        self.vectors[user_id] = (state.last_offset, version, vector)
        if self._thread is None:  # no refresh thread forgets idle users: do it here, now and then
            now = time.monotonic()
            if now >= self._next_expiry:
                self._next_expiry = now + ACTIVE_S / 10
                self._expire(now)

    def _expire(self, now: float) -> None:
        """Forget users who have not asked for ACTIVE_S: one vector per user ever seen otherwise."""
        for user in [u for u, t in list(self.active.items()) if now - t > ACTIVE_S]:
            self.active.pop(user, None)
            self.vectors.pop(user, None)

    def start(self) -> SessionVectors:
        if self.ctx.settings.session_refresh_s <= 0:
            return self  # request-time encoding only
        self._thread = threading.Thread(target=self._run, name="session-vectors", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.ctx.settings.session_refresh_s):
            try:
                self.refresh()
            except Exception as exc:  # Triton down or busy: requests encode for themselves meanwhile
                log.debug("session vector refresh skipped: %s", exc)

    def refresh(self) -> int:
        """Re-encode the changed sessions of active users; returns how many were encoded."""
        from streams.state import read_session

        now = time.monotonic()
        self._expire(now)
        version = self.version()
        if version is None or now < self._resume_at:
            return 0
        todo: list[tuple[str, SessionState, np.ndarray]] = []
        with self._dirty_lock:
            dirty, self.dirty = self.dirty, set()
        candidates = [u for u in dirty if u in self.active]
        for n, user in enumerate(candidates):
            if len(todo) >= MAX_PER_REFRESH:
                self.changed(candidates[n:])  # the next refresh takes them
                break
            state = read_session(self.ctx, user)
            if state is None:
                continue
            hit = self.vectors.get(user)
            if hit is not None and hit[0] == state.last_offset and hit[1] == version:
                continue
            history, _ = session_history(self.ctx, state, self.encoder.max_history)
            if history is not None:
                todo.append((user, state, history))
        if not todo:
            return 0
        try:
            vectors = self.encoder.encode(
                [h for _, _, h in todo], self.ctx.settings.triton_timeout_s, version, background=True
            )
        except Exception:
            self.changed([user for user, _, _ in todo])  # tried again once the backoff has passed
            self._backoff_s = min(max(2 * self._backoff_s, REFRESH_BACKOFF_MIN_S), REFRESH_BACKOFF_MAX_S)
            self._resume_at = time.monotonic() + self._backoff_s
            raise
        self._backoff_s = 0.0
        for (user, state, _), vec in zip(todo, vectors, strict=True):
            self.store(user, state, version, vec)
        return len(todo)

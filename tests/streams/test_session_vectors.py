"""Session vectors of active users (streams.session_vectors): used only for exactly the state and
encoder version they were computed from, refreshed in one batch for the users whose sessions changed."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from recstream.config import Settings
from recstream.recommend.breaker import CircuitBreaker
from recstream.recommend.session import SessionState
from streams.session_vectors import AFFINITY_WINDOW, SessionVectors, session_history


class _Lookup:
    """item id -> (vector, category), like streams.state.ItemLookup."""

    def __init__(self, n: int) -> None:
        rng = np.random.default_rng(0)
        self.vectors = {str(i): rng.normal(size=384).astype(np.float32) for i in range(n)}

    def get_many(self, ids: set[str]) -> dict[str, tuple[np.ndarray | None, str | None]]:
        return {i: (self.vectors.get(i), f"c{int(i) % 3}" if i in self.vectors else None) for i in ids}


class _Encoder:
    max_history = 5

    def __init__(self, fail: int = 0) -> None:
        self.calls: list[tuple[int, str]] = []
        self.fail = fail
        self.background: list[bool] = []

    def encode(self, histories, timeout_s: float, version: str = "", background: bool = False) -> np.ndarray:
        self.calls.append((len(histories), version))
        self.background.append(background)
        if self.fail:
            self.fail -= 1
            raise RuntimeError("Triton busy")
        return np.stack([np.asarray(h).sum(0) for h in histories])


def _ctx(states: dict[str, SessionState], tag: str = "item_encoder-v3"):
    cache = {k.encode(): (b"raw", s) for k, s in states.items()}
    table = SimpleNamespace(data={k.encode(): b"raw" for k in states})
    return SimpleNamespace(
        settings=Settings(session_refresh_s=0.05),
        store=SimpleNamespace(tag=tag),
        tables={"sessions": table, "_session_cache": cache, "_item_lookup": _Lookup(40)},
    )


def test_history_is_the_last_items_known_to_the_store_oldest_first():
    ctx = _ctx({})
    state = SessionState(recent=["1", "2", "999", "3", "4", "5", "6"] + [str(i) for i in range(10, 30)])
    history, categories = session_history(ctx, state, depth=5)
    want = [ctx.tables["_item_lookup"].vectors[i] for i in ["25", "26", "27", "28", "29"]]
    np.testing.assert_array_equal(history, np.stack(want))
    assert len(categories) == AFFINITY_WINDOW
    assert session_history(ctx, state, depth=0)[0] is None  # no session encoder: no vectors gathered


def test_a_vector_serves_only_its_own_state_and_version():
    a = SessionState(last_offset=7, recent=["1", "2"])
    ctx = _ctx({"a": a})
    vectors = SessionVectors(ctx, _Encoder())
    assert vectors.lookup("a", a, "3") is None
    vectors.store("a", a, "3", np.ones(384, np.float32))
    assert vectors.lookup("a", a, "3") is not None
    assert vectors.lookup("a", SessionState(last_offset=8, recent=["1", "2", "3"]), "3") is None  # newer state
    assert vectors.lookup("a", a, "4") is None  # another encoder version


def test_refresh_encodes_changed_sessions_of_active_users_in_one_call():
    states = {u: SessionState(last_offset=1, recent=["1", "2", str(n + 3)]) for n, u in enumerate("abcd")}
    ctx = _ctx(states)
    encoder = _Encoder()
    vectors = SessionVectors(ctx, encoder)
    vectors._thread = object()  # as if started: changes are tracked
    for u in "abc":  # c, d never asked: not active
        vectors.lookup(u, states[u], "3")
    vectors.changed(["a", "b", "d"])
    assert vectors.refresh() == 2 and encoder.calls == [(2, "3")]  # a and b, one call, pinned version
    assert vectors.lookup("a", states["a"], "3") is not None and vectors.lookup("c", states["c"], "3") is None
    assert vectors.refresh() == 0 and len(encoder.calls) == 1  # nothing changed since
    ctx.store.tag = "text_encoder-v1"  # zero-shot vectors: the session encoder must not be used
    vectors.changed(["a"])
    assert vectors.version() is None and vectors.refresh() == 0


def test_without_the_refresh_thread_idle_users_are_still_forgotten(monkeypatch):
    """SESSION_REFRESH_S=0 (request-time encoding only) starts no refresh thread, which is what
    forgot users idle for ACTIVE_S: every user who ever asked kept a vector for the worker's life."""
    import time

    import streams.session_vectors as sv

    monkeypatch.setattr(sv, "ACTIVE_S", 0.2)
    ctx = _ctx({})
    ctx.settings = Settings(session_refresh_s=0)
    vectors = SessionVectors(ctx, _Encoder()).start()
    vec = np.ones(384, np.float32)
    for n in range(50):
        state = SessionState(last_offset=n, recent=["1"])
        vectors.lookup(f"u{n}", state, "v1")
        vectors.store(f"u{n}", state, "v1", vec)
    time.sleep(0.3)
    late = SessionState(last_offset=99, recent=["1"])
    vectors.lookup("late", late, "v1")
    vectors.store("late", late, "v1", vec)
    assert set(vectors.vectors) == {"late"} and set(vectors.active) == {"late"}
    assert vectors.lookup("late", late, "v1") is vec


def test_a_failed_refresh_is_tried_again_and_keeps_off_the_live_breaker():
    """The refresh's batch failed (Triton busy): its users stay due for the next refresh (they
    were dropped until their sessions changed again), and the call was a background one, which
    the session encoder does not count against live requests' breaker."""
    states = {u: SessionState(last_offset=1, recent=["1", "2"]) for u in "ab"}
    encoder = _Encoder(fail=1)
    vectors = SessionVectors(_ctx(states), encoder)
    vectors._thread = object()
    for u in "ab":
        vectors.lookup(u, states[u], "3")
    vectors.changed(["a", "b"])
    with pytest.raises(RuntimeError):
        vectors.refresh()
    assert vectors.refresh() == 0 and len(encoder.calls) == 1  # backing off: not sent again at once
    vectors._resume_at = 0.0  # the backoff has passed
    assert vectors.refresh() == 2 and encoder.background == [True, True]
    assert vectors._backoff_s == 0.0  # a success ends the backoff


def test_background_session_encodes_do_not_open_the_breaker_but_respect_it():
    import tritonclient.grpc as grpcclient

    from recstream.serving.triton_client import TritonUnavailable
    from streams.inference import ModelUnavailable, TritonSessionEncoder

    class Client:
        calls = 0

        def infer(self, *args, **kwargs):
            Client.calls += 1
            raise TritonUnavailable("deadline exceeded")

    enc = object.__new__(TritonSessionEncoder)
    enc._tc, enc._client, enc.model = grpcclient, Client(), "session_encoder"  # no server: calls fail
    enc.breaker, enc.max_history, enc.max_batch, enc.version = CircuitBreaker(), 5, 64, ""
    history = [np.ones((2, 384), np.float32)]
    for _ in range(5):
        with pytest.raises(ModelUnavailable):
            enc.encode(history, 0.25, "3", background=True)
    assert enc.breaker.failures == 0 and not enc.breaker.refusing()  # live requests unaffected
    for _ in range(3):
        with pytest.raises(ModelUnavailable):
            enc.encode(history, 0.25, "3")
    assert enc.breaker.refusing()  # live calls failing: the breaker opens
    calls = Client.calls
    with pytest.raises(ModelUnavailable):
        enc.encode(history, 0.25, "3", background=True)
    assert Client.calls == calls  # and the background refresh backs off without calling

"""The catalog agent re-embeds for a new item encoder only once the session encoder of the same
version is loaded: requests pin the session encoder to the item vectors' version."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import streams.catalog_indexer as indexer


def test_the_switch_waits_for_the_matching_session_encoder(monkeypatch) -> None:
    """item_encoder v2 is served before session_encoder v2 loads (the README has the operator load
    them one by one; a session export may have failed): switching then failed every session encode
    and answered everything degraded until it loaded."""
    rebuilt: list[str] = []
    store = SimpleNamespace(tag="item_encoder-v1", dim=384, count=lambda: 3)
    store.rebuild = lambda tag, payloads, vectors: rebuilt.append(tag)
    ready = {"2": False}
    session = SimpleNamespace(ready=lambda version: ready.get(version, False))

    async def in_thread(fn, *args):
        return fn(*args)

    ctx = SimpleNamespace(
        item_embedder=SimpleNamespace(served_tag=lambda: "item_encoder-v2"),
        store=store,
        session_encoder=session,
        in_thread=in_thread,
        settings=None,
        tables={},
    )
    monkeypatch.setattr(indexer, "read_to_end", lambda *args: ([], 0))
    monkeypatch.setattr(indexer, "REEMBED_CHECK_S", 0.0)
    follower = indexer.EncoderFollower(ctx)  # type: ignore[arg-type]
    asyncio.run(follower.check())
    assert rebuilt == [] and follower.waiting_for == "item_encoder-v2"
    ready["2"] = True
    asyncio.run(follower.check())
    assert rebuilt == ["item_encoder-v2"] and follower.waiting_for is None
    ctx.session_encoder = None  # no session encoder served: nothing to wait for
    store.tag, rebuilt[:] = "item_encoder-v1", []
    asyncio.run(follower.check())
    assert rebuilt == ["item_encoder-v2"]

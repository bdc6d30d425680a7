"""StreamContext opens each handle once even when threads ask for it at the same moment: start-up
opens handles while the consumer threads already run, and a second Qdrant local client on the same
folder is refused, a second producer leaks unflushed messages."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from confluent_kafka import Producer

from recstream.config import Settings
from streams.context import StreamContext

THREADS = 8


def _open_together(ctx: StreamContext, name: str) -> tuple[list[object], list[BaseException]]:
    barrier = threading.Barrier(THREADS)
    handles: list[object] = []
    errors: list[BaseException] = []

    def open_handle() -> None:
        barrier.wait()
        try:
            handles.append(getattr(ctx, name))
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_handle) for _ in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return handles, errors


class _SlowProducer(Producer):
    """A real producer whose construction takes as long as on a busy box, counted: the race window
    of building one is otherwise too short to show."""

    built = 0

    def __init__(self, config: dict) -> None:
        time.sleep(0.05)
        type(self).built += 1
        super().__init__(config)


def test_racing_threads_share_one_vector_store_and_one_producer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("streams.context.Producer", _SlowProducer)
    settings = Settings(run_dir=tmp_path / "run", qdrant_path=tmp_path / "qdrant")
    ctx = StreamContext(settings=settings, worker="w", agents=())
    try:
        for name in ("producer", "store"):
            handles, errors = _open_together(ctx, name)
            assert not errors, f"{name}: {errors[:2]}"
            assert len(handles) == THREADS and len({id(h) for h in handles}) == 1, name
        assert _SlowProducer.built == 1
        assert ctx.store.count() == 0  # the one client works
    finally:
        ctx.close()


def test_a_cancelled_caller_waits_for_its_blocking_call_to_end(tmp_path: Path) -> None:
    """A stop cancels a catalog batch awaiting a store write; the write's thread cannot be
    interrupted, so the batch must end only after it: the worker closes the store next."""
    ctx = StreamContext(settings=Settings(run_dir=tmp_path / "run"), worker="w", agents=())
    started, ended = threading.Event(), threading.Event()

    def write() -> None:
        started.set()
        time.sleep(0.5)
        ended.set()

    async def batch() -> None:
        await ctx.in_thread(write)

    async def stop_midway() -> bool:
        task = asyncio.ensure_future(batch())
        while not started.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ended.is_set()

    try:
        assert asyncio.run(stop_midway()), "the cancelled batch ended while its write was still running"
    finally:
        ctx.close()

"""StreamContext opens each handle once even when threads ask for it at the same moment: start-up
opens handles while the consumer threads already run, and a second Qdrant local client on the same
folder is refused, a second producer leaks unflushed messages."""

from __future__ import annotations

import threading
from pathlib import Path

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


def test_racing_threads_share_one_vector_store_and_one_producer(tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path / "run", qdrant_path=tmp_path / "qdrant")
    ctx = StreamContext(settings=settings, worker="w", agents=())
    try:
        for name in ("store", "producer"):
            handles, errors = _open_together(ctx, name)
            assert not errors, f"{name}: {errors[:2]}"
            assert len(handles) == THREADS and len({id(h) for h in handles}) == 1, name
        assert ctx.store.count() == 0  # the one client works
    finally:
        ctx.close()

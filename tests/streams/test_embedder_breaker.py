"""The text embedder's circuit breaker belongs to online queries: bulk catalog encodes (which retry
on their own schedule) must neither open it when they time out nor close it when they succeed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from recstream.config import Settings
from streams.inference import ModelUnavailable, TritonTextEmbedder


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_bulk_encodes_leave_the_online_breaker_alone(tmp_path: Path) -> None:
    settings = Settings(run_dir=tmp_path, triton_grpc_url=f"127.0.0.1:{_closed_port()}")
    embedder = TritonTextEmbedder(settings)
    try:
        for _ in range(embedder.breaker.threshold + 1):
            with pytest.raises(ModelUnavailable):
                embedder.encode(["a catalog item"], 0.5, use_breaker=False, item_ids=None)
        assert embedder.breaker.allow() and embedder.breaker.failures == 0
        for _ in range(embedder.breaker.threshold):
            with pytest.raises(ModelUnavailable):
                embedder.encode(["a query"], 0.5)
        assert not embedder.breaker.allow(), "online failures must open the breaker"
    finally:
        embedder.close()

"""The text embedder's circuit breaker belongs to online queries: bulk catalog encodes (which retry
on their own schedule) must neither open it when they time out nor close it when they succeed."""

from __future__ import annotations

from pathlib import Path

import pytest

from recstream.config import Settings
from streams.inference import ModelUnavailable, TritonTextEmbedder


def test_bulk_encodes_leave_the_online_breaker_alone(tmp_path: Path, free_port: int) -> None:
    settings = Settings(run_dir=tmp_path, triton_grpc_url=f"127.0.0.1:{free_port}")
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


@pytest.mark.triton
def test_a_refused_request_is_told_apart_from_an_unreachable_triton(
    triton_server, tmp_path: Path, free_port: int
) -> None:
    """Item ids sent to the plain text_encoder (it takes no ITEM_ID input): Triton rejects the
    request itself, which retrying cannot fix; the catalog indexer says so instead of 'unavailable'."""
    from recstream.contracts.models import TEXT_ENCODER
    from streams.inference import ModelRefused

    live = TritonTextEmbedder(Settings(run_dir=tmp_path, triton_grpc_url=triton_server.grpc_url), model=TEXT_ENCODER)
    down = TritonTextEmbedder(Settings(run_dir=tmp_path, triton_grpc_url=f"127.0.0.1:{free_port}"))
    try:
        assert live.encode(["an item"], 30.0, use_breaker=False).shape == (1, 384)
        with pytest.raises(ModelRefused, match="ITEM_ID"):
            live.encode(["an item"], 30.0, use_breaker=False, item_ids=["i1"])
        with pytest.raises(ModelUnavailable) as unreachable:
            down.encode(["an item"], 0.5, use_breaker=False)
        assert not isinstance(unreachable.value, ModelRefused)
    finally:
        live.close()
        down.close()

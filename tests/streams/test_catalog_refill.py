"""An index that comes back empty while its catalog group has committed offsets (a wiped folder, a
fresh Qdrant server behind QDRANT_URL) is refilled from the compacted catalog topic: the consumer
resumes after its committed offsets and would never index those items again."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import streams.catalog_indexer as indexer
from recstream.client import EventConsumer, EventProducer
from recstream.config import Settings
from recstream.contracts.events import ItemUpsert
from recstream.vectorstore import VectorStore
from streams.naming import catalog_group

pytestmark = pytest.mark.kafka


class _Embedder:
    def served_tag(self) -> str:
        return "text_encoder-v1"

    def encode(self, texts, timeout_s, use_breaker=True, item_ids=None) -> np.ndarray:
        return np.random.default_rng(len(texts)).normal(size=(len(texts), 384)).astype(np.float32)


def _follow(settings: Settings, store: VectorStore) -> None:
    async def in_thread(fn, *args):
        return fn(*args)

    embedder = _Embedder()
    ctx = SimpleNamespace(
        settings=settings, store=store, item_embedder=embedder, embedder=embedder, session_encoder=None, tables={}
    )
    ctx.in_thread = in_thread
    asyncio.run(indexer.EncoderFollower(ctx).check())  # type: ignore[arg-type]


def test_an_index_that_comes_back_empty_is_refilled(make_settings: Callable[..., Settings], tmp_path: Path) -> None:
    settings = make_settings(qdrant_path=tmp_path / "first")
    with EventProducer(settings) as producer:
        producer.send_many("catalog", [ItemUpsert(item_id=f"i{n}", title=f"Item {n}") for n in range(30)])

    fresh = VectorStore(settings)  # a first start: nothing consumed yet, the consumer will index it all
    try:
        _follow(settings, fresh)
        assert fresh.tag == "text_encoder-v1" and fresh.count() == 0
    finally:
        fresh.close()

    consumer = EventConsumer(settings, ["catalog"], group_id=catalog_group(settings))
    got = 0
    while got < 30:
        got += len(consumer.poll(100, 0.5))
    consumer.commit()  # the items were indexed once, into a folder that is then wiped
    consumer.close()
    shutil.rmtree(tmp_path / "first")  # the index folder is wiped; the group's offsets stay
    wiped = VectorStore(settings)
    try:
        _follow(settings, wiped)
        assert wiped.tag == "text_encoder-v1" and wiped.count() == 30
    finally:
        wiped.close()

"""A worker stopping while Triton is down: the catalog consumer is retrying an item it cannot embed.
The stop must not wait for Triton (the old loop retried until the 30 s join gave up and left the
thread running), and the item must not count as indexed: its offset stays uncommitted, so the next
start indexes it. Real Kafka, real Qdrant local store, a Triton address nothing listens on."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, TopicPartition
from prometheus_client import REGISTRY

from recstream.client import EventProducer
from recstream.config import Settings
from recstream.contracts.events import ItemUpsert
from recstream.contracts.models import TEXT_ENCODER
from recstream.contracts.topics import CATALOG
from streams.catalog import CatalogLoop
from streams.catalog_indexer import CatalogIndexer
from streams.consumer_threads import consumer_config
from streams.context import StreamContext
from streams.naming import catalog_group

pytestmark = pytest.mark.kafka


def _encode_failures() -> float:
    labels = {"model": TEXT_ENCODER, "kind": "TritonUnavailable"}
    return REGISTRY.get_sample_value("recstream_triton_errors_total", labels) or 0.0


def test_stop_does_not_wait_for_triton_and_leaves_the_item_to_the_next_start(
    make_settings: Callable[..., Settings], free_port: int
) -> None:
    settings = make_settings(triton_grpc_url=f"127.0.0.1:{free_port}", triton_timeout_s=0.5)
    ctx = StreamContext(settings=settings, worker="stopping", agents=("catalog",))
    loop = CatalogLoop(ctx, CatalogIndexer(ctx), group_id=catalog_group(settings))
    try:
        loop.start()
        assert loop.ready.wait(60), "the catalog consumer got no partitions"
        failures = _encode_failures()
        with EventProducer(settings) as producer:
            producer.send_many("catalog", [ItemUpsert(item_id="stuck-item", title="An item Triton never sees")])
        deadline = time.monotonic() + 60
        while _encode_failures() <= failures:  # the indexer is in its retry loop
            assert time.monotonic() < deadline, "the catalog indexer never tried to embed the item"
            time.sleep(0.1)

        t0 = time.monotonic()
        loop.stop(timeout_s=30.0)
        stopped_in = time.monotonic() - t0
        assert loop._thread is not None and not loop._thread.is_alive(), "the catalog thread outlived the stop"
        assert stopped_in < 10.0, f"stop waited {stopped_in:.1f} s for Triton"
        assert ctx.store.count() == 0
    finally:
        if loop._thread is None or not loop._thread.is_alive():
            ctx.close()
        # else (the failure above): closing the executor under a running thread would make it stop
        # the whole process, as a dead consumer thread stops a worker; it is left to retry instead.

    topic = CATALOG.name(settings.topic_prefix)
    reader = Consumer(consumer_config(settings, catalog_group(settings)))
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        committed = reader.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
        assert all(tp.offset < 0 for tp in committed), f"the unindexed item was committed: {committed}"
    finally:
        reader.close()

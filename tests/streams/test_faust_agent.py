"""faust-streaming against the real broker: an agent consumes one topic and produces to another."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from recstream.client import EventProducer
from recstream.config import Settings
from recstream.contracts.events import BehaviourEvent
from recstream.contracts.topics import TOPICS

pytestmark = pytest.mark.kafka
APP = Path(__file__).resolve().parents[1] / "support" / "faust_echo_app.py"


def test_minimal_faust_agent_round_trip(settings: Settings, tmp_path: Path) -> None:
    env = dict(
        os.environ,
        KAFKA_BOOTSTRAP=settings.kafka_bootstrap,
        TOPIC_PREFIX=settings.topic_prefix,
        FAUST_DATA_DIR=str(tmp_path / "faust"),
    )
    log = (tmp_path / "faust.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, str(APP), "worker", "-l", "info"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        n = 50
        with EventProducer(settings) as producer:
            for i in range(n):
                producer.send(
                    "behaviour", BehaviourEvent(event_id=f"f{i}", type="view", user_id=f"u{i % 7}", item_id="i1")
                )
        consumer = Consumer(
            {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "faust-check", "auto.offset.reset": "earliest"}
        )
        consumer.subscribe([TOPICS["training-examples"].name(settings.topic_prefix)])
        seen: set[str] = set()
        deadline = time.monotonic() + 90  # first start of a faust worker includes a group rebalance
        while len(seen) < n and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "faust.log").read_text()[-3000:]
            for msg in consumer.consume(100, timeout=0.5):
                if not msg.error():
                    out = json.loads(msg.value())
                    assert out["by"] == "faust"
                    seen.add(out["seen"])
        consumer.close()
        assert seen == {f"f{i}" for i in range(n)}, (tmp_path / "faust.log").read_text()[-3000:]
    finally:
        worker.terminate()
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()

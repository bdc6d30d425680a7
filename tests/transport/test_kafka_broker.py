"""The local Kafka launcher: a real broker starts fast, serves clients, stops cleanly, and fails loudly."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from infra.kafka_broker import BrokerError, KafkaBroker, _pid_alive, broker_answers
from infra.kafka_testing import start_test_broker

pytestmark = pytest.mark.kafka
REPO = Path(__file__).resolve().parents[2]


def _roundtrip(bootstrap: str) -> bytes:
    """Create a topic (auto-create is off), produce one message and read it back."""
    topic = f"t-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])[topic].result(timeout=15)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(10) == 0
    producer.close()  # released now: the test stops this broker next
    del admin  # AdminClient has no close(); its threads stop with the last reference
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic, "auto.offset.reset": "earliest"})
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                return msg.value()
        raise AssertionError("no message consumed within 20 s")
    finally:
        consumer.close()


def test_broker_starts_serves_clients_and_stops_from_pid_file(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka", port=0, controller_port=0)
    started = time.monotonic()
    try:
        bootstrap = broker.start(timeout_s=30)
        assert time.monotonic() - started < 30
        assert broker.is_running() and broker_answers(bootstrap)
        assert _roundtrip(bootstrap) == b"hello"
        pid = broker.pid
        assert pid is not None and broker.pid_file.read_text().strip() == str(pid)
        # Another process would only have the run dir: stop through the PID file.
        other = KafkaBroker.from_run_dir(tmp_path / "kafka")
        assert other.bootstrap == bootstrap and other.is_running()
        assert other.stop(grace_s=20) is True
        assert not _pid_alive(pid)
        assert not broker.pid_file.exists()
        assert not broker_answers(bootstrap, timeout_s=1)
    finally:
        broker.stop(grace_s=5)


def test_port_in_use_fails_fast_with_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        broker = KafkaBroker(tmp_path / "kafka", port=port, controller_port=0)
        started = time.monotonic()
        with pytest.raises(BrokerError, match="already in use"):
            broker.start(timeout_s=30)
        assert time.monotonic() - started < 10
        assert not broker.is_running()


def test_broker_that_dies_raises_with_log_tail(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka", port=0, controller_port=0, heap="1k")  # JVM refuses this heap
    started = time.monotonic()
    with pytest.raises(BrokerError, match="exited with code") as info:
        broker.start(timeout_s=30)
    assert "heap" in str(info.value).lower()
    assert time.monotonic() - started < 25
    assert not broker.is_running()


def test_start_test_broker_local_backend(tmp_path: Path) -> None:
    bootstrap, stop = start_test_broker(tmp_path / "kafka", backend="local")
    try:
        assert broker_answers(bootstrap)
    finally:
        stop()
    assert not broker_answers(bootstrap, timeout_s=1)


def test_cli_start_status_stop(tmp_path: Path) -> None:
    run_dir = tmp_path / "kafka"
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "infra.kafka_cli", *args, "--run-dir", str(run_dir)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    try:
        started = cli("start", "--port", "0", "--controller-port", "0")
        assert started.returncode == 0, started.stderr
        assert "ready at 127.0.0.1:" in started.stdout
        status = cli("status")
        assert status.returncode == 0 and "ready" in status.stdout
    finally:
        stopped = cli("stop")
    assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
    assert cli("status").returncode == 1


def test_cluster_ids_never_start_with_a_dash(monkeypatch) -> None:
    """1 in 64 random ids starts with '-', which the storage tool reads as an option (exit 1: the
    flaky format failure once seen in test runs); such a draw is replaced by the next one."""
    import base64
    import uuid

    from infra import kafka_broker

    dash = uuid.UUID(bytes=b"\xf8" + bytes(15))  # base64 '+-' alphabet index 62 first: "-A..."
    plain = uuid.UUID(bytes=bytes(16))
    assert base64.urlsafe_b64encode(dash.bytes).decode().startswith("-")
    draws = iter([dash, dash, plain])
    monkeypatch.setattr(kafka_broker.uuid, "uuid4", lambda: next(draws))
    assert kafka_broker.random_cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"

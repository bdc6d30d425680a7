"""Kafka for tests: a broker per pytest session (Docker via testcontainers when an engine answers,
else the local broker) and a local multi-node cluster for replication and failover tests."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from infra.kafka_broker import HOST, KafkaBroker, broker_answers, random_cluster_id
from infra.kafka_install import KAFKA_VERSION, BrokerError, tail
from infra.processes import free_port

log = logging.getLogger(__name__)


class KafkaCluster:
    """A local KRaft cluster of `size` nodes on loopback, each broker and controller, for tests of
    replication and broker failure: topics get `size` replicas (the brokers' default replication,
    which topic creation uses) and acks=all writes need `min_insync` of them. A dead replica leaves
    the in-sync set after 5 s (replica.lag.time.max.ms; Kafka's 30 s would stall such writes)."""

    def __init__(self, run_dir: Path | str, size: int = 3, min_insync: int = 2, heap: str = "256m") -> None:
        ports = []
        while len(ports) < 2 * size:  # every node's two ports, all different, known before any starts
            port = free_port()
            if port not in ports:
                ports.append(port)
        voters = ",".join(f"{i + 1}@{HOST}:{ports[2 * i + 1]}" for i in range(size))
        shared = {
            "controller.quorum.voters": voters,
            "default.replication.factor": str(size),
            "min.insync.replicas": str(min_insync),
            "offsets.topic.replication.factor": str(size),
            "transaction.state.log.replication.factor": str(size),
            "transaction.state.log.min.isr": str(min_insync),
            "share.coordinator.state.topic.replication.factor": str(size),
            "share.coordinator.state.topic.min.isr": str(min_insync),
            "replica.lag.time.max.ms": "5000",
            # a killed node is fenced, and its partitions led elsewhere, after 4 s (Kafka: 9 s)
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
        }
        cluster_id = random_cluster_id()
        self._stopped = threading.Event()
        self.nodes = [
            KafkaBroker(
                Path(run_dir) / f"node-{i + 1}",
                port=ports[2 * i],
                controller_port=ports[2 * i + 1],
                heap=heap,
                extra_config={**shared, "node.id": str(i + 1)},
                die_with_parent=True,
                cluster_id=cluster_id,
            )
            for i in range(size)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def start(self, timeout_s: float = 120.0) -> str:
        """Start every node at once (none answers before a quorum of controllers is up). Each node
        is launched from a thread that lives until stop(): Linux's parent-death signal follows the
        launching *thread*, so a thread that returned would take its JVM with it."""
        errors: list[BaseException] = []
        started = threading.Barrier(len(self.nodes) + 1)

        def run(node: KafkaBroker) -> None:
            try:
                node.start(timeout_s=timeout_s)
            except BaseException as exc:  # reported below, after every node was tried
                errors.append(exc)
            started.wait()
            self._stopped.wait()

        self._stopped.clear()
        for node in self.nodes:
            threading.Thread(target=run, args=(node,), name=f"kafka-node-{node.port}", daemon=True).start()
        started.wait()
        if errors:
            self.stop()
            raise BrokerError(f"Kafka cluster did not start: {errors[0]}")
        return self.bootstrap

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(grace_s=10)
        self._stopped.set()


def docker_available(timeout_s: float = 3.0) -> bool:
    """A Docker engine answers a ping (socket or DOCKER_HOST)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=int(max(1, timeout_s)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:
        log.debug("no Docker engine: %s", exc)
        return False


def _start_docker_broker(version: str, timeout_s: float) -> tuple[str, Callable[[], None]]:
    """``apache/kafka:<version>`` via testcontainers, its listener on the same free port inside and out.

    testcontainers' ``KafkaContainer`` only knows the confluentinc image layout, so the official image
    is configured through its ``KAFKA_*`` environment variables on a generic container instead.
    """
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = (
        DockerContainer(f"apache/kafka:{version}")
        .with_bind_ports(port, port)
        .with_env("CLUSTER_ID", random_cluster_id())
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://localhost:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://{HOST}:{port}")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_env("KAFKA_HEAP_OPTS", "-Xmx512m")
    )
    container.start()
    bootstrap = f"{HOST}:{port}"
    deadline = time.monotonic() + timeout_s
    while not broker_answers(bootstrap):
        if time.monotonic() > deadline:
            logs = b"".join(container.get_logs()).decode(errors="replace")
            container.stop()
            raise BrokerError(f"apache/kafka:{version} not ready at {bootstrap} in {timeout_s:.0f} s:\n{tail(logs)}")
        time.sleep(0.5)
    return bootstrap, container.stop


def start_test_broker(
    run_dir: Path | str,
    *,
    backend: str | None = None,
    version: str = KAFKA_VERSION,
    timeout_s: float = 30.0,
) -> tuple[str, Callable[[], None]]:
    """A broker for a pytest session: ``(bootstrap, stop)``. Raises ``BrokerError``; never skips.

    ``backend`` (or ``RECSTREAM_KAFKA_BACKEND``): ``local`` (JVM from the jar cache, free ports),
    ``docker`` (testcontainers), or ``auto`` (default: Docker when an engine answers, falling back to
    the local broker if the container fails).
    """
    backend = (backend or os.environ.get("RECSTREAM_KAFKA_BACKEND") or "auto").lower()
    if backend not in {"auto", "local", "docker"}:
        raise ValueError(f"unknown Kafka backend {backend!r}: use auto, local or docker")
    docker_error: Exception | None = None
    if backend == "docker" or (backend == "auto" and docker_available()):
        try:
            return _start_docker_broker(version, max(timeout_s, 60.0))
        except Exception as exc:
            if backend == "docker":
                raise BrokerError(f"Kafka in Docker (apache/kafka:{version}) did not start: {exc}") from exc
            docker_error = exc
            log.warning("Kafka in Docker failed (%s); using the local broker", exc)
    broker = KafkaBroker(run_dir, port=0, controller_port=0, version=version, die_with_parent=True)
    try:
        bootstrap = broker.start(timeout_s=timeout_s)
    except BrokerError as exc:
        if docker_error is not None:
            raise BrokerError(f"{exc}\n(Docker was tried first and failed: {docker_error})") from exc
        raise
    return bootstrap, broker.stop

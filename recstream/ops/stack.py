"""The embedded local stack: Kafka broker + tritonserver + the stream worker, as background processes.

State (logs, PID files) lives under settings.run_dir so `stack down` from another shell stops
exactly what `stack up` started. Ports come from the settings (KAFKA_BOOTSTRAP, TRITON_URL, ...).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from infra.kafka_broker import KafkaBroker, wait_for_broker
from infra.triton_server import TritonServer
from recstream.config import Settings
from recstream.kafka.admin import ensure_topics
from streams.process import WorkerProcess

log = logging.getLogger(__name__)


#: The local stack worker's /metrics port unless METRICS_PORT is set (the demo reads its progress there).
WORKER_METRICS_PORT = 9100
#: The parts of the stack, in the order they start.
PARTS = ("kafka", "triton", "worker")


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


#: How long `stack up` waits for the worker's ready line (a worker still recovering its tables after
#: that is left to finish; one that exits before is a failed start).
WORKER_READY_S = 120.0


def start_worker(worker: WorkerProcess, ready_s: float = WORKER_READY_S) -> None:
    """Start the worker and wait for its ready line: one that exits first (a metrics port in use, a
    locked Qdrant folder) raises with its log, so `stack up` fails instead of reporting a worker
    that is gone; one still starting after `ready_s` is only logged."""
    try:
        worker.start(ready_timeout_s=ready_s)
    except TimeoutError:
        log.warning("the stream worker is not ready after %.0f s; still starting (see %s)", ready_s, worker.log_path)


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        run = settings.run_dir
        kafka_port = _port(settings.kafka_bootstrap)
        # the KRaft controller listens on the next port (9093 beside the default 9092), so a second
        # stack on other ports does not collide with the first one's controller
        self.kafka = KafkaBroker(run / "kafka", port=kafka_port, controller_port=kafka_port + 1)
        self.triton = TritonServer(
            settings.model_repo,
            run / "triton",
            http_port=_port(settings.triton_url),
            grpc_port=_port(settings.triton_grpc_url),
            metrics_port=_port(settings.triton_url) + 2,
        )
        self.worker = WorkerProcess(
            settings,
            run / "worker" / "worker.log",
            metrics_port=settings.metrics_port or WORKER_METRICS_PORT,
            pid_file=run / "worker" / "worker.pid",
        )

    def up(self, with_worker: bool = True) -> list[str]:
        """Start what is not running yet; returns the parts this call started. A start that fails
        stops what it started on the way, so no half-started stack holds the ports."""
        started: list[str] = []
        try:
            if self.kafka.is_running():
                # another shell's `stack up` may still be starting it: wait for it to answer
                wait_for_broker(self.kafka)
            else:
                started.append("kafka")
                self.kafka.start()
            ensure_topics(self.settings, align=True)
            if self.triton.is_running():
                self.triton.wait_ready()  # another shell's `stack up` may still be loading it
            else:
                started.append("triton")
                self.triton.start()
            if with_worker and self.worker.pid() is None:
                started.append("worker")
                start_worker(self.worker)
        except BaseException:
            self.down(started)
            raise
        return started

    def down(self, parts: Collection[str] = PARTS) -> None:
        """Stop these parts (all by default), the worker first, so it commits while Kafka is up."""
        if "worker" in parts:
            self.worker.stop()
        if "triton" in parts and self.triton.state_file.exists():
            TritonServer.from_run_dir(self.triton.run_dir).stop()
        if "kafka" in parts and self.kafka.state_file.exists():
            KafkaBroker.from_run_dir(self.kafka.run_dir).stop()

    def status(self) -> dict[str, object]:
        return {
            "kafka": self.kafka.bootstrap if self.kafka.state_file.exists() and self.kafka.is_running() else None,
            "triton": self.triton.url if self.triton.is_ready() else None,
            "worker_pid": self.worker.pid(),
        }

"""The embedded local stack: Kafka broker + tritonserver + the stream worker, as background processes.

State (logs, PID files) lives under settings.run_dir so `stack down` from another shell stops
exactly what `stack up` started. Ports come from the settings (KAFKA_BOOTSTRAP, TRITON_URL, ...).
"""

from __future__ import annotations

import logging

from infra.kafka_broker import KafkaBroker
from infra.triton_server import TritonServer
from recstream.config import Settings
from recstream.kafka.admin import ensure_topics
from streams.process import WorkerProcess

log = logging.getLogger(__name__)


#: The local stack worker's /metrics port (the demo reads its progress there).
WORKER_METRICS_PORT = 9100


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


class LocalStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        run = settings.run_dir
        self.kafka = KafkaBroker(run / "kafka", port=_port(settings.kafka_bootstrap))
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
            metrics_port=WORKER_METRICS_PORT,
            pid_file=run / "worker" / "worker.pid",
        )

    def up(self, with_worker: bool = True) -> None:
        if not self.kafka.is_running():
            self.kafka.start()
        ensure_topics(self.settings)
        if not self.triton.is_running():
            self.triton.start()
        if with_worker:
            self.worker.start(ready_timeout_s=None)

    def down(self) -> None:
        self.worker.stop()
        if self.triton.state_file.exists():
            TritonServer.from_run_dir(self.triton.run_dir).stop()
        if self.kafka.state_file.exists():
            KafkaBroker.from_run_dir(self.kafka.run_dir).stop()

    def status(self) -> dict[str, object]:
        return {
            "kafka": self.kafka.bootstrap if self.kafka.state_file.exists() and self.kafka.is_running() else None,
            "triton": self.triton.url if self.triton.is_ready() else None,
            "worker_pid": self.worker.pid(),
        }

"""The embedded local stack: Kafka broker + tritonserver + the stream worker, as background processes.

State (logs, PID files) lives under settings.run_dir so `stack down` from another shell stops
exactly what `stack up` started. Ports come from the settings (KAFKA_BOOTSTRAP, TRITON_URL, ...).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from infra.kafka_broker import KafkaBroker
from infra.triton_server import TritonServer
from recstream.config import REPO_ROOT, Settings, settings_env
from recstream.kafka.admin import ensure_topics

log = logging.getLogger(__name__)


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


@dataclass
class WorkerProcess:
    """The faust stream worker (all agents in one process: Qdrant local mode allows one opener)."""

    run_dir: Path
    metrics_port: int = 9100

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "worker.pid"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "worker.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return None

    def start(self, env: dict[str, str]) -> int:
        if pid := self.pid():
            return pid
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "streams.worker", "--metrics-port", str(self.metrics_port)],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc.pid

    def stop(self, grace_s: float = 20.0) -> None:
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None:
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)


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
        self.worker = WorkerProcess(run / "worker")

    def up(self, with_worker: bool = True) -> None:
        if not self.kafka.is_running():
            self.kafka.start()
        ensure_topics(self.settings)
        if not self.triton.is_running():
            self.triton.start()
        if with_worker:
            self.worker.start(settings_env(self.settings))

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

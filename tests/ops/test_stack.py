"""The embedded local stack's lifecycle (recstream.ops.stack, the demo's waits, the worker's PID
file): a start that fails leaves nothing running, a dead worker is noticed at once, and a stale
PID file never names an unrelated process."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from infra.kafka_broker import broker_answers
from infra.processes import free_port
from infra.triton_server import TritonStartError
from recstream.config import Settings
from recstream.ops.demo import wait_for_worker
from recstream.ops.stack import LocalStack, start_worker
from streams.process import WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _broken_repo(root: Path) -> Path:
    repo = root / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n')
    return repo


def test_a_stack_whose_triton_fails_to_start_stops_the_kafka_it_started(tmp_path: Path) -> None:
    """`stack up` (and the demo) started Kafka, then Triton failed: Kafka kept running, holding
    its ports, with nothing left to stop it but `stack down` (which nobody runs after a failure)."""
    http = free_port()
    settings = Settings(
        kafka_bootstrap=f"127.0.0.1:{free_port()}",
        triton_url=f"127.0.0.1:{http}",
        triton_grpc_url=f"127.0.0.1:{free_port()}",
        model_repo=_broken_repo(tmp_path),
        run_dir=tmp_path / "run",
        topic_prefix="stack-test.",
    )
    stack = LocalStack(settings)
    stack.kafka.controller_port = free_port()  # not the fixed default: another stack may hold it
    with pytest.raises(TritonStartError):
        stack.up()
    assert not stack.kafka.is_running() and not broker_answers(settings.kafka_bootstrap, timeout_s=1.0)
    assert stack.worker.pid() is None


def test_waiting_for_a_worker_that_died_fails_at_once_with_its_log(tmp_path: Path) -> None:
    """The demo waits up to 10 minutes for the worker to catch up: one that exited at start (here a
    bad argument; a metrics port in use or a locked Qdrant folder do the same) must end the wait
    at once with its log, not after the 10 minutes."""
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", run_dir=tmp_path / "run")
    worker = WorkerProcess(settings, tmp_path / "worker.log", ["--ranker", "nosuch"], pid_file=tmp_path / "w.pid")
    worker.start(ready_timeout_s=None)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="exited") as raised:
        wait_for_worker(worker, "recstream_indexed_items", 10, "items", timeout_s=120)
    assert time.monotonic() - t0 < 60
    assert "nosuch" in str(raised.value)  # the log's reason


def test_stack_up_fails_when_its_worker_exits_at_start(tmp_path: Path) -> None:
    """`stack up` returned as soon as the worker process was spawned: one that died a moment later
    (a metrics port in use) was reported running, and `make up` exited 0."""
    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port()}", run_dir=tmp_path / "run")
    worker = WorkerProcess(settings, tmp_path / "worker.log", ["--ranker", "nosuch"], pid_file=tmp_path / "w.pid")
    with pytest.raises(RuntimeError, match="nosuch"):
        start_worker(worker, ready_s=60)
    assert worker.pid() is None


def test_a_stale_pid_file_does_not_name_an_unrelated_process(tmp_path: Path) -> None:
    """A worker that crashed left its PID file; the PID now belongs to another program. `stack up`
    must start a worker, and `stack down` must not signal that program."""
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        pid_file = tmp_path / "worker.pid"
        pid_file.write_text(str(other.pid))
        worker = WorkerProcess(Settings(run_dir=tmp_path), tmp_path / "worker.log", pid_file=pid_file)
        assert worker.pid() is None
        worker.stop(timeout_s=1)
        assert other.poll() is None, "stop() signalled an unrelated process"
    finally:
        other.kill()
        other.wait(10)

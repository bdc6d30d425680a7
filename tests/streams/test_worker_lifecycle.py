"""The worker's own main loop: a SIGTERM stops it cleanly even when every broker is gone (under
faust such a worker ignored SIGTERM and had to be killed)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from infra.kafka_broker import KafkaBroker
from recstream.config import Settings
from recstream.kafka.admin import ensure_topics
from streams.process import WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_a_worker_whose_broker_died_exits_on_sigterm(tmp_path: Path) -> None:
    broker = KafkaBroker(tmp_path / "kafka", port=0, controller_port=0)
    broker.start()
    worker = None
    try:
        settings = Settings(
            kafka_bootstrap=broker.bootstrap,
            topic_prefix="lifecycle.",
            qdrant_path=tmp_path / "qdrant",
            run_dir=tmp_path / "run",
        )
        ensure_topics(settings)
        # the behaviour processors need neither Triton nor the vector store's models
        worker = WorkerProcess(settings, tmp_path / "worker.log", ["--agents", "features,feedback"])
        worker.start(ready_timeout_s=180)
        assert broker.pid is not None
        os.kill(broker.pid, signal.SIGKILL)
        time.sleep(3)  # the consumers notice: every connection is refused
        assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
        worker.proc.terminate()
        try:
            code = worker.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the worker ignored SIGTERM with its broker gone:\n" + worker.tail())
        assert code == 0, worker.tail()
        assert "stopping: committing what was processed" in worker.tail(20_000)
    finally:
        if worker is not None:
            worker.kill9()
        broker.stop()


def test_a_failed_consumer_thread_stops_the_worker_with_a_failure_status() -> None:
    """A consumer thread that raises stops the worker through SIGTERM, like an operator's stop;
    the worker must then exit non-zero (it exited 0, so a restart-on-failure supervisor left it
    down). Checked on the signal path the worker's main loop uses."""
    import threading

    from streams import consumer_threads

    stopped = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopped.set())
    consumer_threads.THREAD_FAILED.clear()
    try:

        def broken() -> None:
            raise RuntimeError("a processor bug")

        thread = threading.Thread(target=consumer_threads.run_or_stop_worker, args=("test consumer", broken))
        thread.start()
        thread.join(10)
        assert stopped.wait(5), "no SIGTERM"
        assert consumer_threads.THREAD_FAILED.is_set()
    finally:
        signal.signal(signal.SIGTERM, previous)
        consumer_threads.THREAD_FAILED.clear()

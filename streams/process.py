"""Run `python -m streams.worker` as a child process: start, wait until ready, scrape, stop or kill.

Used by the stream tests (which must kill -9 a real worker) and by bench/bench_stream.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from infra.processes import free_port
from recstream.config import REPO_ROOT, Settings, settings_env
from streams.worker import READY_LINE


class WorkerProcess:
    def __init__(self, settings: Settings, log_path: Path, args: Sequence[str] = ()) -> None:
        self.settings = settings
        self.log_path = log_path
        self.metrics_port = free_port()
        self.args = ["--metrics-port", str(self.metrics_port), *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready_timeout_s: float = 120.0) -> WorkerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.worker", *self.args],
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
        )
        log.close()
        deadline = time.monotonic() + ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            with self.log_path.open("rb") as fh:
                fh.seek(offset)
                if READY_LINE.encode() in fh.read():
                    return self
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready in {ready_timeout_s}s:\n{self.tail()}")

    def tail(self, chars: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def metrics(self) -> str:
        # The worker's own HTTP server on localhost; 5 s is ample even on a saturated box.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as resp:
            return resp.read().decode()

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of a metric's samples whose label text contains `labels` (0 when absent)."""
        total = 0.0
        for m in re.finditer(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", self.metrics(), re.M):
            if labels in (m.group(1) or ""):
                total += float(m.group(2))
        return total

    def kill9(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill9()

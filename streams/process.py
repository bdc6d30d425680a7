"""Run `python -m streams.worker` as a child process: start, wait until ready, scrape, stop or kill.

Used by the local stack (`stack up` / `stack down`, detached, found again through its PID file), the
stream tests (which must kill -9 a real worker) and the benchmarks.
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

from infra.processes import command_line, free_port, pid_alive
from recstream.config import REPO_ROOT, Settings, settings_env
from streams.worker import READY_LINE


class WorkerProcess:
    """One stream worker process. With `pid_file` it is detached (its own session, its PID on disk),
    so a later process finds and stops it; without, it is this process's child."""

    def __init__(
        self,
        settings: Settings,
        log_path: Path,
        args: Sequence[str] = (),
        *,
        metrics_port: int | None = None,
        pid_file: Path | None = None,
    ) -> None:
        self.settings = settings
        self.log_path = log_path
        self.metrics_port = metrics_port or free_port()
        self.pid_file = pid_file
        self.args = ["--metrics-port", str(self.metrics_port), *args]
        self.proc: subprocess.Popen[bytes] | None = None

    def pid(self) -> int | None:
        """The running worker's PID (a detached one's from its PID file), or None."""
        if self.proc is not None:
            return self.proc.pid if self.proc.poll() is None else None
        if self.pid_file is None:
            return None
        try:
            pid = int(self.pid_file.read_text())
        except (FileNotFoundError, ValueError):
            return None
        # a stale file's PID may belong to an unrelated process by now: never take (or signal) that
        return pid if pid_alive(pid) and "streams.worker" in command_line(pid) else None

    def start(self, ready_timeout_s: float | None = 120.0) -> WorkerProcess:
        """Start it (a detached worker that is already running is left as it is) and wait for its
        ready line; `ready_timeout_s=None` returns at once."""
        if self.pid_file is not None and self.pid() is not None:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams.worker", *self.args],
            env=settings_env(self.settings),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=self.pid_file is not None,
        )
        log.close()
        if self.pid_file is not None:
            self.pid_file.write_text(str(self.proc.pid))
        if ready_timeout_s is None:
            return self
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
        """SIGTERM (the worker commits what it processed), SIGKILL after `timeout_s`."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout_s)
                except subprocess.TimeoutExpired:
                    self.kill9()
        elif (pid := self.pid()) is not None:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline and self.pid() is not None:
                time.sleep(0.2)
            if self.pid() is not None:
                os.kill(pid, signal.SIGKILL)
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)

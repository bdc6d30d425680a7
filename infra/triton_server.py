"""Launch, probe and stop the tritonserver binary that ships inside nvidia-pytriton (no Docker, no GPU).

Why not ``pytriton.Triton``: it wraps Python callables, while we serve a plain model repository
(``model_repo/``) that a later step updates through Triton's model-control API. So we run the
bundled binary ourselves; infra.triton_env says what its python backend needs from the environment.

State lives in ``run_dir``: ``tritonserver.pid``, ``triton.json`` (ports, mode) and
``tritonserver.log``, so ``stop``/``status`` work from a different process than ``start``.

CLI: ``python -m infra.triton_server start|stop|status [--run-dir run/triton]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from infra.processes import command_line, free_port, parent_death_signal, port_in_use, wait_until_ready
from infra.processes import pid_alive as _pid_alive
from infra.triton_env import (
    REPO_ROOT,
    TritonStartError,
    prepare_backend_dir,
    pytriton_dist_dir,
    server_env,
    tritonserver_binary,
)

LOG = logging.getLogger(__name__)

PID_FILE = "tritonserver.pid"
STATE_FILE = "triton.json"
LOG_FILE = "tritonserver.log"
MODEL_CONTROL_MODES = ("explicit", "poll", "none")
#: Log lines after which tritonserver will never become ready. Some of these do not make it exit: a
#: python model whose stub fails to initialise leaves the server "loading" forever, so we watch the
#: log and fail fast instead of waiting for the deadline.
FATAL_LOG_MARKERS = (
    "Failed to preinitialize Python stub",
    "failed to load '",
    "Failed to initialize Python stub",
    "Stub process is unhealthy",
    "error: creating server:",
)
#: Logged once this process's HTTP endpoint listens. Until our own log says so, a 200 from the
#: port's readiness probe is not ours to trust.
HTTP_STARTED_MARKER = "Started HTTPService"


def _is_tritonserver(pid: int) -> bool:
    """Guard against PID reuse: only signal a process whose command line is a tritonserver."""
    args = command_line(pid)
    return bool(args) and args[0].endswith("tritonserver")


def _log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _scan_log(path: Path, offset: int) -> tuple[int, str | None, bool]:
    """Read complete new log lines from ``offset``; return the new offset, the first fatal line and
    whether the HTTP service's start was logged."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            chunk = fh.read()
    except OSError:
        return offset, None, False
    end = chunk.rfind(b"\n") + 1
    http_started = False
    for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
        if any(marker in line for marker in FATAL_LOG_MARKERS):
            return offset + end, line, http_started
        http_started = http_started or HTTP_STARTED_MARKER in line
    return offset + end, None, http_started


def _http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


class TritonServer:
    """One tritonserver process serving ``model_repo``, with its state under ``run_dir``.

    ``http_port``/``grpc_port``/``metrics_port`` = 0 picks free ports at ``start()``.
    ``models``: names to load at start (explicit mode) and to wait for; None = every model directory
    in the repository that has a ``config.pbtxt``.
    ``die_with_parent`` (tests set it for every server): the server gets SIGTERM when the process
    that started it dies, even by SIGKILL; off for the stack CLI, whose server outlives it.
    """

    die_with_parent: bool = False

    def __init__(
        self,
        model_repo: Path,
        run_dir: Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        model_control_mode: str = "explicit",
        models: Sequence[str] | None = None,
        host: str = "127.0.0.1",
        repository_poll_secs: int = 5,
        log_verbose: int = 0,
        extra_args: Sequence[str] = (),
        die_with_parent: bool | None = None,
    ) -> None:
        if model_control_mode not in MODEL_CONTROL_MODES:
            raise ValueError(f"model_control_mode must be one of {MODEL_CONTROL_MODES}")
        self.model_repo = Path(model_repo).resolve()
        self.run_dir = Path(run_dir).resolve()
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.model_control_mode = model_control_mode
        self.models = list(models) if models is not None else None
        self.host = host
        self.repository_poll_secs = repository_poll_secs
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        if die_with_parent is not None:
            self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    # ---- state shared across processes -------------------------------------------------------
    @property
    def pid_file(self) -> Path:
        return self.run_dir / PID_FILE

    @property
    def state_file(self) -> Path:
        return self.run_dir / STATE_FILE

    @property
    def log_file(self) -> Path:
        return self.run_dir / LOG_FILE

    @classmethod
    def from_run_dir(cls, run_dir: Path) -> TritonServer:
        """Re-attach to a server started by another process (for ``stop``/``status``/urls)."""
        run_dir = Path(run_dir)
        state = json.loads((run_dir / STATE_FILE).read_text())
        return cls(
            model_repo=Path(state["model_repo"]),
            run_dir=run_dir,
            http_port=state["http_port"],
            grpc_port=state["grpc_port"],
            metrics_port=state["metrics_port"],
            model_control_mode=state["model_control_mode"],
            models=state["models"],
            host=state["host"],
        )

    def read_pid(self) -> int | None:
        try:
            return int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None

    # ---- endpoints -----------------------------------------------------------------------------
    @property
    def url(self) -> str:
        """HTTP endpoint as ``host:port`` (the form tritonclient expects)."""
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def is_ready(self, timeout_s: float = 1.0) -> bool:
        return _http_ok(f"http://{self.url}/v2/health/ready", timeout_s)

    def model_ready(self, name: str, timeout_s: float = 1.0) -> bool:
        return _http_ok(f"http://{self.url}/v2/models/{name}/ready", timeout_s)

    def is_running(self) -> bool:
        pid = self._proc.pid if self._proc is not None else self.read_pid()
        return pid is not None and _pid_alive(pid) and _is_tritonserver(pid)

    def repo_models(self) -> list[str]:
        return sorted(p.name for p in self.model_repo.iterdir() if (p / "config.pbtxt").is_file())

    # ---- lifecycle -----------------------------------------------------------------------------
    def command(self) -> list[str]:
        """The full tritonserver command line (ports must already be concrete)."""
        backends = prepare_backend_dir(self.run_dir)
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={self.model_repo}",
            f"--model-control-mode={self.model_control_mode}",
            f"--backend-directory={backends}",
            f"--cache-directory={pytriton_dist_dir() / 'caches'}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            # Fail fast: a model that does not load is a startup error, not a half-ready server.
            "--exit-on-error=true",
            "--strict-readiness=true",
            f"--log-verbose={self.log_verbose}",
        ]
        if self.model_control_mode == "explicit":
            cmd += [f"--load-model={m}" for m in (self.models if self.models is not None else ["*"])]
        elif self.model_control_mode == "poll":
            cmd.append(f"--repository-poll-secs={self.repository_poll_secs}")
        return cmd + self.extra_args

    def start(self, timeout_s: float = 180.0) -> TritonServer:
        """Spawn tritonserver and block until it and every requested model are ready.

        Raises TritonStartError (with the log tail) if the process dies or the deadline passes;
        on timeout the process is killed, so a failed start never leaves a server behind.
        """
        if self.is_running():
            raise TritonStartError(f"a tritonserver is already running from {self.run_dir} (pid {self.read_pid()})")
        if not self.model_repo.is_dir():
            raise TritonStartError(f"model repository {self.model_repo} does not exist")
        for port in (self.http_port, self.grpc_port, self.metrics_port):
            if port and port_in_use(port, self.host):
                raise TritonStartError(
                    f"port {port} on {self.host} is already in use (another tritonserver? `stack down` "
                    f"stops the one a stack started); cannot start tritonserver from {self.run_dir}"
                )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.http_port = self.http_port or free_port(self.host)
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.metrics_port = self.metrics_port or free_port(self.host)
        wait_for = self.models if self.models is not None else self.repo_models()
        cmd = self.command()
        LOG.info("starting tritonserver: %s", " ".join(cmd))
        t0 = time.monotonic()
        with self.log_file.open("wb") as log:
            # New session: the CLI's `start` may exit while the server keeps running, and Ctrl-C in
            # the caller's terminal must not kill it half-way; stop() signals it explicitly.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_env(),
                cwd=self.run_dir,
                start_new_session=True,
                preexec_fn=parent_death_signal if self.die_with_parent else None,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        self.state_file.write_text(
            json.dumps(
                {
                    "pid": self._proc.pid,
                    "model_repo": str(self.model_repo),
                    "host": self.host,
                    "http_port": self.http_port,
                    "grpc_port": self.grpc_port,
                    "metrics_port": self.metrics_port,
                    "model_control_mode": self.model_control_mode,
                    "models": self.models,
                },
                indent=2,
            )
        )
        try:
            self._wait_started(t0, timeout_s, wait_for)
        except BaseException:
            # Ctrl-C or an unexpected error while loading: the server is in its own session, so
            # nothing else would stop it, and the next `stack up` would take it for a ready one.
            if self._proc is not None and self._proc.poll() is None:
                self.stop(timeout_s=5)
            raise
        LOG.info(
            "tritonserver ready in %.1fs (pid %d, http %s, grpc %s, models %s)",
            time.monotonic() - t0,
            self._proc.pid,
            self.url,
            self.grpc_url,
            wait_for,
        )
        return self

    def _wait_started(self, t0: float, timeout_s: float, wait_for: Sequence[str]) -> None:
        assert self._proc is not None
        deadline = t0 + timeout_s
        pending = list(wait_for)
        server_ready = http_started = False
        log_offset = 0
        while True:
            rc = self._proc.poll()
            if rc is not None:
                self._cleanup_state()
                raise TritonStartError(
                    f"tritonserver exited with code {rc} during startup; log {self.log_file}:\n"
                    f"{_log_tail(self.log_file)}"
                )
            log_offset, fatal, started_now = _scan_log(self.log_file, log_offset)
            http_started = http_started or started_now
            if fatal is not None:
                self.stop(timeout_s=5)
                raise TritonStartError(
                    f"tritonserver cannot become ready ({fatal.strip()}); killed it. Log {self.log_file}:\n"
                    f"{_log_tail(self.log_file)}"
                )
            if http_started and not server_ready:
                server_ready = self.is_ready(timeout_s=0.5)
            if server_ready:
                pending = [m for m in pending if not self.model_ready(m, timeout_s=0.5)]
                if not pending:
                    return
            if time.monotonic() > deadline:
                tail = _log_tail(self.log_file)
                self.stop()
                raise TritonStartError(
                    f"tritonserver not ready after {timeout_s:.0f}s (server ready={server_ready}, "
                    f"models not ready={pending}); killed it. Log {self.log_file}:\n{tail}"
                )
            time.sleep(0.1)

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        """Block until a server started elsewhere (another shell's `stack up`) and every model of the
        repository answer ready; TritonStartError if they do not within ``timeout_s``."""
        pending = self.models if self.models is not None else self.repo_models()

        def ready() -> bool:
            nonlocal pending
            if self.is_ready(timeout_s=0.5):
                pending = [m for m in pending if not self.model_ready(m, timeout_s=0.5)]
                return not pending
            return False

        def what() -> str:
            return f"the tritonserver from {self.run_dir} (models not ready: {pending}; log {self.log_file})"

        wait_until_ready(ready, self.is_running, timeout_s, what, TritonStartError)

    def stop(self, timeout_s: float = 20.0) -> bool:
        """SIGTERM (graceful: unloads models, stops stubs), then SIGKILL the process group.

        Works on a server started by another process via the PID file. Returns True if a server
        was stopped, False if none was running.
        """
        pid = self._proc.pid if self._proc is not None else self.read_pid()
        if pid is None or not _pid_alive(pid) or not _is_tritonserver(pid):
            self._cleanup_state()
            return False
        LOG.info("stopping tritonserver pid %d", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                break
            if self._proc is None and not _pid_alive(pid):
                break
            time.sleep(0.1)
        else:
            LOG.warning("tritonserver pid %d ignored SIGTERM for %.0fs; SIGKILL", pid, timeout_s)
            # start_new_session made pid the process-group leader: this also reaps the stubs.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            if self._proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(timeout=5)
        self._cleanup_state()
        return True

    def _cleanup_state(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.pid_file.unlink()
        self._proc = None

    def status(self) -> dict[str, Any]:
        running = self.is_running()
        return {
            "pid": self.read_pid(),
            "running": running,
            "ready": running and self.is_ready(),
            "http": self.url,
            "grpc": self.grpc_url,
            "metrics": self.metrics_url,
            "model_control_mode": self.model_control_mode,
            "log": str(self.log_file),
        }

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    """The launcher alone, for operators; `python -m recstream.ops.cli stack up` starts it with the
    project's settings (RUN_DIR, MODEL_REPO, ...)."""
    parser = argparse.ArgumentParser(prog="python -m infra.triton_server", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / "run" / "triton")
    parser.add_argument("--model-repo", type=Path, default=REPO_ROOT / "model_repo")
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--mode", choices=MODEL_CONTROL_MODES, default="explicit")
    parser.add_argument("--model", action="append", dest="models", help="model to load/wait for (repeatable)")
    parser.add_argument("--timeout", type=float, default=180.0)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.action == "start":
        server = TritonServer(
            args.model_repo,
            args.run_dir,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            model_control_mode=args.mode,
            models=args.models,
        )
        try:
            server.start(timeout_s=args.timeout)
        except TritonStartError as exc:
            print(exc, file=sys.stderr)
            return 1
        print(json.dumps(server.status(), indent=2))
        return 0
    if not (args.run_dir / STATE_FILE).is_file():
        print(json.dumps({"running": False, "run_dir": str(args.run_dir)}))
        return 0 if args.action == "stop" else 3
    server = TritonServer.from_run_dir(args.run_dir)
    if args.action == "stop":
        stopped = server.stop()
        print(json.dumps({"stopped": stopped}))
        return 0
    status = server.status()
    print(json.dumps(status, indent=2))
    return 0 if status["ready"] else 3


if __name__ == "__main__":
    sys.exit(main())

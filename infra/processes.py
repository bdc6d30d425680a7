"""Process and port helpers shared by the launchers (Kafka, Triton, workers)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True for a live process; a zombie still answers kill(0), so it counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


def command_line(pid: int) -> list[str]:
    """A process's arguments ([] when it is gone or unreadable): a PID read from a file may have
    been reused by an unrelated process, so launchers check what it runs before signalling it."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS considers free right now (a small race remains until the server binds it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Something listens on (or holds) this port: a launcher must not start, since a readiness probe
    on it would be answered by whatever already holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def parent_death_signal() -> None:
    """Runs in the forked child (``preexec_fn``): Linux SIGTERMs it when the parent goes away, even
    by SIGKILL, so a killed test run leaves no server behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_until_ready(
    ready: Callable[[], bool],
    running: Callable[[], bool],
    timeout_s: float,
    what: Callable[[], str],
    error: type[Exception],
    interval_s: float = 0.2,
) -> None:
    """Block until `ready()` for a server another process started (a second shell's `stack up`):
    `error` names `what()` (asked then: it may say what is still missing) when its process exits
    first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if not running():
            raise error(f"{what()} exited")
        if time.monotonic() > deadline:
            raise error(f"{what()} runs but is not ready after {timeout_s:.0f} s; `stack down` and start again")
        time.sleep(interval_s)

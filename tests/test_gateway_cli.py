"""Entry points: `python -m services.gateway` serves (and refuses to start without keys), and the
operator CLI's `bench NAME` runs `python -m bench.bench_NAME`."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from recstream import cli
from recstream.config import REPO_ROOT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gateway(port: int, keys: str) -> subprocess.Popen[bytes]:
    # Kafka is unreachable on purpose: the process must still start and answer liveness.
    env = dict(os.environ, GATEWAY_API_KEYS=keys, KAFKA_BOOTSTRAP="127.0.0.1:9", TRITON_URL="127.0.0.1:9",
               PYTHONPATH=str(REPO_ROOT))
    return subprocess.Popen([sys.executable, "-m", "services.gateway", "--port", str(port)], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def test_python_m_services_gateway_serves_health_and_playground() -> None:
    port = _free_port()
    proc = _gateway(port, "k1")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:  # 1 s: a local uvicorn answers at once once it is listening
                r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "gateway did not listen within 60 s"
                time.sleep(0.3)
        assert r.json() == {"status": "ok"}
        page = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert page.status_code == 200 and "recstream playground" in page.text
        assert httpx.get(f"http://127.0.0.1:{port}/static/playground.js", timeout=5).status_code == 200
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=10)
        assert ready.status_code == 503 and ready.json()["kafka"].startswith("down")
        assert ready.json()["triton"].startswith("down")
    finally:
        proc.terminate()
        proc.wait(20)


def test_gateway_refuses_to_start_without_keys() -> None:
    proc = _gateway(_free_port(), "")
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and b"GATEWAY_API_KEYS" in out


def test_cli_bench_runs_the_named_module(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "call", lambda argv, cwd: calls.append(argv) or 0)
    result = CliRunner().invoke(cli.app, ["bench", "quality"])
    assert result.exit_code == 0, result.output
    assert calls == [[sys.executable, "-m", "bench.bench_quality"]]
    result = CliRunner().invoke(cli.app, ["bench", "nope"])
    assert result.exit_code == 2 and "available:" in result.output

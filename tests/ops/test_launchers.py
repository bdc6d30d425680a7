"""The launchers' failure paths (infra.triton_server, infra.kafka_broker): an interrupted start
leaves no server behind, a port another server holds is refused instead of answering our readiness
probe, and a test run's tritonserver dies with it."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import infra.kafka_broker as kafka_broker
import infra.triton_server as triton_server
from infra.kafka_broker import KafkaBroker
from infra.processes import pid_alive
from infra.triton_server import TritonServer, TritonStartError
from recstream.config import REPO_ROOT


@pytest.fixture
def fake_tritonserver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in binary named tritonserver that never becomes ready (argv[0] kept, so the
    launcher's PID-reuse guard recognises it)."""
    binary = tmp_path / "bin" / "tritonserver"
    binary.parent.mkdir()
    binary.write_text('#!/bin/bash\nexec -a "$0" sleep 300\n')
    binary.chmod(0o755)
    monkeypatch.setattr(triton_server, "tritonserver_binary", lambda: binary)
    return binary


@pytest.fixture
def answering_port() -> Iterator[int]:
    """A foreign HTTP server that answers 200 to everything, e.g. a tritonserver nobody stopped."""

    class Ok(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


def _wait_dead(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.1)
    return False


def test_triton_refuses_a_port_that_another_server_answers_on(
    tmp_path: Path, fake_tritonserver: Path, answering_port: int
) -> None:
    """Its readiness probe used to accept whoever answered on the port: a stale server there made
    start() report ready at once while the new one failed to bind and exited."""
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", tmp_path / "run", http_port=answering_port, grpc_port=0, metrics_port=0)
    with pytest.raises(TritonStartError, match=f"port {answering_port} .* already in use"):
        server.start(timeout_s=10)
    assert server.read_pid() is None


def test_triton_interrupted_while_loading_is_stopped(
    tmp_path: Path, fake_tritonserver: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C during the (up to minutes long) model load used to leave the server running in its
    own session, and the next `stack up` skipped starting one because it was 'running'."""
    (tmp_path / "repo").mkdir()
    scans = 0
    real_scan = triton_server._scan_log

    def interrupted_scan(path: Path, offset: int) -> tuple[int, str | None, bool]:
        nonlocal scans
        scans += 1
        if scans == 3:
            raise KeyboardInterrupt
        return real_scan(path, offset)

    monkeypatch.setattr(triton_server, "_scan_log", interrupted_scan)
    server = TritonServer(tmp_path / "repo", tmp_path / "run", http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(KeyboardInterrupt):
        server.start(timeout_s=60)
    pid = int((tmp_path / "run" / "triton.json").read_text().split('"pid": ')[1].split(",")[0])
    assert _wait_dead(pid, timeout_s=2.0)
    assert not server.is_running()


def test_a_tritonserver_started_for_tests_dies_with_the_process_that_started_it(
    tmp_path: Path, fake_tritonserver: Path
) -> None:
    """CI's timeout kill skips the fixtures' finally blocks: the servers they started kept running
    (the test broker already died with pytest, tritonserver did not)."""
    (tmp_path / "repo").mkdir()
    run_dir = tmp_path / "run"
    starter = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; import infra.triton_server as t;"
            "t.tritonserver_binary = lambda: Path(sys.argv[1]);"
            "t.TritonServer(Path(sys.argv[2]), Path(sys.argv[3]), http_port=0, grpc_port=0, metrics_port=0,"
            " die_with_parent=True).start(timeout_s=120)",
            str(fake_tritonserver),
            str(tmp_path / "repo"),
            str(run_dir),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        while not (run_dir / "tritonserver.pid").exists():
            assert starter.poll() is None, "the starting process exited early"
            assert time.monotonic() < deadline, "the server was never started"
            time.sleep(0.1)
        pid = int((run_dir / "tritonserver.pid").read_text())
        assert pid_alive(pid)
    finally:
        starter.kill()
        starter.wait()
    assert _wait_dead(pid), "tritonserver outlived the process that started it"


def test_waiting_for_a_triton_that_another_shell_started_fails_when_it_never_gets_ready(
    tmp_path: Path, fake_tritonserver: Path
) -> None:
    """`stack up` beside a server still loading (or hung) used to go on as if it were ready."""
    (tmp_path / "repo").mkdir()
    loading = TritonServer(tmp_path / "repo", tmp_path / "run", http_port=0, grpc_port=0, metrics_port=0)
    outcome: list[BaseException] = []

    def start_and_give_up() -> None:
        try:
            loading.start(timeout_s=8)
        except TritonStartError as exc:
            outcome.append(exc)

    starter = threading.Thread(target=start_and_give_up)
    starter.start()
    try:
        deadline = time.monotonic() + 5
        while not loading.is_running():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other_shell = TritonServer.from_run_dir(tmp_path / "run")
        assert other_shell.is_running()
        with pytest.raises(TritonStartError, match="runs but is not ready"):
            other_shell.wait_ready(timeout_s=1.0)
    finally:
        starter.join()
    assert len(outcome) == 1 and not loading.is_running()


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_interrupted_while_starting_is_stopped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The broker runs in its own session: Ctrl-C while waiting for it used to leave it behind."""
    pids: list[int] = []

    def interrupted_probe(bootstrap: str, timeout_s: float = 2.0) -> bool:
        pids.append(int((tmp_path / "kafka" / "kafka.pid").read_text()))
        raise KeyboardInterrupt

    monkeypatch.setattr(kafka_broker, "broker_answers", interrupted_probe)
    broker = KafkaBroker(tmp_path / "kafka", port=0, controller_port=0)
    with pytest.raises(KeyboardInterrupt):
        broker.start(timeout_s=60)
    assert len(pids) == 1 and _wait_dead(pids[0], timeout_s=2.0)
    assert not broker.is_running()


def test_jars_resolved_from_another_pom_are_fetched_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The jar cache was keyed on the Kafka version alone: after a POM change (a log4j bump) every
    clone kept running the old jars, and setup said all was installed. Keyed by the POM too, the
    old jars stay where a broker of another clone may be using them."""
    from infra import kafka_install

    monkeypatch.setenv("RECSTREAM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))  # no mvn: a reinstall says so
    home = kafka_install.kafka_home()
    (home / "libs").mkdir(parents=True)
    (home / kafka_install.MARKER).write_text("{}")
    assert kafka_install.install() == home / "libs"  # resolved from this POM: nothing to do

    monkeypatch.setattr(kafka_install, "POM", tmp_path / "pom.xml")
    (tmp_path / "pom.xml").write_text("<project>another</project>")
    assert kafka_install.kafka_home() != home
    with pytest.raises(kafka_install.BrokerError, match="Maven"):
        kafka_install.install()
    assert (home / "libs").is_dir()  # the other POM's jars are left alone


def test_setup_refuses_a_venv_directory_it_does_not_manage(tmp_path: Path) -> None:
    """`ln -sfn` into a real .venv directory (one made by `python -m venv .venv`) put the link inside
    it and reported success: every target then ran on that unlocked environment."""
    import shutil

    for name in ("Makefile", "requirements.lock"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    cache = tmp_path / "cache"  # nothing installed here: the guard must stop make before any install
    result = subprocess.run(
        ["make", "--no-print-directory", "venv", f"CACHE_DIR={cache}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert ".venv is a directory" in result.stderr
    assert sorted(p.name for p in (tmp_path / ".venv").iterdir()) == ["bin"]  # no link put inside
    assert not cache.exists()


def test_waiting_for_a_broker_that_another_shell_started_fails_when_it_never_answers(tmp_path: Path) -> None:
    """`stack up` beside a broker still starting used to fail at once ('runs but does not answer');
    it waits, and names the broker when it never answers."""
    from infra.kafka_broker import RUN_DIR_PROPERTY, BrokerError, wait_for_broker
    from infra.processes import free_port

    run_dir = tmp_path / "kafka"
    run_dir.mkdir()
    broker = KafkaBroker(run_dir, port=free_port(), controller_port=free_port())
    starting = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", f"-D{RUN_DIR_PROPERTY}={broker.run_dir}"]
    )
    try:
        broker.pid_file.write_text(f"{starting.pid}\n")
        assert broker.is_running()
        t0 = time.monotonic()
        with pytest.raises(BrokerError, match="runs but is not ready"):
            wait_for_broker(broker, timeout_s=2.0)
        assert time.monotonic() - t0 >= 2.0
        starting.kill()
        starting.wait()
        with pytest.raises(BrokerError, match="exited"):
            wait_for_broker(broker, timeout_s=5.0)
    finally:
        starting.kill()
        starting.wait()

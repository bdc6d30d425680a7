"""A real single-node Apache Kafka broker (KRaft) for the local stack and the tests, without Docker.

Version choice (evidence gathered on this project's machine):
Kafka 4.4.0, the newest release on Maven Central (2026-11-29), tried first and kept. 4.x dropped old
protocol versions (produce v0-2, fetch v0-3, ...); every client here is confluent-kafka 2.16.1
(librdkafka 2.16.0), which speaks the current ones, so there was no need to fall back to 3.9.x.
Measured here (2 shared cores, load average about 7): start-to-ready 2.3 s idle and 6-11 s under load;
stop (SIGTERM) under 1.5 s; install 18.5 s with an empty ~/.m2, 2-4 s with a warm one,
0.35 s when it is already there; 45 jars, 44.6 MB (plus about 65 MB in ~/.m2).

How it works: Maven resolves the broker jars (infra/kafka/pom.xml) into
``$RECSTREAM_CACHE_DIR/kafka-<version>/libs`` once (a marker file makes re-runs instant); the launcher
writes a KRaft ``server.properties`` into a run directory, formats the storage with a random cluster
id and starts ``java -cp libs/* kafka.Kafka server.properties`` detached, with a PID file so another
process (the CLI, ``make down``) can stop it. Readiness means a Kafka client really got metadata back.

Installing the jars: infra.kafka_install; tests: infra.kafka_testing; CLI: ``python -m infra.kafka_cli``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from infra import kafka_install
from infra.kafka_install import KAFKA_VERSION, BrokerError, tail
from infra.processes import command_line, free_port, parent_death_signal, port_in_use, wait_until_ready
from infra.processes import pid_alive as _pid_alive

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RUN_DIR = REPO_ROOT / "run" / "kafka"
HOST = "127.0.0.1"
# The broker's own JVM, for two cores shared with many processes: a small heap, the serial collector
# (no concurrent GC threads) and two JIT compiler threads. With one network and two I/O threads
# (below) the broker cost 1.5 instead of 1.8 CPU-ms per request in bench-stream's first minute
# (A/B, 2+2 runs), where C2 compilation alone took up to 0.43 cores; steady state ~0.18 cores at
# 200 req/s either way.
BROKER_JVM_OPTS = ("-Xms128m", "-XX:+UseSerialGC", "-XX:CICompilerCount=2", "-XX:+ExitOnOutOfMemoryError")
# One-shot tools (storage format) should just start fast.
TOOL_JVM_OPTS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
RUN_DIR_PROPERTY = "recstream.kafka.run_dir"


def _file_tail(path: Path, lines: int = 40) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except FileNotFoundError:
        return f"(no log at {path})"


def wait_for_broker(broker: KafkaBroker, timeout_s: float = 60.0) -> str:
    """Block until a broker started elsewhere (another shell's `stack up`) answers; BrokerError if
    its process exits or it does not answer within ``timeout_s``."""

    def what() -> str:
        return f"the Kafka broker from {broker.run_dir} (at {broker.bootstrap}; log {broker.log_file})"

    wait_until_ready(
        lambda: broker_answers(broker.bootstrap, timeout_s=2.0), broker.is_running, timeout_s, what, BrokerError, 0.5
    )
    return broker.bootstrap


def random_cluster_id() -> str:
    """Kafka's cluster-id format: a UUID's 16 bytes, URL-safe base64 without padding.

    Never one that starts with '-' (1 in 64 do): the storage tool would read it as an option and exit
    1 ("argument --cluster-id/-t: expected one argument"), the flaky format failure seen in test
    runs. Kafka's own Uuid.randomUuid() redraws those too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def broker_answers(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """The broker returned cluster metadata with at least one broker, i.e. clients can use it."""
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=min(timeout_s, 1.0)):
            pass
    except OSError:
        return False
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0, "socket.timeout.ms": 2000})
    try:
        md = admin.list_topics(timeout=timeout_s)
    except Exception as exc:  # KafkaException while the broker is still starting
        log.debug("broker %s not ready: %s", bootstrap, exc)
        return False
    return len(md.brokers) >= 1


@dataclass(frozen=True)
class _State:
    """What a running broker looks like on disk, so another process can find and stop it."""

    pid: int
    port: int
    controller_port: int
    version: str


class KafkaBroker:
    """One local KRaft broker+controller process whose state lives in ``run_dir``.

    ``port=0`` / ``controller_port=0`` pick free ports at ``start()``. The chosen ports and PID are
    written to ``run_dir/broker.json`` and ``run_dir/kafka.pid``; ``KafkaBroker.from_run_dir`` reads them.
    ``die_with_parent`` (tests): the JVM gets SIGTERM when the starting process dies, even by SIGKILL,
    so an aborted test run leaves no broker behind; the CLI leaves it off so the broker outlives it.
    """

    def __init__(
        self,
        run_dir: Path | str = DEFAULT_RUN_DIR,
        port: int = 9092,
        controller_port: int = 9093,
        version: str = KAFKA_VERSION,
        heap: str = "512m",
        auto_create_topics: bool = False,
        extra_config: dict[str, str] | None = None,
        die_with_parent: bool = False,
        cluster_id: str | None = None,
    ) -> None:
        self.run_dir = Path(run_dir).resolve()
        self.port = port
        self.controller_port = controller_port
        self.version = version
        self.heap = heap
        self.auto_create_topics = auto_create_topics
        self.extra_config = dict(extra_config or {})
        self.die_with_parent = die_with_parent
        self.cluster_id = cluster_id  # the nodes of one cluster format their storage with the same id
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths -------------------------------------------------------------------------------------
    @property
    def properties_file(self) -> Path:
        return self.run_dir / "server.properties"

    @property
    def log_file(self) -> Path:
        return self.run_dir / "kafka.log"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "kafka.pid"

    @property
    def state_file(self) -> Path:
        return self.run_dir / "broker.json"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def bootstrap(self) -> str:
        if self.port == 0:
            raise BrokerError("port not chosen yet: call start() first (port=0 picks one)")
        return f"{HOST}:{self.port}"

    @classmethod
    def from_run_dir(cls, run_dir: Path | str = DEFAULT_RUN_DIR) -> KafkaBroker:
        """The broker last started in ``run_dir`` (ports and version from its state file)."""
        broker = cls(run_dir)
        try:
            state = json.loads(broker.state_file.read_text())
        except (FileNotFoundError, ValueError):
            return broker
        broker.port = int(state["port"])
        broker.controller_port = int(state["controller_port"])
        broker.version = str(state["version"])
        return broker

    # -- lifecycle ---------------------------------------------------------------------------------
    def install(self) -> Path:
        return kafka_install.install(self.version)

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        try:
            return int(self.pid_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def is_running(self) -> bool:
        """The broker process from this run dir is alive (not necessarily ready yet)."""
        if self._proc is not None:
            return self._proc.poll() is None
        pid = self.pid
        if pid is None or not _pid_alive(pid):
            return False
        # Guard against PID reuse: only a JVM launched for this run dir counts.
        return f"-D{RUN_DIR_PROPERTY}={self.run_dir}" in command_line(pid)

    def start(self, timeout_s: float = 30.0) -> str:
        """Start the broker (idempotent) and return its bootstrap once a client gets metadata back.

        Raises ``BrokerError`` with the log tail if the process dies, a port is taken, or it is not
        ready within ``timeout_s``; a broker that did not become ready is killed, never left behind.
        """
        if self.is_running() and self.port and broker_answers(self.bootstrap):
            log.info("Kafka already running at %s (pid %s)", self.bootstrap, self.pid)
            return self.bootstrap
        if self.is_running():
            raise BrokerError(
                f"a Kafka process (pid {self.pid}) from {self.run_dir} runs but does not answer; "
                f"stop it first\n{_file_tail(self.log_file)}"
            )
        libs = self.install()
        auto_ports = self.port == 0 or self.controller_port == 0
        attempts = 3 if auto_ports else 1
        want_port, want_cport = self.port, self.controller_port
        for attempt in range(1, attempts + 1):
            self.port = want_port or free_port()
            self.controller_port = want_cport or free_port()
            while self.controller_port == self.port:
                self.controller_port = free_port()
            try:
                return self._start_once(libs, timeout_s)
            except _PortTaken as exc:
                if attempt == attempts:
                    raise BrokerError(str(exc)) from None
                log.warning("%s; retrying with other free ports", exc)
        raise AssertionError("unreachable")

    def _start_once(self, libs: Path, timeout_s: float) -> str:
        for port in (self.port, self.controller_port):
            if port_in_use(port, HOST):
                raise _PortTaken(f"port {port} on {HOST} is already in use; cannot start Kafka from {self.run_dir}")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._write_config()
        if not (self.data_dir / "meta.properties").exists():
            self._format_storage(libs)
        started = time.monotonic()
        cmd = [
            "java",
            f"-Xmx{self.heap}",
            *BROKER_JVM_OPTS,
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.run_dir}",
            f"-D{RUN_DIR_PROPERTY}={self.run_dir}",
            "-cp",
            f"{libs}/*",
            "kafka.Kafka",
            str(self.properties_file),
        ]
        with open(self.log_file, "ab") as out:
            out.write(f"\n==== starting Kafka {self.version} at {time.strftime('%F %T')} ====\n".encode())
            out.flush()
            self._proc = subprocess.Popen(  # detached: survives the CLI that started it
                cmd,
                cwd=self.run_dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=parent_death_signal if self.die_with_parent else None,
            )
        self.pid_file.write_text(f"{self._proc.pid}\n")
        self.state_file.write_text(
            json.dumps(
                {
                    "pid": self._proc.pid,
                    "port": self.port,
                    "controller_port": self.controller_port,
                    "version": self.version,
                    "bootstrap": self.bootstrap,
                }
            )
            + "\n"
        )
        log.info("started Kafka %s pid %d, waiting for %s", self.version, self._proc.pid, self.bootstrap)
        try:
            return self._wait_ready(started, timeout_s)
        except BaseException:
            # Ctrl-C or an unexpected error while waiting: a broker that never became ready is not
            # left running in its own session for the next `stack up` to mistake for a live one.
            if self._proc is not None and self._proc.poll() is None:
                self.stop(grace_s=5)
            raise

    def _wait_ready(self, started: float, timeout_s: float) -> str:
        assert self._proc is not None
        deadline = started + timeout_s
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = _file_tail(self.log_file)
                self._forget()
                if "Address already in use" in tail:
                    raise _PortTaken(f"Kafka could not bind its ports ({self.port}/{self.controller_port}):\n{tail}")
                raise BrokerError(f"Kafka exited with code {code} during start-up; log {self.log_file}:\n{tail}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop(grace_s=5)
                raise BrokerError(
                    f"Kafka was not ready at {self.bootstrap} within {timeout_s:.0f} s (killed it); "
                    f"log {self.log_file}:\n{_file_tail(self.log_file)}"
                )
            if broker_answers(self.bootstrap, timeout_s=max(0.5, min(2.0, remaining))):
                log.info("Kafka ready at %s in %.1f s", self.bootstrap, time.monotonic() - started)
                return self.bootstrap
            time.sleep(0.2)

    def kill9(self) -> None:
        """SIGKILL, no clean shutdown: what a crashed machine looks like to the cluster (tests)."""
        pid = self.pid
        if pid is not None and self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)
        self._forget()

    def stop(self, grace_s: float = 20.0) -> bool:
        """SIGTERM (clean shutdown), then SIGKILL after ``grace_s``. Returns whether a process was stopped."""
        pid = self.pid
        if pid is None or not self.is_running():
            self._forget()
            return False
        log.info("stopping Kafka pid %d", pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not self._wait_exit(pid, grace_s):
            log.warning("Kafka pid %d ignored SIGTERM for %.0f s; killing it", pid, grace_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            self._wait_exit(pid, 10)
        self._forget()
        return True

    def _wait_exit(self, pid: int, timeout_s: float) -> bool:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout_s)
                return True
            except subprocess.TimeoutExpired:
                return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not _pid_alive(pid):
                return True
            time.sleep(0.1)
        return not _pid_alive(pid)

    def _forget(self) -> None:
        self._proc = None
        self.pid_file.unlink(missing_ok=True)

    # -- files -------------------------------------------------------------------------------------
    def config(self) -> dict[str, str]:
        """The broker's settings: single node, replication 1, small thread pools and buffers."""
        cfg = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@{HOST}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{HOST}:{self.port},CONTROLLER://{HOST}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            # Topics come from the registry (recstream.contracts.topics) via the admin helper; a typo'd
            # topic name should fail loudly instead of silently creating a new topic.
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            "num.partitions": "1",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "4",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "num.network.threads": "1",
            "num.io.threads": "2",
            "background.threads": "2",
            "num.recovery.threads.per.data.dir": "1",
            "log.cleaner.threads": "1",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),  # default 128 MB would eat the heap
            "message.max.bytes": str(1024 * 1024 + 12),
        }
        if self.version.startswith("3."):  # share groups (and their settings) exist from 4.0 on
            cfg = {k: v for k, v in cfg.items() if not k.startswith("share.")}
        cfg.update(self.extra_config)
        return cfg

    def _write_config(self) -> None:
        lines = [f"# written by infra/kafka_broker.py for Kafka {self.version}; edits are overwritten"]
        lines += [f"{k}={v}" for k, v in self.config().items()]
        self.properties_file.write_text("\n".join(lines) + "\n")
        (self.run_dir / "log4j2.properties").write_text(_LOG4J2)

    def _format_storage(self, libs: Path) -> None:
        """KRaft needs formatted storage; a fresh random cluster id per run dir (the tool's output
        goes to the broker log)."""
        cmd = [
            "java",
            *TOOL_JVM_OPTS,
            f"-Dlog4j2.configurationFile={self.run_dir / 'log4j2.properties'}",
            "-cp",
            f"{libs}/*",
            "kafka.tools.StorageTool",
            "format",
            "-t",
            self.cluster_id or random_cluster_id(),
            "-c",
            str(self.properties_file),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        with open(self.log_file, "a") as out:
            out.write(f"\n==== storage format (exit {proc.returncode}) ====\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage in {self.data_dir} failed (exit {proc.returncode}):\n"
                f"{tail(proc.stdout + proc.stderr)}"
            )


class _PortTaken(BrokerError):
    """A port was taken between choosing and binding it; retried when the ports were picked for us."""


# Console only: the launcher redirects the JVM's stdout/stderr into run_dir/kafka.log.
_LOG4J2 = """\
status = warn
shutdownHook = disable
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = OUT
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.config.name = org.apache.kafka.common.config.AbstractConfig
logger.config.level = WARN
"""

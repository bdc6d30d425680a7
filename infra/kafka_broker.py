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

CLI: ``python -m infra.kafka_broker install|start|stop|status [--run-dir run/kafka] [--port 9092]``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import typer

from infra.processes import free_port
from infra.processes import pid_alive as _pid_alive

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
SCALA_VERSION = "2.13"
REPO_ROOT = Path(__file__).resolve().parent.parent
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
DEFAULT_RUN_DIR = REPO_ROOT / "run" / "kafka"
HOST = "127.0.0.1"
MARKER = ".complete"
# The broker's own JVM, for two cores shared with many processes: a small heap, the serial collector
# (no concurrent GC threads) and two JIT compiler threads. With one network and two I/O threads
# (below) the broker cost 1.5 instead of 1.8 CPU-ms per request in bench-stream's first minute
# (A/B, 2+2 runs), where C2 compilation alone took up to 0.43 cores; steady state ~0.18 cores at
# 200 req/s either way.
BROKER_JVM_OPTS = ("-Xms128m", "-XX:+UseSerialGC", "-XX:CICompilerCount=2", "-XX:+ExitOnOutOfMemoryError")
# One-shot tools (storage format) should just start fast.
TOOL_JVM_OPTS = ("-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1")
RUN_DIR_PROPERTY = "recstream.kafka.run_dir"


class BrokerError(RuntimeError):
    """Kafka could not be installed, started or stopped; the message says why and shows the log tail."""


def cache_dir() -> Path:
    """Downloads live outside the clone so a fresh clone (and CI) re-uses them."""
    return Path(os.environ.get("RECSTREAM_CACHE_DIR") or Path.home() / ".cache" / "recstream").expanduser()


def kafka_home(version: str = KAFKA_VERSION) -> Path:
    return cache_dir() / f"kafka-{version}"


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    return kafka_home(version) / "libs"


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def install(version: str = KAFKA_VERSION, force: bool = False) -> Path:
    """Fetch the broker jars once into the cache; later calls return at once (marker file).

    A file lock serialises concurrent installers (parallel test workers, ``make -j``); jars are
    resolved into a temporary folder and renamed, so a killed install never looks complete.
    """
    home = kafka_home(version)
    libs = home / "libs"
    marker = home / MARKER
    if marker.exists() and not force:
        return libs
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists() and not force:
            return libs
        mvn = shutil.which("mvn")
        if mvn is None:
            raise BrokerError("Maven ('mvn') is needed once to fetch the Kafka jars; install maven and retry")
        if shutil.which("java") is None:
            raise BrokerError("Java 17+ ('java') is needed to run the Kafka broker")
        tmp = home / f"libs.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        started = time.monotonic()
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(POM),
            f"-Dkafka.version={version}",
            "dependency:copy-dependencies",
            f"-DoutputDirectory={tmp}",
        ]
        log.info("installing Kafka %s jars into %s", version, libs)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        main_jar = tmp / f"kafka_{SCALA_VERSION}-{version}.jar"
        if proc.returncode != 0 or not main_jar.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise BrokerError(
                f"fetching Kafka {version} jars failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        seconds = time.monotonic() - started
        size = _dir_size(libs)
        info = {"version": version, "jars": len(list(libs.glob("*.jar"))), "bytes": size, "install_s": seconds}
        marker.write_text(json.dumps(info) + "\n")
        log.info("installed Kafka %s: %d jars, %.1f MB in %.1f s", version, info["jars"], size / 1e6, seconds)
        return libs


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _file_tail(path: Path, lines: int = 40) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except FileNotFoundError:
        return f"(no log at {path})"


def _port_in_use(port: int, host: str = HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def _random_cluster_id() -> str:
    """Kafka's cluster-id format: a UUID's 16 bytes, URL-safe base64 without padding.

    Never one that starts with '-' (1 in 64 do): the storage tool would read it as an option and exit
    1 ("argument --cluster-id/-t: expected one argument"), the flaky format failure seen in test
    runs. Kafka's own Uuid.randomUuid() redraws those too."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cluster_id.startswith("-"):
            return cluster_id


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


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
        return install(self.version)

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
        return f"-D{RUN_DIR_PROPERTY}={self.run_dir}" in _cmdline(pid)

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
            if _port_in_use(port):
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
                preexec_fn=_parent_death_signal if self.die_with_parent else None,
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
            self.cluster_id or _random_cluster_id(),
            "-c",
            str(self.properties_file),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
        with open(self.log_file, "a") as out:
            out.write(f"\n==== storage format (exit {proc.returncode}) ====\n{proc.stdout}{proc.stderr}")
        if proc.returncode != 0:
            raise BrokerError(
                f"formatting Kafka storage in {self.data_dir} failed (exit {proc.returncode}):\n"
                f"{_tail(proc.stdout + proc.stderr)}"
            )


class KafkaCluster:
    """A local KRaft cluster of `size` nodes on loopback, each broker and controller, for tests of
    replication and broker failure: topics get `size` replicas (the brokers' default replication,
    which topic creation uses) and acks=all writes need `min_insync` of them. A dead replica leaves
    the in-sync set after 5 s (replica.lag.time.max.ms; Kafka's 30 s would stall such writes)."""

    def __init__(self, run_dir: Path | str, size: int = 3, min_insync: int = 2, heap: str = "256m") -> None:
        ports = []
        while len(ports) < 2 * size:  # every node's two ports, all different, known before any starts
            port = free_port()
            if port not in ports:
                ports.append(port)
        voters = ",".join(f"{i + 1}@{HOST}:{ports[2 * i + 1]}" for i in range(size))
        shared = {
            "controller.quorum.voters": voters,
            "default.replication.factor": str(size),
            "min.insync.replicas": str(min_insync),
            "offsets.topic.replication.factor": str(size),
            "transaction.state.log.replication.factor": str(size),
            "transaction.state.log.min.isr": str(min_insync),
            "share.coordinator.state.topic.replication.factor": str(size),
            "share.coordinator.state.topic.min.isr": str(min_insync),
            "replica.lag.time.max.ms": "5000",
            # a killed node is fenced, and its partitions led elsewhere, after 4 s (Kafka: 9 s)
            "broker.session.timeout.ms": "4000",
            "broker.heartbeat.interval.ms": "1000",
        }
        cluster_id = _random_cluster_id()
        self._stopped = threading.Event()
        self.nodes = [
            KafkaBroker(
                Path(run_dir) / f"node-{i + 1}",
                port=ports[2 * i],
                controller_port=ports[2 * i + 1],
                heap=heap,
                extra_config={**shared, "node.id": str(i + 1)},
                die_with_parent=True,
                cluster_id=cluster_id,
            )
            for i in range(size)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    def start(self, timeout_s: float = 120.0) -> str:
        """Start every node at once (none answers before a quorum of controllers is up). Each node
        is launched from a thread that lives until stop(): Linux's parent-death signal follows the
        launching *thread*, so a thread that returned would take its JVM with it."""
        errors: list[BaseException] = []
        started = threading.Barrier(len(self.nodes) + 1)

        def run(node: KafkaBroker) -> None:
            try:
                node.start(timeout_s=timeout_s)
            except BaseException as exc:  # reported below, after every node was tried
                errors.append(exc)
            started.wait()
            self._stopped.wait()

        self._stopped.clear()
        for node in self.nodes:
            threading.Thread(target=run, args=(node,), name=f"kafka-node-{node.port}", daemon=True).start()
        started.wait()
        if errors:
            self.stop()
            raise BrokerError(f"Kafka cluster did not start: {errors[0]}")
        return self.bootstrap

    def stop(self) -> None:
        for node in self.nodes:
            node.stop(grace_s=10)
        self._stopped.set()


def _parent_death_signal() -> None:
    """Runs in the forked child: ask Linux to SIGTERM it when the parent goes away."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


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


# -- tests: Docker when present, else the local broker -------------------------------------------------
def docker_available(timeout_s: float = 3.0) -> bool:
    """A Docker engine answers a ping (socket or DOCKER_HOST)."""
    if not os.environ.get("DOCKER_HOST") and not Path("/var/run/docker.sock").exists():
        return False
    try:
        import docker

        client = docker.from_env(timeout=int(max(1, timeout_s)))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception as exc:
        log.debug("no Docker engine: %s", exc)
        return False


def _start_docker_broker(version: str, timeout_s: float) -> tuple[str, Callable[[], None]]:
    """``apache/kafka:<version>`` via testcontainers, its listener on the same free port inside and out.

    testcontainers' ``KafkaContainer`` only knows the confluentinc image layout, so the official image
    is configured through its ``KAFKA_*`` environment variables on a generic container instead.
    """
    from testcontainers.core.container import DockerContainer

    port = free_port()
    container = (
        DockerContainer(f"apache/kafka:{version}")
        .with_bind_ports(port, port)
        .with_env("CLUSTER_ID", _random_cluster_id())
        .with_env("KAFKA_NODE_ID", "1")
        .with_env("KAFKA_PROCESS_ROLES", "broker,controller")
        .with_env("KAFKA_LISTENERS", f"PLAINTEXT://0.0.0.0:{port},CONTROLLER://localhost:9093")
        .with_env("KAFKA_ADVERTISED_LISTENERS", f"PLAINTEXT://{HOST}:{port}")
        .with_env("KAFKA_CONTROLLER_LISTENER_NAMES", "CONTROLLER")
        .with_env("KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT")
        .with_env("KAFKA_CONTROLLER_QUORUM_VOTERS", "1@localhost:9093")
        .with_env("KAFKA_AUTO_CREATE_TOPICS_ENABLE", "false")
        .with_env("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_TRANSACTION_STATE_LOG_MIN_ISR", "1")
        .with_env("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_REPLICATION_FACTOR", "1")
        .with_env("KAFKA_SHARE_COORDINATOR_STATE_TOPIC_MIN_ISR", "1")
        .with_env("KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS", "0")
        .with_env("KAFKA_HEAP_OPTS", "-Xmx512m")
    )
    container.start()
    bootstrap = f"{HOST}:{port}"
    deadline = time.monotonic() + timeout_s
    while not broker_answers(bootstrap):
        if time.monotonic() > deadline:
            logs = b"".join(container.get_logs()).decode(errors="replace")
            container.stop()
            raise BrokerError(f"apache/kafka:{version} not ready at {bootstrap} in {timeout_s:.0f} s:\n{_tail(logs)}")
        time.sleep(0.5)
    return bootstrap, container.stop


def start_test_broker(
    run_dir: Path | str,
    *,
    backend: str | None = None,
    version: str = KAFKA_VERSION,
    timeout_s: float = 30.0,
) -> tuple[str, Callable[[], None]]:
    """A broker for a pytest session: ``(bootstrap, stop)``. Raises ``BrokerError``; never skips.

    ``backend`` (or ``RECSTREAM_KAFKA_BACKEND``): ``local`` (JVM from the jar cache, free ports),
    ``docker`` (testcontainers), or ``auto`` (default: Docker when an engine answers, falling back to
    the local broker if the container fails).
    """
    backend = (backend or os.environ.get("RECSTREAM_KAFKA_BACKEND") or "auto").lower()
    if backend not in {"auto", "local", "docker"}:
        raise ValueError(f"unknown Kafka backend {backend!r}: use auto, local or docker")
    docker_error: Exception | None = None
    if backend == "docker" or (backend == "auto" and docker_available()):
        try:
            return _start_docker_broker(version, max(timeout_s, 60.0))
        except Exception as exc:
            if backend == "docker":
                raise BrokerError(f"Kafka in Docker (apache/kafka:{version}) did not start: {exc}") from exc
            docker_error = exc
            log.warning("Kafka in Docker failed (%s); using the local broker", exc)
    broker = KafkaBroker(run_dir, port=0, controller_port=0, version=version, die_with_parent=True)
    try:
        bootstrap = broker.start(timeout_s=timeout_s)
    except BrokerError as exc:
        if docker_error is not None:
            raise BrokerError(f"{exc}\n(Docker was tried first and failed: {docker_error})") from exc
        raise
    return bootstrap, broker.stop


# -- CLI -----------------------------------------------------------------------------------------------
cli = typer.Typer(add_completion=False, help="Local Apache Kafka broker (KRaft) for the recstream stack.")
RunDirOpt = typer.Option(DEFAULT_RUN_DIR, "--run-dir", help="Config, data, log and PID file of the broker")


@cli.command("install")
def _cli_install(
    version: str = typer.Option(KAFKA_VERSION, help="Kafka release"),
    force: bool = typer.Option(False, help="Re-download even if the cache is complete"),
) -> None:
    """Fetch the broker jars into $RECSTREAM_CACHE_DIR (once)."""
    started = time.monotonic()
    libs = install(version, force=force)
    size = _dir_size(libs)
    print(f"Kafka {version} jars at {libs}: {size / 1e6:.1f} MB (checked in {time.monotonic() - started:.1f} s)")


@cli.command("start")
def _cli_start(
    run_dir: Path = RunDirOpt,
    port: int = typer.Option(9092, help="Client port; 0 = pick a free one"),
    controller_port: int = typer.Option(9093, help="KRaft controller port; 0 = pick a free one"),
    version: str = typer.Option(KAFKA_VERSION, help="Kafka release"),
    timeout_s: float = typer.Option(30.0, help="Seconds to wait for the broker to answer"),
) -> None:
    """Start the broker detached and wait until clients can use it."""
    started = time.monotonic()
    broker = KafkaBroker(run_dir, port=port, controller_port=controller_port, version=version)
    existing = KafkaBroker.from_run_dir(run_dir)
    if existing.is_running():  # idempotent: report the broker this run dir already has
        broker = existing
    try:
        bootstrap = broker.start(timeout_s=timeout_s)
    except BrokerError as exc:
        print(exc, file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"Kafka {version} ready at {bootstrap} (pid {broker.pid}) in {time.monotonic() - started:.1f} s")


@cli.command("stop")
def _cli_stop(run_dir: Path = RunDirOpt, grace_s: float = typer.Option(20.0, help="SIGTERM grace period")) -> None:
    """Stop the broker started from this run dir (by PID file)."""
    stopped = KafkaBroker.from_run_dir(run_dir).stop(grace_s=grace_s)
    print("Kafka stopped" if stopped else "Kafka was not running")


@cli.command("status")
def _cli_status(run_dir: Path = RunDirOpt) -> None:
    """Exit 0 when the broker runs and answers, 1 otherwise."""
    broker = KafkaBroker.from_run_dir(run_dir)
    if not broker.is_running():
        print(f"Kafka not running (run dir {broker.run_dir})")
        raise typer.Exit(1)
    ready = broker_answers(broker.bootstrap)
    print(f"Kafka {broker.version} pid {broker.pid} at {broker.bootstrap}: {'ready' if ready else 'NOT answering'}")
    raise typer.Exit(0 if ready else 1)


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    cli()


if __name__ == "__main__":
    main()

"""The pinned Kafka release's broker jars, fetched once with Maven (infra/kafka/pom.xml) into a cache
outside the clone, so a fresh clone and CI re-use them (`make setup` runs `install`)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)

KAFKA_VERSION = "4.4.0"
SCALA_VERSION = "2.13"
POM = Path(__file__).resolve().parent / "kafka" / "pom.xml"
MARKER = ".complete"
#: Maven resolves a few dozen jars in about a minute; one that hangs (a broken proxy) must not hold
#: the install lock, and every installer waiting on it, for ever.
MAVEN_TIMEOUT_S = 900.0


class BrokerError(RuntimeError):
    """Kafka could not be installed, started or stopped; the message says why and shows the log tail."""


def pom_hash() -> str:
    """What the jars are resolved from: a changed POM (a log4j bump, a new dependency) is a new install."""
    return hashlib.sha256(POM.read_bytes()).hexdigest()[:16]


def cache_dir() -> Path:
    """Downloads live outside the clone so a fresh clone (and CI) re-uses them."""
    return Path(os.environ.get("RECSTREAM_CACHE_DIR") or Path.home() / ".cache" / "recstream").expanduser()


def kafka_home(version: str = KAFKA_VERSION) -> Path:
    """Keyed by the version and the POM's hash: clones on different POMs share the cache side by
    side, and a POM change fetches anew without deleting jars a running broker uses."""
    return cache_dir() / f"kafka-{version}-{pom_hash()}"


def libs_dir(version: str = KAFKA_VERSION) -> Path:
    return kafka_home(version) / "libs"


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def install(version: str = KAFKA_VERSION, force: bool = False) -> Path:
    """Fetch the broker jars once into the cache (a folder per version and POM); later calls return
    at once (marker file).

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
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=MAVEN_TIMEOUT_S)
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BrokerError(
                f"fetching Kafka {version} jars took over {MAVEN_TIMEOUT_S:.0f} s (stopped): {' '.join(cmd)}; "
                "check Maven's network access (proxy, ~/.m2/settings.xml)"
            ) from exc
        main_jar = tmp / f"kafka_{SCALA_VERSION}-{version}.jar"
        if proc.returncode != 0 or not main_jar.exists():
            shutil.rmtree(tmp, ignore_errors=True)
            raise BrokerError(
                f"fetching Kafka {version} jars failed (exit {proc.returncode}): {' '.join(cmd)}\n"
                f"{tail(proc.stdout + proc.stderr)}"
            )
        shutil.rmtree(libs, ignore_errors=True)
        tmp.rename(libs)
        seconds = time.monotonic() - started
        size = dir_size(libs)
        info = {
            "version": version,
            "pom": pom_hash(),
            "jars": len(list(libs.glob("*.jar"))),
            "bytes": size,
            "install_s": seconds,
        }
        marker.write_text(json.dumps(info) + "\n")
        log.info("installed Kafka %s: %d jars, %.1f MB in %.1f s", version, info["jars"], size / 1e6, seconds)
        return libs


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])

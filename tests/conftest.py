"""Session fixtures: the REAL Kafka broker and the REAL tritonserver, started once per test run.

A test that asks for either fails (never skips) when it cannot start: BrokerError or
TritonStartError propagates out of the fixture. Each test gets its own topic prefix so tests
never see each other's messages.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from recstream.config import REPO_ROOT, Settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: The session fixtures that start a real component, and the marker a test using one must carry.
_NEEDS = {"kafka_bootstrap": "kafka", "triton_server": "triton"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by the components its fixtures start (directly or through make_settings), so
    `make test-fast` (-m "not kafka and not triton") never starts a broker or a tritonserver."""
    for item in items:
        for fixture, marker in _NEEDS.items():
            if fixture in getattr(item, "fixturenames", ()) and marker not in item.keywords:
                item.add_marker(marker)


@pytest.fixture(scope="session", autouse=True)
def _servers_die_with_pytest() -> Iterator[None]:
    """Every tritonserver a test starts gets SIGTERM if pytest dies (CI's timeout kill skips the
    fixtures' finally blocks), as the test broker does: none is left loaded on a reused runner."""
    from infra.triton_server import TritonServer

    TritonServer.die_with_parent = True
    yield
    TritonServer.die_with_parent = False


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (bound, then released): for a server to take, or the
    address of a component that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def run_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def kafka_bootstrap(run_root: Path) -> Iterator[str]:
    from infra.kafka_testing import start_test_broker

    bootstrap, stop = start_test_broker(run_root / "kafka")
    try:
        yield bootstrap
    finally:
        stop()


@pytest.fixture(scope="session")
def triton_server(run_root: Path):
    """tritonserver over the repository's model_repo (explicit model control, every model loaded)."""
    from infra.triton_server import TritonServer

    server = TritonServer(REPO_ROOT / "model_repo", run_root / "triton", http_port=0, grpc_port=0, metrics_port=0)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def make_settings(kafka_bootstrap: str, tmp_path: Path) -> Callable[..., Settings]:
    """Settings bound to the test broker with a fresh topic prefix; topics created from the registry."""
    from recstream.kafka.admin import ensure_topics

    def factory(**overrides) -> Settings:
        values = {
            "kafka_bootstrap": kafka_bootstrap,
            "topic_prefix": f"t{uuid.uuid4().hex[:10]}.",
            "qdrant_path": tmp_path / "qdrant",
            "run_dir": tmp_path / "run",
        }
        values.update(overrides)
        settings = Settings(**values)
        ensure_topics(settings)
        return settings

    return factory


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture(scope="session")
def live_stack(kafka_bootstrap: str, triton_server, tmp_path_factory: pytest.TempPathFactory):
    """One live stack (worker process + gateway) per session, for the gateway and Prometheus tests."""
    from live_stack import start_live_stack

    stack = start_live_stack(kafka_bootstrap, triton_server, tmp_path_factory.mktemp("live"))
    try:
        yield stack
    finally:
        stack.stop()
        print(stack.worker.tail(2000))

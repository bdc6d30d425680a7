"""docker-compose.yml cannot run here (no Docker engine); check everything it refers to is real."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

from infra.kafka_install import KAFKA_VERSION
from recstream.config import REPO_ROOT

COMPOSE = REPO_ROOT / "docker-compose.yml"


class ComposeLoader(yaml.SafeLoader):
    """Compose's own tags (`!reset`, `!override`) are not YAML core; read them as plain values."""


for _tag in ("!reset", "!override"):
    ComposeLoader.add_constructor(
        _tag,
        lambda loader, node: (
            loader.construct_mapping(node)
            if isinstance(node, yaml.MappingNode)
            else loader.construct_sequence(node)
            if isinstance(node, yaml.SequenceNode)
            else None
        ),
    )


def load(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=ComposeLoader)


def services() -> dict[str, dict]:
    return load(COMPOSE)["services"]


def test_every_service_has_an_image_or_a_buildable_dockerfile() -> None:
    for name, svc in services().items():
        assert "image" in svc or "build" in svc, name
        if "build" in svc:
            build = svc["build"]
            dockerfile = REPO_ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
            for line in dockerfile.read_text().splitlines():
                if line.startswith("COPY ") and "--from" not in line:
                    for src in line.split()[1:-1]:
                        assert (REPO_ROOT / src).exists(), f"{dockerfile.name}: COPY source {src} missing"


def test_ports_and_mounted_files_exist() -> None:
    seen_host_ports: set[str] = set()
    for name, svc in services().items():
        for port in svc.get("ports", []):
            host, _, container = str(port).partition(":")
            assert host.isdigit() and container.isdigit(), f"{name}: port {port}"
            assert host not in seen_host_ports, f"{name}: host port {host} used twice"
            seen_host_ports.add(host)
        for volume in svc.get("volumes", []):
            src = volume.split(":")[0]
            if src.startswith("./"):
                assert (REPO_ROOT / src).exists(), f"{name}: mounted {src} missing"


def test_kafka_is_the_release_the_local_stack_installs() -> None:
    assert services()["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_worker_commands_name_real_modules() -> None:
    for name, svc in services().items():
        cmd = svc.get("command") or []
        if cmd[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(cmd[2]) is not None, f"{name}: module {cmd[2]} not found"


def test_triton_serves_the_repository_model_repo() -> None:
    triton = services()["triton"]
    assert any(v.startswith("./model_repo:") for v in triton["volumes"])
    assert triton["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    cpu = load(REPO_ROOT / "docker-compose.cpu.yml")
    assert "triton" in cpu["services"], "the documented CPU override must drop the GPU reservation"


def test_prometheus_scrapes_compose_services_and_grafana_is_provisioned() -> None:
    prom = load(REPO_ROOT / "infra" / "prometheus" / "prometheus.yml")
    names = set(services())
    for job in prom["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in names, f"prometheus target {target} is not a compose service"
    ds = load(REPO_ROOT / "infra" / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert ds["datasources"][0]["url"] == "http://prometheus:9090"
    dashboards = list((REPO_ROOT / "infra" / "grafana" / "dashboards").glob("*.json"))
    assert dashboards
    for path in dashboards:
        dash = json.loads(path.read_text())
        for panel in dash["panels"]:
            for target in panel["targets"]:
                assert re.search(r"recstream_\w+", target["expr"]), f"{path.name}: {panel['title']}"


def test_state_lives_where_it_survives_and_writers_can_write() -> None:
    """Kafka's volume was mounted where the apache/kafka image does not write (its log.dirs default
    is under /tmp), so topics and offsets went with the container; the trainer ran as `nobody` and
    could not write the host-owned model_repo it is mounted with (it crash-looped)."""
    svc = services()
    kafka_volume = next(v.split(":", 1)[1] for v in svc["kafka"]["volumes"] if v.startswith("kafka-data:"))
    assert svc["kafka"]["environment"]["KAFKA_LOG_DIRS"] == kafka_volume
    for name, service in svc.items():
        writable_repo = [
            v for v in service.get("volumes", []) if v.startswith("./model_repo:") and not v.endswith(":ro")
        ]
        if writable_repo:
            # not ${UID}: bash's UID is read-only and unexported, so compose never sees it
            user = str(service.get("user", ""))
            assert "${RECSTREAM_UID" in user, f"{name} writes model_repo: run it as the host user"


def test_topics_are_provisioned_before_any_worker_starts() -> None:
    """A worker's start only warns when a topic's retention differs from the registry's: compose
    needs its own provisioning step, or topics kept in the volume never got new settings."""
    svc = services()
    assert svc["topics"]["command"][-1] == "topics" and svc["topics"]["restart"] == "no"
    for name in ("worker", "gateway", "trainer"):
        assert svc[name]["depends_on"]["topics"] == {"condition": "service_completed_successfully"}, name

"""Entry points: `python -m services.gateway` serves (and refuses to start without keys), and the
operator CLI's `bench NAME` runs `python -m bench.bench_NAME`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from recstream.config import REPO_ROOT
from recstream.ops import cli


def _gateway(port: int, keys: str) -> subprocess.Popen[bytes]:
    # Kafka is unreachable on purpose: the process must still start and answer liveness.
    env = dict(
        os.environ,
        GATEWAY_API_KEYS=keys,
        KAFKA_BOOTSTRAP="127.0.0.1:9",
        TRITON_URL="127.0.0.1:9",
        PYTHONPATH=str(REPO_ROOT),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "services.gateway", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def test_python_m_services_gateway_serves_health_and_playground(free_port: int) -> None:
    port = free_port
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


def test_gateway_refuses_to_start_without_keys(free_port: int) -> None:
    proc = _gateway(free_port, "")
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


def test_cli_models_list_promote_rollback(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    from recstream.config import get_settings
    from recstream.continual import ModelRegistry
    from recstream.models.export import export_ranker
    from recstream.models.ranker import RankerConfig, new_ranker

    repo = tmp_path / "model_repo"
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    ModelRegistry(repo).init_live()  # what the trainer does on its first start
    monkeypatch.setenv("MODEL_REPO", str(repo))
    monkeypatch.setenv("TRITON_URL", "127.0.0.1:9")  # no Triton: the switch happens on disk, reload fails
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        listed = json.loads(runner.invoke(cli.app, ["models", "list", "--model", "ranker"]).output)
        assert listed["live"] == 1 and list(listed["versions"]) == ["1"]  # described by its meta.json
        assert listed["versions"]["1"]["data_hash"] == "none"
        export_ranker(new_ranker(RankerConfig(seed=1)), repo, version=2)
        result = runner.invoke(cli.app, ["models", "promote", "2", "--reason", "test"])
        assert result.exit_code == 1 and "on disk" in result.output
        listed = json.loads(runner.invoke(cli.app, ["models", "list", "--model", "ranker"]).output)
        assert (listed["live"], listed["previous"], listed["served"]) == (2, 1, [1, 2])
        result = runner.invoke(cli.app, ["models", "rollback"])
        assert "live version is now 1" in result.output
        listed = json.loads(runner.invoke(cli.app, ["models", "list", "--model", "ranker"]).output)
        assert (listed["live"], listed["previous"]) == (1, None)
        assert [h["event"] for h in listed["history"]][-2:] == ["promote", "rollback"]
        # mistakes get a message, not a traceback, and leave the repository as it was
        result = runner.invoke(cli.app, ["models", "promote", "999"])
        assert result.exit_code == 2 and "v999 does not exist" in result.output, result.output
        result = runner.invoke(cli.app, ["models", "rollback"])
        assert result.exit_code == 1 and "no previous version" in result.output, result.output
        result = runner.invoke(cli.app, ["models", "rollback", "--model", "rankr"])
        assert result.exit_code == 2 and "serves no 'rankr'" in result.output, result.output
        assert sorted(p.name for p in repo.iterdir()) == ["ranker"]  # no folder for the typo
    finally:
        get_settings.cache_clear()


def test_a_first_promote_keeps_the_version_triton_served_and_reloads_the_named_model(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a repository without a registry (`make train` added v2 beside v1), `models promote 2`
    recorded no rollback target and unloaded v1; and `--model X` reloaded the ranker, not X."""
    import json

    from recstream.config import get_settings
    from recstream.continual import registry
    from recstream.models.export import export_ranker
    from recstream.models.ranker import RankerConfig, new_ranker

    reloaded: list[str] = []

    class RecordingControl:
        def __init__(self, url: str, model: str = "ranker") -> None:
            self.model = model

        def reload(self) -> None:
            reloaded.append(self.model)

        def close(self) -> None:
            pass

    repo = tmp_path / "model_repo"
    for version in (1, 2):
        export_ranker(new_ranker(RankerConfig(seed=version)), repo, version=version)
    monkeypatch.setattr(registry, "TritonModelControl", RecordingControl)
    monkeypatch.setattr("recstream.continual.TritonModelControl", RecordingControl)
    monkeypatch.setenv("MODEL_REPO", str(repo))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        result = runner.invoke(cli.app, ["models", "promote", "2"])
        assert result.exit_code == 0, result.output
        listed = json.loads(runner.invoke(cli.app, ["models", "list", "--model", "ranker"]).output)
        assert (listed["live"], listed["previous"]) == (2, 1)
        assert runner.invoke(cli.app, ["models", "rollback"]).exit_code == 0

        (repo / "item_encoder" / "1").mkdir(parents=True)
        (repo / "item_encoder" / "2").mkdir()
        (repo / "item_encoder" / "config.pbtxt").write_text('name: "item_encoder"\nbackend: "python"\n')
        result = runner.invoke(cli.app, ["models", "rollback", "--model", "item_encoder"])
        assert result.exit_code == 0, result.output
        assert reloaded == ["ranker", "ranker", "item_encoder"]
    finally:
        get_settings.cache_clear()

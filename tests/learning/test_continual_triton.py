"""Version switch through the REAL tritonserver: publish -> promote -> load_model with a request
stream running across the switch (zero errors), responses carry the version that scored them,
and rollback goes back to the previous version."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from infra.triton_server import TritonServer
from recstream.continual.registry import ModelRegistry, TritonModelControl
from recstream.contracts.models import RANKER
from recstream.models.export import export_ranker
from recstream.models.ranker import CONTEXT_DIM, ITEM_DIM, N_CAND_FEATURES, RankerConfig, new_ranker


def _ranker(seed: int):
    r = new_ranker(RankerConfig(seed=seed))
    with torch.no_grad():
        r.net.mlp[-1].bias.fill_(float(seed))  # distinguishable scores per version
    return r


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TritonServer, ModelRegistry]]:
    repo = tmp_path_factory.mktemp("model_repo")
    export_ranker(_ranker(1), repo, version=1)  # config.pbtxt + v1 as the models package writes them
    reg = ModelRegistry(repo)
    reg.init_live()
    server = TritonServer(
        repo,
        tmp_path_factory.mktemp("triton_run"),
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        models=[RANKER],
    )
    server.start(timeout_s=240)
    try:
        yield server, reg
    finally:
        server.stop()


def _infer(client, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    import tritonclient.http as httpclient

    n = 5
    arrays = {
        "CONTEXT": rng.normal(size=(1, CONTEXT_DIM)).astype(np.float32),
        "CANDIDATES": rng.normal(size=(1, n, ITEM_DIM)).astype(np.float32),
        "CAND_FEATURES": rng.random((1, n, N_CAND_FEATURES)).astype(np.float32),
    }
    inputs = []
    for k, a in arrays.items():
        inp = httpclient.InferInput(k, list(a.shape), "FP32")
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    res = client.infer(RANKER, inputs)
    return str(res.get_response()["model_version"]), res.as_numpy("SCORES")


def test_switch_and_rollback_without_failed_requests(served: tuple[TritonServer, ModelRegistry]) -> None:
    import tritonclient.http as httpclient

    server, reg = served
    control = TritonModelControl(server.url)
    assert control.loaded_versions() == [1]
    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    errors: list[str] = []

    def stream() -> None:
        client = httpclient.InferenceServerClient(url=server.url, network_timeout=30)
        rng = np.random.default_rng(0)
        while not stop.is_set():
            try:
                v, _ = _infer(client, rng)
                seen.append((time.monotonic(), v))
            except Exception as exc:  # any failure during the switch is a test failure
                errors.append(repr(exc))
            time.sleep(0.005)
        client.close()

    th = threading.Thread(target=stream, daemon=True)
    th.start()
    try:
        time.sleep(1.0)
        v2 = reg.publish(_ranker(2))
        assert (reg.model_dir / str(v2) / "ranker.safetensors").is_file()
        reg.promote(v2, "test")
        assert "versions: [ 1, 2 ]" in (reg.model_dir / "config.pbtxt").read_text()
        t0 = time.monotonic()
        control.reload()
        control.wait_live(v2)
        switch_s = time.monotonic() - t0
        time.sleep(1.5)
        assert control.loaded_versions() == [1, 2]
        after = [v for t, v in seen if t > t0 + switch_s + 0.5]
        assert after and set(after) == {"2"}, Counter(after)

        live = reg.rollback("test rollback")
        assert live == 1
        t1 = time.monotonic()
        control.reload()
        time.sleep(1.5)
        assert control.loaded_versions() == [1]
        after_rb = [v for t, v in seen if t > time.monotonic() - 1.0]
        assert after_rb and set(after_rb) == {"1"}
    finally:
        stop.set()
        th.join(timeout=30)
        control.close()
    assert not errors, errors[:5]
    assert len(seen) > 50
    versions_seen = Counter(v for _, v in seen)
    assert versions_seen["1"] > 0 and versions_seen["2"] > 0
    print(f"switch {switch_s:.2f}s, rollback issued at +{t1 - t0:.1f}s, requests {len(seen)}, versions {versions_seen}")


def test_publish_is_atomic_folder(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)
    v = reg.publish(_ranker(3))
    assert v == 1
    assert sorted(p.name for p in (tmp_path / RANKER).iterdir()) == ["1"]

"""Triton-served text encoder == in-process TextEncoder, plus launcher and client failure behaviour.

Starts the real tritonserver (bundled with nvidia-pytriton) over ``model_repo/``. If it cannot start,
the fixture raises and every dependent test errors: a missing Triton must never look like a pass.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from infra.triton_server import TritonServer, TritonStartError
from recstream.contracts.models import TEXT_ENCODER
from recstream.models.encoder import (
    MODEL_SHA256,
    TextEncoder,
    WeightsMismatchError,
    default_model_dir,
    verify_weights,
    version_text_encoder,
)
from recstream.models.repository import latest_version_dir
from recstream.serving.triton_client import TritonEncoderClient, TritonUnavailable

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_REPO = REPO_ROOT / "model_repo"
TOLERANCE = 1e-4

TEXTS = [
    "red trail running shoes",
    "a",
    "",
    "Ünïcödé façade, naïve café — crème brûlée",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 🚀🔥👟 and math ∑∫√ symbols",
    "Wireless noise-cancelling headphones with 30h battery life and USB-C fast charging.",
    # Far past max_seq_length (256 tokens): both paths must truncate identically.
    " ".join(f"token{i} lorem ipsum dolor sit amet" for i in range(300)),
    "UPPER case vs upper CASE",
    "   leading and trailing whitespace   ",
]


@pytest.fixture(scope="module")
def encoder() -> TextEncoder:
    """What the repository's newest text_encoder version serves (MiniLM, or with a LoRA adapter)."""
    return version_text_encoder(latest_version_dir(MODEL_REPO, TEXT_ENCODER))


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A tritonserver on free ports in explicit model-control mode (as production runs it)."""
    run_dir = tmp_path_factory.mktemp("triton")
    server = TritonServer(
        MODEL_REPO,
        run_dir,
        http_port=0,
        grpc_port=0,
        metrics_port=0,
        model_control_mode="explicit",
        models=["text_encoder"],
    )
    server.start(timeout_s=300)
    try:
        yield server
    finally:
        # Stop through the PID file, as `python -m infra.triton_server stop` from another process does.
        pid = server.read_pid()
        assert TritonServer.from_run_dir(run_dir).stop() is True
        assert pid is not None
        server.stop()  # reaps our Popen handle; no-op otherwise
        assert not TritonServer.from_run_dir(run_dir).is_running()


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_weights_sha256_matches_pin() -> None:
    assert verify_weights() == MODEL_SHA256
    with pytest.raises(WeightsMismatchError):
        verify_weights(expected_sha256="0" * 64)


def test_in_process_embeddings_are_normalised_and_deterministic(encoder: TextEncoder) -> None:
    a = encoder.encode(TEXTS)
    b = encoder.encode(list(reversed(TEXTS)), batch_size=3)[::-1]
    assert a.shape == (len(TEXTS), 384) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    assert np.abs(a - b).max() < 1e-5  # batch composition and order do not change the vectors
    assert encoder.encode([]).shape == (0, 384)


@pytest.mark.triton
@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_triton_matches_in_process(triton: TritonServer, encoder: TextEncoder, protocol: str) -> None:
    url = triton.grpc_url if protocol == "grpc" else triton.url
    with TritonEncoderClient(url, protocol=protocol, timeout_s=60) as client:  # type: ignore[arg-type]
        assert client.is_ready()
        served = client.encode_texts(TEXTS)
    local = encoder.encode(TEXTS)
    assert served.shape == local.shape == (len(TEXTS), 384)
    assert served.dtype == np.float32
    diff = float(np.abs(served - local).max())
    assert diff < TOLERANCE, f"max abs diff {diff}"
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)


@pytest.mark.triton
@pytest.mark.slow
def test_concurrent_requests_are_batched_and_split_back(triton: TritonServer, encoder: TextEncoder) -> None:
    """Dynamic batching merges requests into one execute(); each caller must get its own rows back."""
    client = TritonEncoderClient(triton.grpc_url, timeout_s=120)
    groups = [TEXTS[i : i + k] for i, k in [(0, 1), (1, 3), (4, 2), (6, 4), (0, 10), (3, 1), (7, 3), (2, 5)]]
    more = [f"item number {i} in a chunked request" for i in range(70)]  # > max_batch_size: chunked
    with ThreadPoolExecutor(max_workers=len(groups) + 1) as pool:
        futures = [pool.submit(client.encode_texts, g) for g in [*groups, more]]
        results = [f.result() for f in futures]
    client.close()
    for texts, got in zip([*groups, more], results, strict=True):
        assert got.shape == (len(texts), 384)
        assert float(np.abs(got - encoder.encode(texts)).max()) < TOLERANCE


@pytest.mark.triton
@pytest.mark.slow
def test_new_version_loads_through_model_control_api(tmp_path: Path, encoder: TextEncoder) -> None:
    """Out-of-tree repository (only RECSTREAM_REPO_ROOT can locate recstream) + explicit-mode reload.

    Version 2 ships its own checkpoint in ``2/encoder/`` (here a link to the packaged weights), the
    layout a fine-tuned encoder will use.
    """
    import tritonclient.grpc as grpcclient

    repo = tmp_path / "repo"
    (repo / "text_encoder").mkdir(parents=True)
    shutil.copy(MODEL_REPO / "text_encoder" / "config.pbtxt", repo / "text_encoder")
    shutil.copytree(
        MODEL_REPO / "text_encoder" / "1", repo / "text_encoder" / "1", ignore=shutil.ignore_patterns("__pycache__")
    )
    server = TritonServer(repo, tmp_path / "run", http_port=0, grpc_port=0, metrics_port=0, models=["text_encoder"])
    server.start(timeout_s=300)
    try:
        v2 = repo / "text_encoder" / "2"
        v2.mkdir()
        shutil.copy(repo / "text_encoder" / "1" / "model.py", v2 / "model.py")
        (v2 / "encoder").symlink_to(default_model_dir(), target_is_directory=True)
        control = grpcclient.InferenceServerClient(server.grpc_url)
        control.load_model("text_encoder")
        with TritonEncoderClient(server.grpc_url, timeout_s=60, model_version="2") as client:
            got = client.encode_texts(TEXTS[:4])
        control.close()
    finally:
        server.stop()
    assert float(np.abs(got - TextEncoder().encode(TEXTS[:4])).max()) < TOLERANCE
    assert f"text_encoder v2 loaded from {v2 / 'encoder'}" in server.log_file.read_text()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_dead_server_raises_unavailable_quickly(protocol: str) -> None:
    refused = TritonEncoderClient(f"127.0.0.1:{_unused_port()}", protocol=protocol, timeout_s=0.25)  # type: ignore[arg-type]
    t0 = time.monotonic()
    with pytest.raises(TritonUnavailable):
        refused.encode_texts(["hello"])
    assert time.monotonic() - t0 < 1.0
    assert refused.is_ready() is False
    assert refused.encode_texts([]).shape == (0, 384)  # no round trip needed

    # Accepts TCP (kernel backlog) but never answers: only the deadline can save the caller.
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(8)
        silent = TritonEncoderClient(f"127.0.0.1:{hole.getsockname()[1]}", protocol=protocol, timeout_s=0.25)  # type: ignore[arg-type]
        t0 = time.monotonic()
        with pytest.raises(TritonUnavailable):
            silent.encode_texts(["hello"])
        assert time.monotonic() - t0 < 1.5


def test_failed_start_raises_with_log_and_leaves_nothing_running(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.pbtxt").write_text('name: "broken"\nbackend: "python"\nmax_batch_size: 0\n')
    server = TritonServer(repo, tmp_path / "run", http_port=0, grpc_port=0, metrics_port=0)
    t0 = time.monotonic()
    with pytest.raises(TritonStartError, match="broken"):
        server.start(timeout_s=120)
    assert time.monotonic() - t0 < 60  # fail-fast on the stub error, not the 120 s deadline
    assert not server.is_running()
    assert not server.pid_file.exists()


def test_cli_status_without_server_reports_not_running(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "infra.triton_server", "status", "--run-dir", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3
    assert '"running": false' in proc.stdout


@pytest.mark.triton
@pytest.mark.slow
def test_int8_precision_is_served_as_configured(tmp_path: Path, encoder: TextEncoder) -> None:
    """`precision: int8` in the config quantises the served version's Linear layers (bench-search
    measures its speed and quality: -0.003 NDCG@10); Triton's vectors match the in-process int8
    encoder and stay near fp32."""
    from recstream.models.export import set_config_param

    latest = latest_version_dir(MODEL_REPO, TEXT_ENCODER)
    repo = tmp_path / "repo" / TEXT_ENCODER
    repo.mkdir(parents=True)
    shutil.copy(MODEL_REPO / TEXT_ENCODER / "config.pbtxt", repo)
    shutil.copytree(latest, repo / latest.name, ignore=shutil.ignore_patterns("__pycache__"))
    set_config_param(repo / "config.pbtxt", "precision", "int8")
    ports = {"http_port": 0, "grpc_port": 0, "metrics_port": 0}
    server = TritonServer(repo.parent, tmp_path / "run", models=[TEXT_ENCODER], **ports)
    server.start(timeout_s=300)
    try:
        with TritonEncoderClient(server.grpc_url, timeout_s=60) as client:
            got = client.encode_texts(TEXTS)
    finally:
        server.stop()
    local = version_text_encoder(latest, precision="int8").encode(TEXTS)
    assert float(np.abs(got - local).max()) < 1e-3
    cos = (got * encoder.encode(TEXTS)).sum(axis=1)  # near fp32; bench-search measures what it costs
    assert cos.min() > 0.8, cos
    assert "(int8," in server.log_file.read_text()

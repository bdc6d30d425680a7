"""Export parity through the REAL tritonserver: Triton's ranker scores == in-process scores.

No skips: if tritonserver cannot start, the fixture raises TritonStartError and the tests fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from recstream.config import REPO_ROOT
from recstream.models.export import ROOT_PARAM, export_ranker
from recstream.models.ranker import (
    CONTEXT_DIM,
    ITEM_DIM,
    N_CAND_FEATURES,
    RankerConfig,
    feature_schema_hash,
    new_ranker,
)
from recstream.models.repository import load_exported, triton_score, versions

pytestmark = pytest.mark.triton

COMMITTED_REPO = REPO_ROOT / "model_repo"


def _request(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ctx = rng.standard_normal(CONTEXT_DIM).astype(np.float32) / np.sqrt(ITEM_DIM)
    cand = rng.standard_normal((n, ITEM_DIM)).astype(np.float32) / np.sqrt(ITEM_DIM)
    feats = rng.random((n, N_CAND_FEATURES)).astype(np.float32)
    return ctx, cand, feats


def _random(cfg: RankerConfig):
    """A ranker with every weight random (a fresh one has a zero MLP head), so parity covers the MLP."""
    import torch

    ranker = new_ranker(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    with torch.no_grad():
        for p in ranker.net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return ranker


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[object, Path]]:
    """A temp model repo with a tiny random ranker (v1, v2) and a copy of the committed ranker."""
    import shutil

    from infra.triton_server import TritonServer

    repo = tmp_path_factory.mktemp("model_repo")
    export_ranker(_random(RankerConfig(hidden=[16], seed=1)), repo, name="ranker_tiny")
    export_ranker(_random(RankerConfig(hidden=[32, 8], seed=2)), repo, name="ranker_tiny", serve_versions=2)
    shutil.copytree(COMMITTED_REPO / "ranker", repo / "ranker")
    with (repo / "ranker" / "config.pbtxt").open("a") as fh:  # served from outside the checkout
        fh.write(ROOT_PARAM.format(root=REPO_ROOT))
    server = TritonServer(repo, repo.parent / "run", http_port=0, grpc_port=0, metrics_port=0)
    server.start(timeout_s=180)
    try:
        yield server, repo
    finally:
        server.stop()


@pytest.mark.parametrize("n", [1, 7, 100])
def test_tiny_ranker_parity(tiny_repo, n: int):
    server, repo = tiny_repo
    assert versions(repo, "ranker_tiny") == [1, 2]
    for version in (1, 2):
        ranker = load_exported(repo, "ranker_tiny", version)
        for seed in range(3):
            ctx, cand, feats = _request(n, seed)
            got = triton_score(server.url, ctx, cand, feats, model_name="ranker_tiny", model_version=str(version))
            want = ranker.score(ctx, cand, feats)
            assert got.shape == (n,)
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_committed_ranker_loads_and_matches(tiny_repo):
    server, _repo = tiny_repo
    ranker = load_exported(COMMITTED_REPO)  # refuses a feature-schema mismatch
    assert ranker.meta.extra["feature_schema_hash"] == feature_schema_hash()
    ctx, cand, feats = _request(100, 11)
    got = triton_score(server.url, ctx, cand, feats, model_name="ranker")
    np.testing.assert_allclose(got, ranker.score(ctx, cand, feats), atol=1e-4, rtol=0)
    vdir = COMMITTED_REPO / "ranker" / str(versions(COMMITTED_REPO)[-1])
    size = sum(p.stat().st_size for p in vdir.iterdir() if p.is_file())
    assert size < 5 * 1024 * 1024, size


def test_bad_request_is_an_error_not_a_crash(tiny_repo):
    from tritonclient.utils import InferenceServerException

    server, _ = tiny_repo
    ctx, cand, feats = _request(5, 0)
    with pytest.raises(InferenceServerException):
        triton_score(server.url, ctx, cand, feats[:, :2], model_name="ranker_tiny")
    # the model keeps serving after the bad request
    assert triton_score(server.url, ctx, cand, feats, model_name="ranker_tiny").shape == (5,)

"""Ranker latency: one recommendation = 100 candidates scored through the REAL tritonserver.

Run ``python -m bench.bench_ranker`` (or ``make bench-ranker``). Serves the committed
``model_repo/ranker`` (latest version) on free ports, sends sequential requests (one in flight, as
a stream worker does per request) over HTTP with a persistent client, and also times in-process
scoring and feature construction for comparison. Environment: ``N_REQUESTS`` (default 1000),
``CANDIDATES`` (default 100), ``WARMUP`` (default 50).

Writes ``bench/results/ranker.json`` with p50_ms, p99_ms, candidates (+ details).
"""

from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import print_table, write_result
from recstream.config import REPO_ROOT
from recstream.contracts.models import RANKER
from recstream.models.ranker import CONTEXT_DIM, ITEM_DIM, candidate_features
from recstream.models.repository import load_exported, triton_score, versions


def _percentiles(ms: list[float]) -> dict[str, float]:
    a = np.asarray(ms)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
    }


def _requests(n_req: int, n_cand: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    cats = [f"c{i}" for i in range(18)]
    out = []
    for _ in range(min(n_req, 64)):  # a pool of distinct requests, cycled
        ctx = rng.standard_normal(CONTEXT_DIM).astype(np.float32)
        ctx[:ITEM_DIM] /= np.linalg.norm(ctx[:ITEM_DIM])
        ctx[ITEM_DIM:] = 0.0
        cand = rng.standard_normal((n_cand, ITEM_DIM)).astype(np.float32)
        cand /= np.linalg.norm(cand, axis=1, keepdims=True)
        feats = candidate_features(
            cand @ ctx[:ITEM_DIM],
            rng.integers(0, 500, n_cand),
            rng.choice(cats, n_cand).tolist(),
            rng.choice(cats, 20).tolist(),
            500,
            rng.integers(0, 50, n_cand),
        )
        out.append((ctx, cand, feats))
    return out


def main() -> dict[str, Any]:
    import torch
    import tritonclient.http as httpclient

    from infra.triton_server import TritonServer

    torch.set_num_threads(1)  # as the Triton model (torch_threads=1): fair comparison, no oversubscription
    n_req = int(os.environ.get("N_REQUESTS", "1000"))
    n_cand = int(os.environ.get("CANDIDATES", "100"))
    warmup = int(os.environ.get("WARMUP", "50"))
    repo = REPO_ROOT / "model_repo"
    version = versions(repo)[-1]
    ranker = load_exported(repo)
    reqs = _requests(n_req, n_cand)

    # in-process reference (same code path Triton runs)
    inproc: list[float] = []
    for i in range(warmup + n_req):
        ctx, cand, feats = reqs[i % len(reqs)]
        t0 = time.perf_counter()
        ranker.score(ctx, cand, feats)
        if i >= warmup:
            inproc.append((time.perf_counter() - t0) * 1e3)
    feat_ms: list[float] = []
    rng = np.random.default_rng(1)
    for _ in range(200):
        ctx, cand, _ = reqs[0]
        t0 = time.perf_counter()
        candidate_features(cand @ ctx[:ITEM_DIM], rng.integers(0, 500, n_cand), ["c1"] * n_cand, ["c2"] * 20, 500)
        feat_ms.append((time.perf_counter() - t0) * 1e3)

    with tempfile.TemporaryDirectory(prefix="bench_ranker_") as tmp:
        server = TritonServer(repo, Path(tmp), http_port=0, grpc_port=0, metrics_port=0, models=[RANKER])
        t_start = time.perf_counter()
        server.start(timeout_s=180)
        startup_s = time.perf_counter() - t_start
        try:
            client = httpclient.InferenceServerClient(url=server.url)
            lat: list[float] = []
            max_err = 0.0
            for i in range(warmup + n_req):
                ctx, cand, feats = reqs[i % len(reqs)]
                t0 = time.perf_counter()
                got = triton_score(server.url, ctx, cand, feats, client=client)
                dt = (time.perf_counter() - t0) * 1e3
                if i >= warmup:
                    lat.append(dt)
                if i < len(reqs):
                    max_err = max(max_err, float(np.abs(got - ranker.score(ctx, cand, feats)).max()))
            client.close()
        finally:
            server.stop()

    tri = _percentiles(lat)
    loc = _percentiles(inproc)
    result: dict[str, Any] = {
        **tri,
        "candidates": n_cand,
        "requests": n_req,
        "model_version": version,
        "transport": "HTTP, one request in flight, persistent client",
        "max_abs_diff_vs_inprocess": max_err,
        "triton_startup_s": round(startup_s, 2),
        "inprocess": loc,
        "feature_construction_p50_ms": float(np.percentile(feat_ms, 50)),
        "budget_ms": 50.0,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
    }
    rows = [
        {"path": "triton (HTTP)", **tri},
        {"path": "in-process", **loc},
    ]
    print_table(
        f"ranker latency, {n_cand} candidates, {n_req} requests",
        rows,
        ["path", "p50_ms", "p90_ms", "p99_ms", "mean_ms"],
    )
    path = write_result("ranker", result)
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()

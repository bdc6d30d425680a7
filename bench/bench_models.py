"""Model-compute bench: the served session encoder and ranker in-process, per request batch.

    make bench-models                  (CPU, torch threads as in Triton: 1)
    python -m bench.bench_models --device cuda --name models_cuda

What a Triton instance of each model computes per call, without transport: the session encoder
over B sessions of 50 item vectors, the ranker over B requests of 50 candidates, for B in 1, 8, 32.
It isolates the model's share of a request from Kafka, gRPC and the python-backend stub, and it
runs where the full stack cannot (a GPU machine without tritonserver or a JVM). Writes
bench/results/NAME.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

from recstream.config import REPO_ROOT

BATCHES = (1, 8, 32)
HISTORY = 50
CANDIDATES = 50


def _time(fn, device: str, repeats: int) -> dict[str, float]:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1000)
    return {"ms_p50": round(float(np.percentile(times, 50)), 3), "ms_p99": round(float(np.percentile(times, 99)), 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU (Triton's setting)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--model-repo", type=Path, default=REPO_ROOT / "model_repo")
    ap.add_argument("--name", default="models")
    args = ap.parse_args(argv)

    from bench.common import print_table, write_result
    from recstream.contracts.models import SESSION_ENCODER
    from recstream.models.repository import latest_version_dir, load_exported
    from recstream.models.served import SessionEncoder

    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    session = SessionEncoder.load(latest_version_dir(args.model_repo, SESSION_ENCODER))
    tower = session.tower.to(dev).eval()
    ranker = load_exported(args.model_repo).net.to(dev).eval()
    rng = np.random.default_rng(0)
    rows = []
    for b in BATCHES:
        items = torch.from_numpy(rng.standard_normal((b, HISTORY, 384)).astype(np.float32) / 20).to(dev)
        valid = torch.ones(b, HISTORY, dtype=torch.bool, device=dev)
        ctx = torch.from_numpy(rng.standard_normal((b, 768)).astype(np.float32) / 20).to(dev)
        cand = torch.from_numpy(rng.standard_normal((b, CANDIDATES, 384)).astype(np.float32) / 20).to(dev)
        feats = torch.from_numpy(rng.random((b, CANDIDATES, 5)).astype(np.float32)).to(dev)

        def encode(items=items, valid=valid):
            with torch.inference_mode():
                tower(items, valid)

        def rank(ctx=ctx, cand=cand, feats=feats):
            with torch.inference_mode():
                ranker(ctx, cand, feats)

        rows.append({"model": "session_encoder", "batch": b, **_time(encode, args.device, args.repeats)})
        rows.append({"model": "ranker", "batch": b, **_time(rank, args.device, args.repeats)})
    device_name = torch.cuda.get_device_name(dev) if args.device.startswith("cuda") else "cpu"
    print_table(f"model compute per call on {device_name} ({args.name})", rows, ["model", "batch", "ms_p50", "ms_p99"])
    write_result(
        args.name,
        {
            "device": device_name,
            "torch": torch.__version__,
            "threads": args.threads if args.device == "cpu" else None,
            "history": HISTORY,
            "candidates": CANDIDATES,
            "rows": rows,
            "what": "in-process forward passes of the committed session encoder and ranker (no Triton, no transport)",
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

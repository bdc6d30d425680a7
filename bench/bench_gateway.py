"""Gateway bench: concurrent HTTP clients against the gateway, beside the SDK directly, one stack.

    make bench-gateway     (python -m bench.bench_gateway [--clients 200] [--duration-s 30])

Starts Kafka, tritonserver, `python -m streams.worker` (the MovieLens catalog indexed through the
catalog topic, the first --warm-events behaviour events replayed so sessions have history) and the
gateway as deployed (`python -m services.gateway`, its own process, uvicorn). Then two closed-loop
phases on the same stack, one after the other, each --duration-s long (90 % recommend, 10 % search):

1. ``sdk``: --clients asyncio tasks calling RecommendationClient.ask in this process (Kafka
   directly), closed loop: each sends its next request when its answer arrives (capacity);
2. ``gateway``: the same through --clients aiohttp connections POSTing /v1/recommend and /v1/search;
3. ``sdk_at_rate`` and ``gateway_at_rate``: an open loop at --rate requests/s (latency at a load the
   stack can carry, counted from each request's scheduled start).

Reported per phase: requests_per_s, latency_ms_p50/p99 (client-side, send to answer), errors
(anything but 200 / an answer), and CPU-ms per request of gateway, worker, tritonserver and Kafka.
The top-level keys are the gateway phase's; `sdk` holds the direct figure. A closed loop finds the
stack's capacity: when the worker saturates, both phases show it, and their difference is the
gateway's own cost. Writes bench/results/gateway.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.bench_stream import QUERIES, RUN, _start_stack, _tree_cpu_seconds, bench_settings
from recstream.config import settings_env

KEY = "bench-gateway-key"


def _request_body(rng: random.Random, users: list[str]) -> tuple[str, dict]:
    user = rng.choice(users)
    if rng.random() < 0.1:
        return "/v1/search", {"user_id": user, "query": rng.choice(QUERIES), "k": 10}
    return "/v1/recommend", {"user_id": user, "session_id": f"{user}-bench", "k": 10}


async def _closed_loop(call, clients: int, duration_s: float) -> tuple[list[float], int]:
    """`clients` tasks, each awaiting `call(rng)` again and again until the time is up."""
    latencies: list[float] = []
    errors = 0
    stop = time.monotonic() + duration_s

    async def client(i: int) -> None:
        nonlocal errors
        rng = random.Random(i)
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            ok = await call(rng)
            if ok:
                latencies.append(time.perf_counter() - t0)
            else:
                errors += 1

    await asyncio.gather(*(client(i) for i in range(clients)))
    return latencies, errors


async def _open_loop(call, rate: float, duration_s: float) -> tuple[list[float], int]:
    """Requests started on a fixed schedule (`rate` per second) whatever the answers do; latency is
    counted from each request's scheduled start, so queueing anywhere is part of it."""
    latencies: list[float] = []
    errors = 0
    t0 = time.perf_counter()

    async def one(i: int, due: float) -> None:
        nonlocal errors
        if await call(random.Random(i)):
            latencies.append(time.perf_counter() - due)
        else:
            errors += 1

    tasks = []
    for i in range(int(rate * duration_s)):
        due = t0 + i / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return latencies, errors


def _summary(latencies: list[float], errors: int, seconds: float, cpu: dict[str, float]) -> dict:
    lat = np.asarray(latencies) * 1000
    n = len(lat)
    return {
        "requests": n,
        "requests_per_s": round(n / seconds, 1),
        "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if n else None,
        "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if n else None,
        "errors": errors,
        "cpu_ms_per_request": {k: round(v * 1000 / max(n, 1), 2) for k, v in cpu.items()},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--duration-s", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=200.0, help="offered requests/s of the open-loop phases")
    ap.add_argument("--warm-events", type=int, default=20_000)
    ap.add_argument("--ranker", default="auto", help="worker --ranker: auto, triton or inprocess")
    ap.add_argument("--name", default="gateway")
    args = ap.parse_args(argv)

    import aiohttp
    import httpx

    from bench.common import print_table, write_result
    from recstream.client import EventProducer, RecommendationClient
    from recstream.contracts.events import RecommendationRequest
    from recstream.data.datasets import load_dataset
    from recstream.data.events import behaviour_events, catalog_events
    from recstream.kafka.admin import ensure_topics
    from streams.process import WorkerProcess, free_port

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.time()
    data = load_dataset("ml-100k")
    broker, bootstrap, triton, ranker_note, _ = _start_stack(args)
    worker = gateway = None
    try:
        settings = bench_settings(bootstrap, triton)
        ensure_topics(settings)
        worker = WorkerProcess(settings, RUN / "worker.log", ["--ranker", args.ranker]).start(ready_timeout_s=180)
        items = catalog_events(data.items)
        events = list(behaviour_events(data.interactions))[: args.warm_events]
        with EventProducer(settings) as p:
            p.send_many("catalog", items)
            p.send_many("behaviour", events)
        deadline = time.time() + 600
        while worker.metric("recstream_indexed_items") < len(items) or worker.metric(
            "recstream_feature_events_total", 'result="applied"'
        ) < len(events):
            if time.time() > deadline:
                raise TimeoutError("catalog or warm-up events not applied in 600 s")
            time.sleep(1)
        users = sorted({e.user_id for e in events})
        port = free_port()
        env = {**os.environ, **settings_env(settings), "GATEWAY_API_KEYS": KEY, "LOG_LEVEL": "WARNING"}
        log = (RUN / "gateway.log").open("ab")
        gateway = subprocess.Popen(
            [sys.executable, "-m", "services.gateway", "--port", str(port), "--request-timeout-s", "5"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(120):
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        print(f"stack up in {time.time() - t_start:.0f}s (ranker: {ranker_note}); {len(users)} users", flush=True)
        procs = {"gateway": gateway.pid, "worker": worker.proc.pid, "tritonserver": triton._proc.pid}
        procs["kafka"] = broker._proc.pid

        def cpu() -> dict[str, float]:
            return {name: _tree_cpu_seconds(pid) for name, pid in procs.items()}

        async def sdk_phase(loop) -> tuple[list[float], int]:
            client = RecommendationClient(settings)

            async def call(rng: random.Random) -> bool:
                path, body = _request_body(rng, users)
                kind = "search" if path.endswith("search") else "recommend"
                fields = {k: v for k, v in body.items() if k != "k"}
                try:
                    await client.ask(RecommendationRequest(kind=kind, k=10, **fields), time.monotonic() + 5)
                    return True
                except TimeoutError:
                    return False

            try:
                return await loop(call)
            finally:
                client.close()

        async def gateway_phase(loop) -> tuple[list[float], int]:
            # aiohttp, not httpx, as the load generator: httpx's connection pool spent more CPU per
            # request than the gateway itself at 200 connections (78 requests/s, the gateway at 0.2 cores)
            connector = aiohttp.TCPConnector(limit=args.clients)
            timeout = aiohttp.ClientTimeout(total=10)
            async with aiohttp.ClientSession(
                base, headers={"X-API-Key": KEY}, connector=connector, timeout=timeout
            ) as c:

                async def call(rng: random.Random) -> bool:
                    path, body = _request_body(rng, users)
                    try:
                        async with c.post(path, json=body) as resp:
                            await resp.read()
                            return resp.status == 200
                    except (aiohttp.ClientError, TimeoutError):
                        return False

                return await loop(call)

        def closed(call):
            return _closed_loop(call, args.clients, args.duration_s)

        def at_rate(call):
            return _open_loop(call, args.rate, args.duration_s)

        phases = {}
        for name, phase, loop in (
            ("sdk", sdk_phase, closed),
            ("gateway", gateway_phase, closed),
            ("sdk_at_rate", sdk_phase, at_rate),
            ("gateway_at_rate", gateway_phase, at_rate),
        ):
            before, t0 = cpu(), time.perf_counter()
            latencies, errors = asyncio.run(phase(loop))
            seconds = time.perf_counter() - t0
            used = {k: v - before[k] for k, v in cpu().items()}
            phases[name] = _summary(latencies, errors, seconds, used)
            print(f"{name}: {phases[name]}", flush=True)

        result = {
            **{k: v for k, v in phases["gateway"].items()},
            "sdk": phases["sdk"],
            "at_rate": {"requests_per_s_offered": args.rate, "gateway": phases["gateway_at_rate"]},
            "sdk_at_rate": phases["sdk_at_rate"],
            "clients": args.clients,
            "duration_s": args.duration_s,
            "mix": "90 % recommend (user's session), 10 % search; closed loop",
            "ranker": ranker_note,
            "targets": {"requests_per_s": 200, "latency_ms_p99": 100, "errors": 0},
            "machine": f"{os.cpu_count()} cpus, load average at end {os.getloadavg()[0]:.2f}",
        }
        path = write_result(args.name, result)
        rows = [{"path": k, **{m: v for m, v in p.items() if m != "cpu_ms_per_request"}} for k, p in phases.items()]
        print_table(
            f"{args.clients} closed-loop clients, then {args.rate:.0f} requests/s offered ({args.duration_s:.0f} s)",
            rows,
            ["path", "requests_per_s", "latency_ms_p50", "latency_ms_p99", "errors"],
        )
        print(f"\nwrote {path}", flush=True)
        return 0
    finally:
        if gateway is not None:
            gateway.terminate()
            try:
                gateway.wait(20)
            except subprocess.TimeoutExpired:
                gateway.kill()
        if worker is not None:
            worker.stop()
        triton.stop()
        broker.stop()
        for d in Path(RUN).glob("qdrant-b*"):
            shutil.rmtree(d, ignore_errors=True)
        print(f"total {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())

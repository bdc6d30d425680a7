"""Scale bench: the same stack with 1 and with 2 stream workers in one consumer group.

    make bench-scale        (python -m bench.bench_scale [--workers 1,2] [--duration-s 20] ...)

One Kafka broker and one tritonserver; for each worker count, a fresh topic prefix and N
`python -m streams.worker` processes (every agent, Qdrant local mode, one folder each: every worker
builds its own index replica from the whole catalog topic). Per worker count:

1. catalog: the MovieLens-100k items through the catalog topic; set-up, timed until every replica
   holds all of them;
2. behaviour: --events behaviour events produced as fast as possible; events_per_s = events / time
   until the workers' feature counters together reach it (each event folded by the worker owning
   its partition);
3. requests: a closed loop of --concurrency requests in flight (90 % recommend, 10 % search) for
   --duration-s after --warmup-s of the same unmeasured; requests_per_s = answers per second,
   with p50 / p99 and CPU cores by process.

Everything shares this machine's cores, so on 2 cores a second worker adds a process, not CPU:
the figures show what the group split costs and that answers keep coming from every worker.
Writes bench/results/scale.json (`runs[{workers, events_per_s, requests_per_s, ...}]`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import random
import shutil
import signal
import sys
import threading
import time

import numpy as np

from bench.bench_stream import QUERIES, RUN, _start_stack, _tree_cpu_seconds, bench_settings
from bench.common import index_catalog, print_table, write_result
from recstream.contracts.events import RecommendationRequest


def _run(broker, triton, n_workers: int, args: argparse.Namespace, data) -> dict:
    """One worker count on the running broker and tritonserver, under its own topic prefix."""
    from recstream.client import EventProducer, RecommendationClient
    from recstream.contracts.topics import BEHAVIOUR
    from recstream.data.events import behaviour_events, catalog_events
    from recstream.kafka.admin import ensure_topics
    from recstream.kafka.serde import encode
    from streams.process import WorkerProcess

    base = bench_settings(broker.bootstrap, triton)
    ensure_topics(base)
    prefix = base.topic_prefix.rstrip(".")
    workers = []
    handles: list = []
    try:
        for i in range(n_workers):
            settings = base.model_copy(
                update={"qdrant_path": RUN / f"qdrant-{prefix}-{i}", "run_dir": RUN / f"worker-{prefix}-{i}"}
            )
            workers.append(WorkerProcess(settings, RUN / f"worker-{i}.log").start(ready_timeout_s=180))
        items = catalog_events(data.items)
        catalog_s = index_catalog(base, workers, items, timeout_s=600, poll_s=1.0)
        print(f"{n_workers} worker(s): {len(items)} items in every replica after {catalog_s:.1f}s", flush=True)

        # behaviour ------------------------------------------------------------------------------
        events = list(behaviour_events(data.interactions))[: args.events]
        topic = BEHAVIOUR.name(base.topic_prefix)
        payloads = [(e.user_id.encode(), encode(e)) for e in events]
        producer = EventProducer(base, worker="bench", **{"linger.ms": 5})
        handles.append(producer)

        def applied() -> float:
            return sum(w.metric("recstream_feature_events_total", 'result="applied"') for w in workers)

        before = applied()
        t0 = time.perf_counter()
        for key, value in payloads:
            producer.send_raw(topic, key, value)
        producer.flush(120)
        while applied() - before < len(events):
            time.sleep(0.05)
            if time.perf_counter() - t0 > 300:
                raise TimeoutError("behaviour not folded in 300 s")
        events_per_s = len(events) / (time.perf_counter() - t0)
        per_worker_events = [w.metric("recstream_feature_events_total", 'result="applied"') for w in workers]

        # requests: closed loop ----------------------------------------------------------------------
        client = RecommendationClient(base)
        handles.append(client)
        users = sorted({e.user_id for e in events})
        rng = random.Random(0)
        client.request(RecommendationRequest(user_id="warm", kind="search", query=QUERIES[0]), timeout_s=60)
        procs = {f"worker_{i}": w.proc.pid for i, w in enumerate(workers)}
        procs |= {"tritonserver": triton._proc.pid, "kafka": broker._proc.pid}

        def closed_loop(duration_s: float) -> tuple[list[float], int, float, dict[str, float]]:
            """(latencies of the answers that came back within the window, degraded among them,
            the window's seconds, CPU cores by process)."""
            slots = threading.BoundedSemaphore(args.concurrency)
            latencies: list[float] = []
            degraded = [0]
            gc.collect()
            gc.disable()  # the load generator's own collections would count as latency (bench_stream)
            cpu0 = {name: _tree_cpu_seconds(pid) for name, pid in procs.items()}
            t0 = time.perf_counter()
            while time.perf_counter() - t0 < duration_s:
                slots.acquire()
                user = rng.choice(users)
                if rng.random() < 0.1:
                    req = RecommendationRequest(user_id=user, kind="search", query=rng.choice(QUERIES), k=10)
                else:
                    req = RecommendationRequest(user_id=user, k=10)
                sent = time.perf_counter()

                def done(fut, sent=sent) -> None:
                    if sent - t0 < duration_s:
                        latencies.append((time.perf_counter() - sent) * 1000)
                        with contextlib.suppress(Exception):
                            degraded[0] += fut.result().degraded
                    slots.release()

                client.submit(req).add_done_callback(done)
            elapsed = time.perf_counter() - t0
            cpu = {name: round((_tree_cpu_seconds(pid) - cpu0[name]) / elapsed, 3) for name, pid in procs.items()}
            for _ in range(args.concurrency):  # the last answers
                slots.acquire(timeout=30)
            gc.enable()
            return latencies[:], degraded[0], elapsed, cpu

        # The broker's JIT compiles its request paths under the first load (bench_stream): unmeasured.
        closed_loop(args.warmup_s)
        answered_before = [w.metric("recstream_events_out_total", "recommendations") for w in workers]
        latencies, degraded, elapsed, cpu = closed_loop(args.duration_s)
        answered = [
            w.metric("recstream_events_out_total", "recommendations") - n
            for w, n in zip(workers, answered_before, strict=True)
        ]
        lat = np.array(latencies)
        return {
            "workers": n_workers,
            "events_per_s": round(events_per_s, 0),
            "events_by_worker": per_worker_events,
            "requests_per_s": round(len(latencies) / elapsed, 1),
            "answers_by_worker": answered,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
            "degraded": degraded,
            "concurrency": args.concurrency,
            "cpu_cores": cpu,
            "catalog_indexed_s": round(catalog_s, 1),
        }
    finally:
        for handle in reversed(handles):
            with contextlib.suppress(Exception):
                handle.close()
        for w in workers:
            w.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="worker counts to run, in order")
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--duration-s", type=float, default=20.0)
    ap.add_argument("--warmup-s", type=float, default=15.0, help="unmeasured closed loop before each measured one")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight in the closed loop")
    ap.add_argument("--name", default="scale")
    args = ap.parse_args(argv)

    from recstream.data.datasets import load_dataset

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.time()
    data = load_dataset("ml-100k")
    stack_args = argparse.Namespace()
    broker, _, triton, ranker_note, _ = _start_stack(stack_args)
    try:
        runs = [_run(broker, triton, int(n), args, data) for n in args.workers.split(",") if n.strip()]
    finally:
        triton.stop()
        broker.stop()
        for path in [*RUN.glob("qdrant-b*"), *RUN.glob("worker-b*")]:
            shutil.rmtree(path, ignore_errors=True)
    result = {
        "runs": runs,
        "ranker": ranker_note,
        "machine": f"{os.cpu_count()} cores shared by Kafka, tritonserver, the workers and this load generator",
        "seconds": round(time.time() - t_start, 0),
    }
    columns = ["workers", "events_per_s", "requests_per_s", "latency_ms_p50", "latency_ms_p99"]
    print_table(f"scale bench (bench/results/{args.name}.json)", [{k: r[k] for k in columns} for r in runs], columns)
    for r in runs:
        print(f"{r['workers']} worker(s): answers by worker {r['answers_by_worker']}, CPU cores {r['cpu_cores']}")
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

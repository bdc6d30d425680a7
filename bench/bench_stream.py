"""Stream bench: the whole stack on this machine, replaying real MovieLens sessions.

    make bench-stream        (python -m bench.bench_stream [--duration-s 60] [--rps 200] ...)

Starts a Kafka broker, tritonserver and `python -m streams.worker` (all agents, Qdrant local mode)
next to this load generator, on the same cores. Phases:

1. catalog: the MovieLens-100k items through the catalog topic, embedded by the item encoder
   Triton serves (set-up, not measured);
2. throughput: N behaviour events produced as fast as possible; events_per_s = N / time until
   the worker's feature counter reaches N (sustained into features, not just into Kafka);
3. mixed load at fixed rates, after --warmup-s of the same load unmeasured (the broker's JIT
   compiles its request paths in the first minute; a deployment pays that once): requests at
   --rps (90 % 'recommend', 10 % 'search' over a fixed set of query texts) and behaviour at
   --events-rps, for --duration-s. Latency is query -> recommendation as the client SDK sees it
   (RecommendationClient: produce to consume);
   freshness is event produce -> session features updated, from the worker's histogram;
4. capacity: the same mixed load at each of --capacity-steps (default 50, 100, 150, 200, 300,
   400 requests/s, --step-s each, stopping at the first that fails): `capacity_req_per_s` is the
   highest rate whose p99 stays <= 50 ms with no degraded or unanswered request.

CPU is reported as what a planner needs on any machine: `cpu_ms_per_request` (mixed phase, per
process: worker, tritonserver, kafka, load generator) and `cpu_ms_per_1k_events` (throughput
phase, per process). Writes bench/results/stream.json.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bench.common import index_catalog
from recstream.config import REPO_ROOT, Settings
from recstream.contracts.events import RecommendationRequest
from recstream.kafka.serde import encode

RUN = REPO_ROOT / "run" / "bench"


class Answered(NamedTuple):
    """What the bench counts of one answer."""

    kind: str
    degraded: bool
    empty: bool
    model_version: str


#: what each capacity step keeps in stream.json
STEP_KEYS = (
    "latency_ms_p50",
    "latency_ms_p99",
    "degraded_share",
    "requests_unanswered",
    "empty_answers",
    "requests_sent",
    "sent_per_s",
    "cpu_cores",
    "cpu_ms_per_request",
)
#: How long the bench waits for the last answers; a request unanswered by then enters the latency
#: percentiles at this value (a lower bound): leaving it out reported the answered requests' p99.
ANSWER_GRACE_S = 10.0
#: A capacity step counts only if the load generator offered at least this share of its rate.
MIN_OFFERED_SHARE = 0.95
QUERIES = [
    "star wars",
    "romantic comedy",
    "horror",
    "space adventure",
    "animated film for children",
    "crime thriller",
    "war drama",
    "documentary",
    "western",
    "musical",
    "science fiction",
    "film noir mystery",
    "action hero",
    "love story",
    "funny family movie",
    "scary monsters",
]


def _quantile_from_histogram(
    text: str, name: str, before: dict[float, float] | None = None, labels: str = "", q: float = 0.99
) -> tuple[float, dict]:
    """The q-quantile of a Prometheus histogram (linear within a bucket, like histogram_quantile);
    `labels` selects one series (e.g. ',stage="rank"'), as prometheus_client writes them after `le`."""
    import re

    buckets: dict[float, float] = {}
    for m in re.finditer(rf'^{name}_bucket\{{le="([^"]+)"{re.escape(labels)}\}} (\S+)$', text, re.M):
        buckets[float("inf") if m.group(1) == "+Inf" else float(m.group(1))] = float(m.group(2))
    if before:
        buckets = {k: v - before.get(k, 0.0) for k, v in buckets.items()}
    edges = sorted(buckets)
    total = buckets[edges[-1]] if edges else 0.0
    if total <= 0:
        return float("nan"), buckets
    target = q * total
    prev_edge, prev_count = 0.0, 0.0
    for edge in edges:
        if buckets[edge] >= target:
            if math.isinf(edge):
                return prev_edge, buckets
            frac = (target - prev_count) / max(buckets[edge] - prev_count, 1e-9)
            return prev_edge + frac * (edge - prev_edge), buckets
        prev_edge, prev_count = edge, buckets[edge]
    return prev_edge, buckets


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc (Linux), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree_cpu_seconds(root: int) -> float:
    """CPU seconds of a process and all its descendants (tritonserver's python-backend stubs)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        with contextlib.suppress(OSError, ValueError, IndexError):  # exited meanwhile
            total += _cpu_seconds(pid)
        todo.extend(children.get(pid, []))
    return total


def bench_settings(bootstrap: str, triton: object) -> Settings:
    """A fresh topic prefix and Qdrant folder on the bench's broker and tritonserver."""
    prefix = f"b{uuid.uuid4().hex[:8]}."
    return Settings(
        kafka_bootstrap=bootstrap,
        topic_prefix=prefix,
        triton_url=triton.url,  # type: ignore[attr-defined]
        triton_grpc_url=triton.grpc_url,  # type: ignore[attr-defined]
        qdrant_path=RUN / f"qdrant-{prefix.rstrip('.')}",
        run_dir=RUN / "worker",
        log_level="WARNING",
    )


def latency_percentiles(latencies_ms: list[float], unanswered: int) -> dict[str, float]:
    """p50/p95/p99 over every request sent: one never answered counts as the ANSWER_GRACE_S it was
    waited for (a lower bound), so a run that loses requests cannot report a better tail."""
    lat = np.array([*latencies_ms, *[ANSWER_GRACE_S * 1000] * unanswered], dtype=float)
    if not len(lat):
        lat = np.array([float("nan")])
    return {f"latency_ms_p{q}": round(float(np.percentile(lat, q)), 2) for q in (50, 95, 99)}


def step_within_target(step: dict, rate: float) -> bool:
    """A capacity step holds: p99 within 50 ms, no degraded, unanswered or empty answer, and the
    load generator really offered the rate (a step it could not offer says nothing of the stack)."""
    return (
        step["latency_ms_p99"] <= 50
        and step["degraded_share"] == 0
        and step["requests_unanswered"] == 0
        and step["empty_answers"] == 0
        and step["sent_per_s"] >= MIN_OFFERED_SHARE * rate
    )


def _start_stack(args: argparse.Namespace):
    from infra.kafka_broker import KafkaBroker
    from infra.triton_server import TritonServer

    RUN.mkdir(parents=True, exist_ok=True)
    # A fresh broker every run: the topics of earlier runs (37 partitions each, 14 runs had piled
    # up 518) would make the broker's per-request cost depend on the bench's history.
    shutil.rmtree(RUN / "kafka", ignore_errors=True)
    for old in RUN.glob("qdrant-*"):
        shutil.rmtree(old, ignore_errors=True)
    broker = KafkaBroker(RUN / "kafka", port=0, controller_port=0)
    bootstrap = broker.start(timeout_s=90)
    triton = TritonServer(REPO_ROOT / "model_repo", RUN / "triton", http_port=0, grpc_port=0, metrics_port=0)
    if args.without:  # the A/B arm without a model: the worker runs as on a repository that lacks it
        triton.models = [m for m in triton.repo_models() if m not in args.without.split(",")]
    ranker_note = "Triton 'ranker'" + (f" (without {args.without})" if args.without else "")
    try:
        triton.start()
    except Exception as exc:  # a broken ranker export must not hide the stream figures
        print(
            f"!! tritonserver with every model failed ({str(exc)[:300]}); retrying with text_encoder only,"
            " ranking in-process",
            flush=True,
        )
        triton.stop()
        triton = TritonServer(
            REPO_ROOT / "model_repo", RUN / "triton", http_port=0, grpc_port=0, metrics_port=0, models=["text_encoder"]
        )
        triton.start()
        ranker_note = "in-process heuristic: Triton serves text_encoder only (a model failed to load)"
        return broker, bootstrap, triton, ranker_note, True
    return broker, bootstrap, triton, ranker_note, False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration-s", type=float, default=60.0)
    ap.add_argument("--rps", type=float, default=200.0, help="recommendation requests per second")
    ap.add_argument("--events-rps", type=float, default=500.0, help="behaviour events/s during the mixed phase")
    ap.add_argument("--throughput-events", type=int, default=50_000)
    ap.add_argument("--warmup-s", type=float, default=30.0, help="unmeasured load at --rps before the mixed phase")
    ap.add_argument("--search-share", type=float, default=0.1)
    ap.add_argument("--ranker", default="auto", help="worker --ranker: auto, triton or inprocess")
    ap.add_argument(
        "--capacity-steps",
        default="50,100,150,200,300,400",
        help="offered rates of the capacity search (stops at the first over p99 50 ms or degraded); '' = none",
    )
    ap.add_argument("--step-s", type=float, default=20.0, help="seconds per capacity step")
    ap.add_argument("--name", default="stream", help="results file bench/results/NAME.json")
    ap.add_argument("--without", default="", help="models Triton does not load (comma-separated), for an A/B")
    args = ap.parse_args(argv)

    from bench.common import print_table, write_result
    from recstream.client import EventProducer, RecommendationClient
    from recstream.contracts.topics import BEHAVIOUR
    from recstream.data.datasets import load_dataset
    from recstream.data.events import behaviour_events, catalog_events
    from recstream.kafka.admin import ensure_topics
    from recstream.ops.replay import RateLimiter
    from streams.process import WorkerProcess

    # SIGTERM (a CI timeout) must still run the finally below, or broker and tritonserver outlive us.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.time()
    data = load_dataset("ml-100k")
    broker, bootstrap, triton, ranker_note, triton_fallback = _start_stack(args)
    worker = None
    handles: list = []  # the load generator's Kafka clients, closed before the broker stops
    try:
        settings = bench_settings(bootstrap, triton)
        prefix = settings.topic_prefix
        ensure_topics(settings)
        items = catalog_events(data.items)
        worker = WorkerProcess(settings, RUN / "worker.log", ["--ranker", args.ranker]).start(ready_timeout_s=180)
        print(f"stack up in {time.time() - t_start:.0f}s (ranker: {ranker_note})", flush=True)

        # 1. catalog: indexed through the catalog topic by the item encoder Triton serves, every run
        catalog_s = index_catalog(settings, worker, items, timeout_s=300, poll_s=1.0)
        print(f"catalog: {len(items)} items indexed through the catalog topic in {catalog_s:.1f}s", flush=True)

        # 2. throughput -------------------------------------------------------------------------------
        events = list(behaviour_events(data.interactions))
        n = min(args.throughput_events, len(events))
        topic = BEHAVIOUR.name(prefix)
        payloads = [(e.user_id.encode(), encode(e)) for e in events[:n]]
        base = worker.metric("recstream_feature_events_total", 'result="applied"')
        producer = EventProducer(settings, worker="bench", **{"linger.ms": 5})
        handles.append(producer)
        procs = {"worker": worker.proc.pid, "tritonserver": triton._proc.pid, "kafka": broker._proc.pid}
        cpu_throughput0 = {name: _tree_cpu_seconds(pid) for name, pid in procs.items()}
        cpu_throughput0["load_generator"] = _cpu_seconds(os.getpid())
        cpu0 = _cpu_seconds(worker.proc.pid)
        load0 = os.getloadavg()[0]
        t0 = time.perf_counter()
        for key, value in payloads:
            producer.send_raw(topic, key, value)
        producer.flush(120)
        t_produced = time.perf_counter() - t0
        while worker.metric("recstream_feature_events_total", 'result="applied"') - base < n:
            time.sleep(0.05)
            if time.perf_counter() - t0 > 240:
                raise TimeoutError("features did not catch up in 240 s")
        t_applied = time.perf_counter() - t0
        worker_cpu = _cpu_seconds(worker.proc.pid) - cpu0
        cpu_throughput = {name: _tree_cpu_seconds(pid) - cpu_throughput0[name] for name, pid in procs.items()}
        cpu_throughput["load_generator"] = _cpu_seconds(os.getpid()) - cpu_throughput0["load_generator"]
        cpu_per_1k_events = {k: round(v * 1000 * 1000 / n, 2) for k, v in cpu_throughput.items()}
        events_per_s = n / t_applied
        print(
            f"throughput: {n} events produced in {t_produced:.1f}s, applied in {t_applied:.1f}s "
            f"-> {events_per_s:,.0f} events/s; worker CPU {worker_cpu:.1f}s ({n / worker_cpu:,.0f} events per "
            f"worker CPU-second); load average {load0:.1f} on {os.cpu_count()} cores",
            flush=True,
        )

        # 3. mixed fixed-rate load ------------------------------------------------------------------
        client = RecommendationClient(settings)
        handles.append(client)
        users = sorted({e.user_id for e in events[:n]})
        rng = random.Random(0)
        for q in QUERIES:  # first sight of each query text pays the encoder once; not measured
            # Until the worker answers it from the encoder (a busy box can miss the 250 ms deadline
            # right after the throughput phase; a degraded answer leaves the text uncached).
            deadline = time.monotonic() + 60
            while client.request(RecommendationRequest(user_id="warm", kind="search", query=q), timeout_s=30).degraded:
                if time.monotonic() > deadline:
                    print(f"!! query {q!r} still answered degraded after 60 s of warm-up", flush=True)
                    break
                time.sleep(0.5)

        def mixed(rps: float, duration_s: float) -> dict:
            """Requests at `rps` beside behaviour at --events-rps for `duration_s`: latency, freshness,
            degraded answers, and CPU by process, per request and as cores."""
            text_before = worker.metrics()
            fresh_before = _quantile_from_histogram(text_before, "recstream_feature_freshness_seconds")[1]
            e2e_series = ',stage="request_e2e_at_publish"'
            e2e_before = _quantile_from_histogram(text_before, "recstream_stage_latency_seconds", labels=e2e_series)[1]
            stop = threading.Event()
            sent_events = [0]

            def behaviour_load() -> None:
                limiter = RateLimiter(args.events_rps)
                i = n
                while not stop.is_set():
                    key, value = (events[i % len(events)].user_id.encode(), encode(events[i % len(events)]))
                    producer.send_raw(topic, key, value)
                    sent_events[0] += 1
                    i += 1
                    limiter.wait()

            # The load generator's own pauses must not count as the stack's latency: its full
            # collections (over the phases' results, payloads and futures) stopped this process for
            # 50-100 ms every 10-25 s, and with it the requests and events it sends (the broker's
            # request log showed no produce at all during the stalls). No collection while it sends.
            gc.collect()
            gc.disable()
            cpu_before = {name: _tree_cpu_seconds(pid) for name, pid in procs.items()}
            cpu_before["load_generator"] = _cpu_seconds(os.getpid())
            load_mixed0 = os.getloadavg()[0]
            loader = threading.Thread(target=behaviour_load, daemon=True)
            loader.start()
            latencies: list[float] = []
            kinds: list[str] = []
            results = []
            lock = threading.Lock()
            limiter = RateLimiter(rps)
            t0 = time.perf_counter()
            futures = []
            while time.perf_counter() - t0 < duration_s:
                user = rng.choice(users)
                if rng.random() < args.search_share:
                    req = RecommendationRequest(user_id=user, kind="search", query=rng.choice(QUERIES), k=10)
                else:
                    req = RecommendationRequest(user_id=user, k=10)
                sent = time.perf_counter()
                fut = client.submit(req)

                def done(f, sent=sent, kind=req.kind) -> None:
                    now = time.perf_counter()
                    with lock:
                        latencies.append((now - sent) * 1000)
                        kinds.append(kind)
                        r = f.result()  # keep what is counted, not the answer (less for the collector)
                        results.append(Answered(r.kind, r.degraded, not r.items, r.model_version))

                fut.add_done_callback(done)
                futures.append(fut)
                limiter.wait()
            elapsed = time.perf_counter() - t0
            cpu_cores = {name: (_tree_cpu_seconds(pid) - cpu_before[name]) / elapsed for name, pid in procs.items()}
            cpu_cores["load_generator"] = (_cpu_seconds(os.getpid()) - cpu_before["load_generator"]) / elapsed
            load_mixed1 = os.getloadavg()[0]
            stop.set()
            loader.join(5)
            deadline = time.perf_counter() + ANSWER_GRACE_S
            while len(latencies) < len(futures) and time.perf_counter() < deadline:
                time.sleep(0.05)
            gc.enable()
            metrics_text = worker.metrics()
            fresh_p99, _ = _quantile_from_histogram(metrics_text, "recstream_feature_freshness_seconds", fresh_before)
            # Where the tail is: produce -> the worker publishing the answer (the rest is Kafka delivery
            # to the client and the client itself).
            worker_e2e = {
                f"p{int(q * 100)}": round(
                    _quantile_from_histogram(
                        metrics_text, "recstream_stage_latency_seconds", e2e_before, labels=e2e_series, q=q
                    )[0]
                    * 1000,
                    1,
                )
                for q in (0.5, 0.95, 0.99)
            }
            lost = len(futures) - len(latencies)
            sent_per_s = len(futures) / elapsed
            degraded = sum(r.degraded for r in results)
            empty = sum(r.empty for r in results)
            stages = {}
            import re

            for m in re.finditer(r'^recstream_stage_latency_seconds_sum\{stage="([^"]+)"\} (\S+)$', metrics_text, re.M):
                cnt = re.search(
                    rf'^recstream_stage_latency_seconds_count\{{stage="{m.group(1)}"\}} (\S+)$', metrics_text, re.M
                )
                if cnt and float(cnt.group(1)):
                    stages[m.group(1)] = round(float(m.group(2)) / float(cnt.group(1)) * 1000, 3)
            lat_ms = latency_percentiles(latencies, lost)
            by_kind = {}
            for kind in ("recommend", "search"):
                got = np.array([v for v, k in zip(latencies, kinds, strict=True) if k == kind])
                answers = [r for r in results if r.kind == kind]
                by_kind[kind] = {
                    "requests": len(got),
                    **{
                        f"latency_ms_p{q}": round(float(np.percentile(got, q)), 2) if len(got) else None
                        for q in (50, 99)
                    },
                    "degraded": sum(r.degraded for r in answers),
                    "model_versions": sorted({r.model_version for r in answers}),
                }
            return {
                **lat_ms,
                "by_kind": by_kind,
                "requests_per_s": round(len(latencies) / elapsed, 1),
                "cpu_cores": {k: round(v, 3) for k, v in cpu_cores.items()},
                # per request actually sent: a load generator that fell behind its rate sent fewer
                "cpu_ms_per_request": {k: round(v * 1000 / max(sent_per_s, 1e-9), 2) for k, v in cpu_cores.items()},
                "freshness_ms_p99": round(fresh_p99 * 1000, 1),
                "worker_request_to_publish_ms": worker_e2e,
                "degraded_share": round(degraded / max(len(results), 1), 4),
                "empty_answers": empty,
                "requests_sent": len(futures),
                "sent_per_s": round(sent_per_s, 1),
                "requests_unanswered": lost,
                "behaviour_events": sent_events[0],
                "behaviour_rate_per_s": round(sent_events[0] / elapsed, 0),
                "load_average_start_end": [round(load_mixed0, 2), round(load_mixed1, 2)],
                "model_versions": sorted({r.model_version for r in results}),
                "worker_stage_mean_ms": stages,
                "duration_s": round(elapsed, 1),
            }

        # The broker's JIT compiles its request paths in the first minute under load (C2 threads took
        # up to 0.43 cores, twice the broker's steady 0.18 at 200 req/s): a long-running deployment
        # never pays that again, so the measured phases start after a warm-up at the main rate.
        if args.warmup_s > 0:
            warm = mixed(args.rps, args.warmup_s)
            print(
                f"warm-up {args.warmup_s:.0f}s at {args.rps:.0f} req/s (not measured): p99 {warm['latency_ms_p99']} ms,"
                f" CPU cores {json.dumps(warm['cpu_cores'])}",
                flush=True,
            )
        run = mixed(args.rps, args.duration_s)
        # capacity: the highest offered rate whose p99 stays within 50 ms with no degraded answer
        steps = []
        for rate in [float(r) for r in args.capacity_steps.split(",") if r.strip()]:
            step = mixed(rate, args.step_s)
            ok = step_within_target(step, rate)
            steps.append({"rate": rate, "ok": ok, **{k: step[k] for k in STEP_KEYS}})
            print(
                f"capacity step {rate:.0f} req/s: p99 {step['latency_ms_p99']} ms, degraded "
                f"{step['degraded_share']}, {'ok' if ok else 'over'}",
                flush=True,
            )
            if not ok:
                break
        capacity = max([st["rate"] for st in steps if st["ok"]], default=0.0)
        result = {
            "capacity_req_per_s": capacity,
            "cpu_ms_per_request": run["cpu_ms_per_request"],
            "cpu_ms_per_1k_events": cpu_per_1k_events,
            **{k: run[k] for k in ("latency_ms_p50", "latency_ms_p95", "latency_ms_p99", "requests_per_s")},
            "events_per_s": round(events_per_s, 0),
            "events_per_worker_cpu_s": round(n / worker_cpu, 0),
            "load_average_at_throughput_start": round(load0, 2),
            "load_average_mixed_start_end": run["load_average_start_end"],
            "cpu_cores_during_mixed": run["cpu_cores"],
            "freshness_ms_p99": run["freshness_ms_p99"],
            "by_kind": run["by_kind"],
            "search_latency_ms_p99": run["by_kind"]["search"]["latency_ms_p99"],
            "worker_request_to_publish_ms": run["worker_request_to_publish_ms"],
            "degraded_share": run["degraded_share"],
            "requests_sent": run["requests_sent"],
            "requests_unanswered": run["requests_unanswered"],
            "empty_answers": run["empty_answers"],
            "behaviour_events_during_mixed": run["behaviour_events"],
            "behaviour_rate_during_mixed_per_s": run["behaviour_rate_per_s"],
            "capacity_steps": steps,
            "search_share": args.search_share,
            "warmup_s": args.warmup_s,
            "duration_s": run["duration_s"],
            "ranker": ranker_note if args.ranker == "auto" else f"{args.ranker}; Triton: {ranker_note}",
            "triton_models": triton.models if triton.models is not None else triton.repo_models(),
            "triton_fallback": triton_fallback,
            "model_versions": run["model_versions"],
            "worker_stage_mean_ms": run["worker_stage_mean_ms"],
            "targets": {
                "capacity_req_per_s": 200,
                "latency_ms_p99": 50,
                "events_per_s": 30000,
                "freshness_ms_p99": 50,
                "kafka_cores_at_200_req_per_s": 0.25,
            },
            "machine": f"{os.cpu_count()} cores shared by Kafka, tritonserver, worker and this load generator",
        }
        client.close()
        producer.flush(30)
        rows = [
            {"metric": k, "value": result[k], "target": result["targets"].get(k, "-")}
            for k in (
                "capacity_req_per_s",
                "latency_ms_p50",
                "latency_ms_p95",
                "latency_ms_p99",
                "requests_per_s",
                "events_per_s",
                "freshness_ms_p99",
                "degraded_share",
                "requests_unanswered",
            )
        ]
        print_table(f"stream bench (bench/results/{args.name}.json)", rows, ["metric", "value", "target"])
        print("worker stage means (ms):", json.dumps(run["worker_stage_mean_ms"]))
        print("CPU cores used during the mixed phase:", json.dumps(result["cpu_cores_during_mixed"]))
        print("CPU-ms per request:", json.dumps(result["cpu_ms_per_request"]))
        print("CPU-ms per 1,000 behaviour events (throughput phase):", json.dumps(cpu_per_1k_events))
        print("worker request produce -> answer published (ms):", json.dumps(run["worker_request_to_publish_ms"]))
        write_result(args.name, result)
        return 0
    finally:
        for handle in reversed(handles):
            with contextlib.suppress(Exception):
                handle.close()
        if worker is not None:
            worker.stop()
        triton.stop()
        broker.stop()
        for d in RUN.glob("qdrant-b*"):
            shutil.rmtree(d, ignore_errors=True)
        print(f"total {time.time() - t_start:.0f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())

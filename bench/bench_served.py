"""Served-quality bench: what a user actually gets from the real stack, scored like the quality bench.

    make bench-served  (python -m bench.bench_served [--rps 50] [--skip-before] [--kind search|cold [--seeds 0,1,2]])

Starts a Kafka broker, tritonserver over a model repository and `python -m streams.worker` (all
agents, Qdrant local mode) on this machine, then for MovieLens-100k's leave-last-out split:

1. the catalog goes through the catalog topic (the worker embeds it with the served item encoder);
2. every user's history except the held-out test item (train + validation interactions) is replayed
   through the behaviour topic in time order, as the demo replays ratings (view, click 4+,
   purchase 5);
3. each user's recommend request (k=10, event time = the user's last history interaction) goes
   through the requests topic; the published list, after the worker's exclusions, diversity and
   policy, is scored against the held-out item with the metric code of the quality bench (a
   target outside the 10 shown counts as a miss).

Two configurations, each on its own fresh stack in one run: `served` (model_repo/ as committed:
the trained item encoder, session encoder and ranker) and `before` (the path served until this
change: zero-shot MiniLM item vectors, the decayed-sum session vector and the ranker's
initialisation, i.e. retrieval order). `offline_ndcg10` scores the same model versions in-process
on the same cases with full ranking (no diversity, whole history excluded). Writes
bench/results/served.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from recstream.config import REPO_ROOT, Settings, setting_default

RUN = REPO_ROOT / "run" / "bench-served"
K = 10
#: Requests sent and awaited before the measured ones (not scored, not timed).
WARM_UP_REQUESTS = 20


def _history_rows(split) -> object:
    """Interactions of each user minus the test item (train + validation), as the data set has them."""
    import pandas as pd

    idx = split.data.interactions
    test = {
        (split.user_ids[u], split.item_ids[i])
        for u, i in zip(split.test["user_idx"], split.test["item_idx"], strict=True)
    }
    test_ts = {split.user_ids[u]: t for u, t in zip(split.test["user_idx"], split.test["ts"], strict=True)}
    keep = [
        not ((u, i) in test and ts == test_ts.get(u))
        for u, i, ts in zip(idx["user_id"].astype(str), idx["item_id"].astype(str), idx["ts"], strict=True)
    ]
    return pd.DataFrame(idx[keep]).reset_index(drop=True)


def _known_rows(split) -> object:
    """The interactions a split's models may know (its training and validation rows), as the data
    set has them: for the cold-start split, nothing with a cold item and no warm test item."""
    import pandas as pd

    idx = split.data.interactions
    known = {
        (split.user_ids[u], split.item_ids[i], int(t))
        for frame in (split.train, split.valid)
        for u, i, t in zip(frame["user_idx"], frame["item_idx"], frame["ts"], strict=True)
    }
    keep = [
        (u, i, int(t)) in known
        for u, i, t in zip(idx["user_id"].astype(str), idx["item_id"].astype(str), idx["ts"], strict=True)
    ]
    return pd.DataFrame(idx[keep]).reset_index(drop=True)


def _before_repo(tmp: Path) -> Path:
    """A repository with what was served before trained models: text_encoder + the ranker's init."""
    from recstream.models.export import export_ranker
    from recstream.models.ranker import new_ranker

    repo = tmp / "model_repo_before"
    shutil.copytree(REPO_ROOT / "model_repo" / "text_encoder", repo / "text_encoder")
    export_ranker(new_ranker(), repo, version=1)
    return repo


def run_stack(
    model_repo: Path,
    split,
    history,
    rps: float,
    label: str,
    queries: dict[str, str] | None = None,
    new_item_slot_factor: float | None = None,
) -> dict:
    """One fresh stack over `model_repo`: catalog, history replay, one request per test user (a
    search with the user's query where `queries` is given, for those users only)."""
    from bench.bench_stream import _cpu_seconds, _tree_cpu_seconds
    from bench.common import index_catalog
    from infra.kafka_broker import KafkaBroker
    from infra.triton_server import TritonServer
    from recstream.client import EventProducer, RecommendationClient
    from recstream.contracts.events import RecommendationRequest
    from recstream.contracts.topics import BEHAVIOUR
    from recstream.data.events import behaviour_events, catalog_events
    from recstream.kafka.admin import ensure_topics
    from recstream.kafka.serde import encode
    from recstream.ops.replay import RateLimiter
    from streams.process import WorkerProcess

    run = RUN / label
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    t_start = time.time()
    broker = KafkaBroker(run / "kafka", port=0, controller_port=0)
    bootstrap = broker.start(timeout_s=90)
    triton = TritonServer(model_repo, run / "triton", http_port=0, grpc_port=0, metrics_port=0)
    worker = None
    try:
        triton.start()
        prefix = f"s{uuid.uuid4().hex[:8]}."
        settings = Settings(
            kafka_bootstrap=bootstrap,
            topic_prefix=prefix,
            triton_url=triton.url,
            triton_grpc_url=triton.grpc_url,
            qdrant_path=run / "qdrant",
            run_dir=run / "worker",
            model_repo=model_repo,
            new_item_slot_factor=new_item_slot_factor,
            log_level="WARNING",
        )
        ensure_topics(settings)
        worker = WorkerProcess(settings, run / "worker.log").start(ready_timeout_s=240)
        items = catalog_events(split.data.items)
        catalog_s = index_catalog(settings, worker, items, timeout_s=600)

        events = list(behaviour_events(history))
        topic = BEHAVIOUR.name(prefix)
        t0 = time.time()
        with EventProducer(settings, worker="bench", **{"linger.ms": 5}) as producer:
            for e in events:
                producer.send_raw(topic, e.user_id.encode(), encode(e))
        while worker.metric("recstream_feature_events_total", 'result="applied"') < len(events):
            time.sleep(0.2)
            if time.time() - t0 > 600:
                raise TimeoutError("history not applied in 600 s")
        replay_s = time.time() - t0
        # The popularity rows are flushed about once a second; the requests read the live counts.
        time.sleep(2)

        last_ts = history.groupby(history["user_id"].astype(str))["ts"].max().to_dict()
        users = [split.user_ids[u] for u in split.test["user_idx"]]
        if queries is not None:
            users = [u for u in users if u in queries]
        client = RecommendationClient(settings)
        # Unmeasured warm-up (first calls load Triton's model instances and the worker's caches),
        # by a user outside the test set: the measured answers' latency and degraded count are the
        # stack's, not its start-up's.
        # (at the replay's time, as the measured requests: a request from today would move the
        # worker's clock past every trending window)
        warm_query = None if queries is None else next(iter(queries.values()))
        warm_ts = int(max(last_ts.values())) * 1000
        warm = [
            client.submit(
                RecommendationRequest(user_id="bench-warm-up", k=K, ts_ms=warm_ts)
                if warm_query is None
                else RecommendationRequest(user_id="bench-warm-up", k=K, ts_ms=warm_ts, kind="search", query=warm_query)
            )
            for _ in range(WARM_UP_REQUESTS)
        ]
        for fut in warm:
            fut.result(timeout=60)
        limiter = RateLimiter(rps)
        futures = []
        procs = {"worker": worker.proc.pid, "tritonserver": triton._proc.pid, "kafka": broker._proc.pid}
        cpu0 = {k: _tree_cpu_seconds(v) for k, v in procs.items()}
        cpu0["load_generator"] = _cpu_seconds(os.getpid())
        t0 = time.perf_counter()
        for user in users:
            ts_ms = int(last_ts[user]) * 1000
            if queries is None:
                req = RecommendationRequest(user_id=user, k=K, ts_ms=ts_ms)
            else:
                req = RecommendationRequest(user_id=user, k=K, ts_ms=ts_ms, kind="search", query=queries[user])
            futures.append(client.submit(req))
            limiter.wait()
        results = [fut.result(timeout=60) for fut in futures]
        elapsed = time.perf_counter() - t0
        cpu = {k: _tree_cpu_seconds(v) - cpu0[k] for k, v in procs.items()}
        cpu["load_generator"] = _cpu_seconds(os.getpid()) - cpu0["load_generator"]
        client.close()
        lat = np.array([r.latency_ms for r in results if r.latency_ms is not None], dtype=np.float64)
        return {
            "results": results,
            "latency_ms_p50": round(float(np.percentile(lat, 50)), 1) if len(lat) else None,
            "latency_ms_p99": round(float(np.percentile(lat, 99)), 1) if len(lat) else None,
            "cpu_ms_per_request": {k: round(v * 1000 / len(users), 2) for k, v in cpu.items()},
            "catalog_index_s": round(catalog_s, 1),
            "history_events": len(events),
            "history_replay_s": round(replay_s, 1),
            "requests_s": round(elapsed, 1),
            "stack_s": round(time.time() - t_start, 1),
            "model_versions": sorted({r.model_version for r in results}),
            "degraded": sum(r.degraded for r in results),
        }
    finally:
        if worker is not None:
            worker.stop()
        triton.stop()
        broker.stop()


def _gains(ranks: np.ndarray) -> np.ndarray:
    """Per case NDCG@K gain of a rank (0-based; beyond the list = 0)."""
    return np.where(ranks < K, 1.0 / np.log2(ranks + 2.0), 0.0)


def _paired(diff: np.ndarray) -> dict:
    """Mean per-case difference with its standard error and normal 95 % interval."""
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    mean = float(diff.mean())
    return {"diff": round(mean, 4), "se": round(se, 4), "ci95": [round(mean + z * se, 4) for z in (-1.96, 1.96)]}


def score_served(split, results) -> tuple[dict, np.ndarray]:
    """Rank of each user's test item in the list they were shown (K = a miss beyond the list)."""
    from recstream.eval.metrics import metrics_from_ranks

    target = {
        split.user_ids[u]: split.item_ids[i]
        for u, i in zip(split.test["user_idx"], split.test["item_idx"], strict=True)
    }
    ranks = []
    for r in results:
        shown = [it.item_id for it in r.items]
        t = target[r.user_id]
        ranks.append(shown.index(t) if t in shown else 10**6)
    ranks = np.array(ranks)
    return metrics_from_ranks(ranks, ks=(K,)), ranks


def score_offline(split, model_repo: Path, new_item_slot_factor: float | None = None) -> tuple[dict, np.ndarray, dict]:
    """The same model versions in-process on the same cases (full ranking, whole history excluded),
    and the same again "as served": popularity and trend counted over everything the stack replayed
    (train + validation) and the top 10 chosen by the worker's diversity rule. The second says how
    much of a served-offline gap those two differences explain. New items are placed as the stack
    places them (`new_item_slot_factor`; None: as the ranker version says, as the worker does)."""
    from recstream.eval.metrics import metrics_from_ranks, target_ranks
    from recstream.models.ranker import RankingContext, places_new_items
    from recstream.models.repository import load_exported, load_sequence_scorer
    from recstream.models.served import ServedRetrieval
    from recstream.recommend.rerank import diversify
    from recstream.recommend.rerank import new_item_slot_factor as version_slot_factor
    from recstream.recommend.scoring import Candidate
    from recstream.training.bundle import item_categories, serving_item_texts
    from recstream.training.ranker import request_times, rerank_scores, split_events

    retrieval = ServedRetrieval.from_repo(model_repo, serving_item_texts(split), [str(i) for i in split.item_ids])
    ranker = load_exported(model_repo)
    new_item_slot_factor = version_slot_factor(places_new_items(ranker.meta), new_item_slot_factor)
    sequence = load_sequence_scorer(model_repo)
    if sequence is not None and sequence.item_ids != [str(i) for i in split.item_ids]:
        raise ValueError(f"{model_repo}'s sequence_scorer was trained on another catalogue than {split.data.name}'s")
    cats = item_categories(split)
    cases = split.cases("test")
    times = request_times(split, cases.users, cases.histories)
    depth = int(ranker.meta.config.get("rerank_depth", 100))
    ctx = RankingContext(cats, split.train_seqs, len(split.item_ids), split_events(split))
    scores = rerank_scores(ranker, retrieval, ctx, cases.histories, depth, times, new_item_slot_factor, sequence)
    ranks = target_ranks(scores, cases.targets, cases.histories)

    items, ts = split_events(split)
    valid_items = split.valid["item_idx"].to_numpy(np.int64)
    replayed = RankingContext(
        cats,
        list(cases.histories),
        len(split.item_ids),
        (np.concatenate([items, valid_items]), np.concatenate([ts, split.valid["ts"].to_numpy(np.int64)])),
    )
    as_served = rerank_scores(
        ranker, retrieval, replayed, cases.histories, depth, times, new_item_slot_factor, sequence
    )
    shown_ranks = []
    for r, h in enumerate(cases.histories):
        s = as_served[r].copy()
        s[np.asarray(h, dtype=np.int64)] = -np.inf
        top = np.argsort(-s, kind="stable")[:depth]
        picked = diversify([Candidate(str(i), 0.0, category=cats[i]) for i in top], s[top], K)
        shown = [int(c.item_id) for c, _ in picked]
        shown_ranks.append(shown.index(cases.targets[r]) if cases.targets[r] in shown else 10**6)
    as_served_metrics = metrics_from_ranks(np.array(shown_ranks), ks=(K,))
    return metrics_from_ranks(ranks, ks=(K,)), ranks, {"metrics": as_served_metrics, "ranks": np.array(shown_ranks)}


def score_offline_search(split, model_repo: Path) -> tuple[dict[str, str], dict, np.ndarray, dict]:
    """Search cases of bench-search (category queries of the test targets) scored in-process by the
    served text_encoder version with the fusion weights it ships: as the protocol ranks (history
    excluded, popularity over train) and as the stack answers (only purchases excluded: a search
    shows seen items; popularity over train + validation, what the stack replayed; top 10)."""
    from recstream.contracts.models import TEXT_ENCODER
    from recstream.eval.metrics import metrics_from_ranks, target_ranks
    from recstream.models.encoder import version_text_encoder
    from recstream.models.repository import latest_version_dir
    from recstream.models.served import ServedRetrieval
    from recstream.models.training import read_meta
    from recstream.search.protocol import category_cases
    from recstream.search.query_encoder import dense_scores, encode_cases
    from recstream.search.scoring import BM25Index, fuse
    from recstream.search.served import SearchWeights
    from recstream.training.bundle import serving_item_texts

    vdir = latest_version_dir(model_repo, TEXT_ENCODER)
    meta = read_meta(vdir)
    if meta is None or "search_weights" not in meta.extra:
        raise SystemExit(f"{vdir} ships no search weights: run `make bench-search ARGS=--export` first")
    w = SearchWeights.from_bench(meta.extra["search_weights"])
    cases = category_cases(split, "test")
    texts = serving_item_texts(split)
    retrieval = ServedRetrieval.from_repo(model_repo, texts, [str(i) for i in split.item_ids])
    items = retrieval.item_vectors.numpy()
    dense = dense_scores(encode_cases(version_text_encoder(vdir).encode, cases), items)
    bm25 = BM25Index(texts).scores(cases.queries)
    session = retrieval.score_index(cases.histories)

    def fused(counts: np.ndarray) -> np.ndarray:
        pop = np.broadcast_to(np.log1p(counts).astype(np.float32)[None, :], dense.shape)
        return fuse([(1.0, dense), (w.lexical, bm25), (w.popularity, pop), (w.session, session)])

    train_counts = np.bincount(split.train["item_idx"], minlength=split.n_items)
    ranks = target_ranks(fused(train_counts), cases.targets, cases.histories)
    replayed = train_counts + np.bincount(split.valid["item_idx"], minlength=split.n_items)
    # the worker hides what a session bought (ratings of 5 replay as purchases), even from a search
    rating = {
        (str(u), str(i)): r
        for u, i, r in zip(
            split.data.interactions["user_id"],
            split.data.interactions["item_id"],
            split.data.interactions["rating"],
            strict=True,
        )
    }
    bought = [
        np.array([i for i in h if rating.get((split.user_ids[u], split.item_ids[i]), 0) >= 5], dtype=np.int64)
        for u, h in zip(cases.users, cases.histories, strict=True)
    ]
    shown = target_ranks(fused(replayed), cases.targets, bought)
    shown = np.where(shown < K, shown, 10**6)
    users = [split.user_ids[u] for u in cases.users]
    queries = dict(zip(users, cases.queries, strict=True))
    as_served = {"metrics": metrics_from_ranks(shown, ks=(K,)), "ranks": shown, "version": vdir.name, "weights": w}
    return queries, metrics_from_ranks(ranks, ks=(K,)), ranks, as_served


def main_search(args) -> int:
    """`--kind search`: the served search through the real stack against the same configuration
    offline (bench/results/served_search.json)."""
    from bench.common import print_table, write_result
    from recstream.data.datasets import load_dataset
    from recstream.data.split import leave_last_out

    split = leave_last_out(load_dataset("ml-100k"))
    history = _history_rows(split)
    queries, offline, offline_ranks, as_served = score_offline_search(split, args.model_repo)
    print(f"offline search (text_encoder v{as_served['version']}): NDCG@10 {offline['NDCG@10']:.4f}", flush=True)
    run = run_stack(args.model_repo, split, history, args.rps, "search", queries=queries)
    results = run.pop("results")
    served, served_ranks = score_served(split, results)
    by_user = dict(zip([r.user_id for r in results], served_ranks, strict=True))
    served_ranks = np.array([by_user[u] for u in queries])

    result = {
        "served_ndcg10": round(served["NDCG@10"], 4),
        "served_hr10": round(served["HR@10"], 4),
        "offline_ndcg10": round(offline["NDCG@10"], 4),
        "offline_as_served_ndcg10": round(as_served["metrics"]["NDCG@10"], 4),
        "served_minus_offline_as_served_ndcg10": _paired(_gains(served_ranks) - _gains(as_served["ranks"])),
        "served_minus_offline_ndcg10": _paired(_gains(served_ranks) - _gains(offline_ranks)),
        "n_cases": len(served_ranks),
        "text_encoder_version": as_served["version"],
        "search_weights": as_served["weights"].model_dump(),
        "latency_ms_p50": run["latency_ms_p50"],
        "latency_ms_p99": run["latency_ms_p99"],
        "run": run,
        "offline_metric": "bench-search's category protocol: full ranking, the user's history excluded, "
        "popularity over train",
        "offline_as_served_metric": "the same scores with only purchased items excluded (a search shows seen "
        "items; ratings of 5 replay as purchases) and popularity over train + validation (what the stack "
        "replayed); rank within the top 10",
        "served_metric": "rank of the test item in the 10 items the worker published for the search; not shown = miss",
        "protocol": "ml-100k leave-last-out test cases with category words; history = train + validation replayed "
        "through Kafka in time order; one search per user (query = the target's genres) at the event time of "
        "the user's last history interaction",
    }
    rows = [
        {"path": "served search (real stack)", "NDCG@10": result["served_ndcg10"], "HR@10": result["served_hr10"]},
        {"path": "offline as served", "NDCG@10": result["offline_as_served_ndcg10"]},
        {"path": "offline (protocol)", "NDCG@10": result["offline_ndcg10"], "HR@10": round(offline["HR@10"], 4)},
    ]
    print_table(
        f"served search, {len(served_ranks)} cases (bench/results/{args.name}.json)", rows, ["path", "NDCG@10", "HR@10"]
    )
    print("search run:", json.dumps(run, default=str))
    write_result(args.name, result)
    return 0


def _cold_draw(args, seed: int, draw: int) -> tuple[dict, dict[str, np.ndarray]]:
    """One cold-start draw through the stack: the seed's served models trained on the draw (the quality
    bench's cached run), exported to a scratch repository and served; its figures and per-case ranks."""
    from recstream.contracts.models import ITEM_ENCODER
    from recstream.data import cold_start_split, load_dataset
    from recstream.eval.baselines import ZeroShotText
    from recstream.eval.metrics import metrics_from_ranks, rank_cases
    from recstream.models.served import ItemEncoder
    from recstream.training.bundle import export_bundle, served_model

    split = cold_start_split(load_dataset("ml-100k"), frac=args.cold_frac, seed=draw)
    cases = split.cases("test")
    bundle = served_model(seed).fit(split).bundle
    zero_shot_ranks = rank_cases(ZeroShotText().fit(split).score, cases.users, cases.histories, cases.targets)
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "model_repo_cold"
        shutil.copytree(args.model_repo / "text_encoder", repo / "text_encoder")
        exported = export_bundle(bundle, repo, version=1)
        cold_rule = ItemEncoder.load(exported[ITEM_ENCODER]).cold_rule.model_dump()
        offline, offline_ranks, as_served = score_offline(split, repo, args.new_item_slot_factor)
        run = run_stack(
            repo, split, _known_rows(split), args.rps, f"cold{draw}", new_item_slot_factor=args.new_item_slot_factor
        )
    results = run.pop("results")
    if [r.user_id for r in results] != [split.user_ids[u] for u in cases.users]:
        raise RuntimeError("served answers are not in the order of the test cases")
    served, served_ranks = score_served(split, results)
    zero_shot = metrics_from_ranks(zero_shot_ranks, ks=(K,))
    figures = {
        "seed": seed,
        "draw": draw,
        "n_cases": len(served_ranks),
        "cold_items": len(split.cold_items),
        "served_ndcg10": round(served["NDCG@10"], 4),
        "served_hr10": round(served["HR@10"], 4),
        "offline_ndcg10": round(offline["NDCG@10"], 4),
        "offline_as_served_ndcg10": round(as_served["metrics"]["NDCG@10"], 4),
        "zero_shot_ndcg10": round(zero_shot["NDCG@10"], 4),
        "served_minus_zero_shot_ndcg10": _paired(_gains(served_ranks) - _gains(zero_shot_ranks)),
        "cold_rule": cold_rule,
        # how it was chosen: every candidate's served NDCG@10 on the split's cold validation cases
        "cold_rule_choice": None if bundle.cold_rule_choice is None else bundle.cold_rule_choice.model_dump(),
        "sequence_fusion": None if bundle.sequence is None else bundle.sequence.fusion.model_dump(),
        "run": run,
    }
    ranks = {
        "served": served_ranks,
        "offline": offline_ranks,
        "offline_as_served": as_served["ranks"],
        "zero_shot": zero_shot_ranks,
        "latency_ms": np.array([r.latency_ms for r in results if r.latency_ms is not None], dtype=np.float64),
        "degraded_at": np.flatnonzero([r.degraded for r in results]),
    }
    return figures, ranks


def paired_by_draw(ranks: list[dict], draws: list[int], path: str, reference: str) -> dict:
    """`path` minus `reference`, paired per case, with the seeds that share a draw averaged per case
    (as bench-quality and bench-exposure do): one group per seed counted a draw's cases once per
    seed, and with --cold-seeds 0 the interval shrank by sqrt(3) for cases that were not new."""
    from bench.common import paired_over_splits

    by_draw: dict[int, list[dict]] = {}
    for draw, r in zip(draws, ranks, strict=True):
        by_draw.setdefault(draw, []).append(r)
    return paired_over_splits([([r[path] for r in rs], [r[reference] for r in rs]) for rs in by_draw.values()], k=K)


def main_cold(args) -> int:
    """`--kind cold`: new items through the real stack (bench/results/served_cold.json).

    The quality bench's cold-start split (10 % of the items held out of training entirely), over the
    same draws as its cold table (seed s on draw s): for each, the served models are `make train`'s
    code trained on that draw (the bench's cached run) and exported to a scratch repository; the
    whole catalogue goes through the catalog topic, so the held-out items are new items that the
    served item encoder meets for the first time; the split's training and validation interactions
    are replayed; each test user (whose held-out item is a new one) asks for 10 recommendations.
    Zero-shot MiniLM on the same cases is the reference; differences are paired over every
    (draw, case), as the quality bench's cold table."""
    from bench.common import cold_draws, print_table, write_result

    seeds = [int(s) for s in args.seeds.split(",")]
    draws = cold_draws(args.cold_seeds, seeds)
    per_draw, ranks = [], []
    for seed, draw in zip(seeds, draws, strict=True):
        figures, draw_ranks = _cold_draw(args, seed, draw)
        print(f"draw {draw} (seed {seed}): served NDCG@10 {figures['served_ndcg10']:.4f}", flush=True)
        per_draw.append(figures)
        ranks.append(draw_ranks)

    def pooled(path: str, metric: str = "ndcg") -> float:
        gains = np.concatenate([_gains(r[path]) if metric == "ndcg" else r[path] < K for r in ranks])
        return round(float(np.mean(gains)), 4)

    def versus(path: str, reference: str) -> dict:
        return paired_by_draw(ranks, draws, path, reference)

    latency = np.concatenate([r["latency_ms"] for r in ranks])
    result = {
        "served_ndcg10": pooled("served"),
        "served_hr10": pooled("served", "hr"),
        "offline_ndcg10": pooled("offline"),
        "offline_as_served_ndcg10": pooled("offline_as_served"),
        "zero_shot_ndcg10": pooled("zero_shot"),
        "zero_shot_hr10": pooled("zero_shot", "hr"),
        "served_minus_zero_shot_ndcg10": versus("served", "zero_shot"),
        "served_minus_offline_as_served_ndcg10": versus("served", "offline_as_served"),
        "served_minus_offline_ndcg10": versus("served", "offline"),
        "n_cases": int(sum(len(r["served"]) for r in {d: r for d, r in zip(draws, ranks, strict=True)}.values())),
        "seeds": seeds,
        "draws": draws,
        "new_item_slot_factor": args.new_item_slot_factor,
        "latency_ms_p50": round(float(np.percentile(latency, 50)), 1),
        "latency_ms_p99": round(float(np.percentile(latency, 99)), 1),
        "degraded": int(sum(len(r["degraded_at"]) for r in ranks)),
        # which requests fell back to retrieval (index in each draw's request order): a cluster at
        # the start is a stack still warming up, a spread is a box too slow for the rate
        "degraded_at": [r["degraded_at"].tolist() for r in ranks],
        "per_draw": per_draw,
        "served_metric": "rank of the held-out new item in the 10 items the worker published; not shown = miss",
        "zero_shot_metric": "zero-shot MiniLM (mean of the history's text vectors), full ranking, history excluded",
        "protocol": f"ml-100k cold-start split ({args.cold_frac:.0%} of the items held out of training), draws "
        f"{draws} with training seeds {seeds}, each on a fresh stack; history = the split's train + validation "
        "interactions replayed through Kafka in time order; one request per test user at the event time of "
        "their last history interaction; differences paired over every (draw, case)",
    }
    rows = [
        {"path": "served (real stack, new items)", "NDCG@10": result["served_ndcg10"], "HR@10": result["served_hr10"]},
        {"path": "offline as served", "NDCG@10": result["offline_as_served_ndcg10"]},
        {"path": "offline (same versions)", "NDCG@10": result["offline_ndcg10"]},
        {
            "path": "zero-shot MiniLM (offline)",
            "NDCG@10": result["zero_shot_ndcg10"],
            "HR@10": result["zero_shot_hr10"],
        },
    ]
    title = f"served cold start, {result['n_cases']} cases over draws {draws} (bench/results/{args.name}.json)"
    print_table(title, rows, ["path", "NDCG@10", "HR@10"])
    print("served - zero-shot:", json.dumps(result["served_minus_zero_shot_ndcg10"]))
    write_result(args.name, result)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rps", type=float, default=50.0, help="recommend requests per second")
    ap.add_argument("--model-repo", type=Path, default=REPO_ROOT / "model_repo")
    ap.add_argument("--skip-before", action="store_true", help="only the served configuration")
    ap.add_argument("--name", default=None, help="result name (default: served, or served_search)")
    ap.add_argument("--kind", choices=["recommend", "search", "cold"], default="recommend")
    ap.add_argument("--seeds", default="0,1,2", help="--kind cold: the training seeds of the served models")
    ap.add_argument(
        "--cold-seeds", default="", help="--kind cold: each seed's draw (default: seed s on draw s, as bench-quality)"
    )
    ap.add_argument("--cold-frac", type=float, default=float(os.environ.get("COLD_FRAC", "0.1")))
    ap.add_argument(
        "--new-item-slot-factor",
        type=float,
        default=setting_default("new_item_slot_factor"),
        help="--kind cold: the stack's NEW_ITEM_SLOT_FACTOR and offline scoring's (unset: as the ranker version "
        "says); see make bench-exposure",
    )
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.kind == "cold":
        args.name = args.name or "served_cold"
        return main_cold(args)
    if args.kind == "search":
        args.name = args.name or "served_search"
        return main_search(args)
    args.name = args.name or "served"

    from bench.common import print_table, write_result
    from recstream.data.datasets import load_dataset
    from recstream.data.split import leave_last_out

    split = leave_last_out(load_dataset("ml-100k"))
    history = _history_rows(split)
    t0 = time.time()
    offline, offline_ranks, as_served = score_offline(split, args.model_repo)
    print(f"offline (same versions in-process): NDCG@10 {offline['NDCG@10']:.4f} ({time.time() - t0:.0f}s)", flush=True)
    served_run = run_stack(args.model_repo, split, history, args.rps, "served")
    served, served_ranks = score_served(split, served_run.pop("results"))
    print(f"served: NDCG@10 {served['NDCG@10']:.4f} HR@10 {served['HR@10']:.4f}", flush=True)
    before = before_run = None
    if not args.skip_before:
        with tempfile.TemporaryDirectory() as tmp:
            before_run = run_stack(_before_repo(Path(tmp)), split, history, args.rps, "before")
        before, _ = score_served(split, before_run.pop("results"))
        print(f"before: NDCG@10 {before['NDCG@10']:.4f}", flush=True)

    # Where served and offline differ, case by case: hits lost or gained, and why a loss happened
    # (the target was shown by offline ranking at a slot the served list gave to something else).
    diff = _gains(served_ranks) - _gains(offline_ranks)
    n = len(diff)
    result = {
        "served_ndcg10": round(served["NDCG@10"], 4),
        "served_hr10": round(served["HR@10"], 4),
        "offline_ndcg10": round(offline["NDCG@10"], 4),
        "offline_hr10": round(offline["HR@10"], 4),
        "served_over_offline": round(served["NDCG@10"] / offline["NDCG@10"], 3),
        "served_minus_offline_ndcg10": _paired(diff),
        "offline_as_served_ndcg10": round(as_served["metrics"]["NDCG@10"], 4),
        "served_minus_offline_as_served_ndcg10": _paired(_gains(served_ranks) - _gains(as_served["ranks"])),
        "cases_hit_offline_only": int(((offline_ranks < K) & (served_ranks >= K)).sum()),
        "cases_hit_served_only": int(((served_ranks < K) & (offline_ranks >= K)).sum()),
        "n_cases": n,
        "before_ndcg10": None if before is None else round(before["NDCG@10"], 4),
        "before_hr10": None if before is None else round(before["HR@10"], 4),
        "latency_ms_p50": served_run["latency_ms_p50"],
        "latency_ms_p99": served_run["latency_ms_p99"],
        "served_run": served_run,
        "before_run": before_run,
        "offline_metric": "full ranking over the catalogue, whole history excluded, ranker over the top "
        "rerank_depth, cold items keep their retrieval slot (as bench-quality)",
        "offline_as_served_metric": "offline, with popularity/trend counted over train + validation (what the "
        "stack replayed) and the top 10 picked by the worker's diversity rule",
        "served_metric": "rank of the test item in the 10 items the worker published (after exclusions, "
        "category diversity and the greedy policy); not shown = miss",
        "protocol": "ml-100k leave-last-out test cases; history = train + validation replayed through Kafka in "
        "time order; requests at the event time of the user's last history interaction",
        "targets": {"served_ndcg10": 0.10, "served_over_offline": 0.95},
    }
    rows = [
        {"path": "served (real stack)", "NDCG@10": result["served_ndcg10"], "HR@10": result["served_hr10"]},
        {"path": "offline (same versions)", "NDCG@10": result["offline_ndcg10"], "HR@10": result["offline_hr10"]},
        {
            "path": "offline as served",
            "NDCG@10": result["offline_as_served_ndcg10"],
            "HR@10": round(as_served["metrics"]["HR@10"], 4),
        },
        {"path": "before (zero-shot, stack)", "NDCG@10": result["before_ndcg10"], "HR@10": result["before_hr10"]},
    ]
    print_table(f"served quality, {n} cases (bench/results/{args.name}.json)", rows, ["path", "NDCG@10", "HR@10"])
    print("served run:", json.dumps(served_run))
    write_result(args.name, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Search quality on a published protocol: lexical, dense, hybrid and our fine-tuned query encoder.

    make bench-search      (python -m bench.bench_search [--seeds 0,1,2] [--known-items 500])

Protocol (recstream.search.protocol): personalized product search as in Ai et al., SIGIR 2017 (HEM)
and Bi et al. 2020 (TEM) on the quality bench's leave-last-out split. Each held-out interaction is a
search whose query is the target item's category words (MovieLens: its genres), whose context is
the user's earlier history (excluded from the ranking), ranked against the whole catalogue; HR@10,
NDCG@10, MRR. A synthetic known-item set (titles with a word dropped or a typo) is reported apart.

Every row scores the catalogue with one primary signal and the same tuning knobs, each weight
chosen on the validation cases only (z-scored signals, recstream.search.scoring.fuse):
  + alpha * BM25 (hybrid rows), + beta * log-popularity (all rows),
  + lambda * session score (the `personalized` rows: the served session encoder's vector against
    the served item vectors, i.e. what the stack retrieves recommendations with).
Baselines: BM25 (bm25s), zero-shot MiniLM over MiniLM item vectors, both fused (linear and
reciprocal-rank fusion), and `served-before`: zero-shot MiniLM queries over the served item vectors
(what the text_encoder served until now). Ours: the LoRA query encoder (recstream.search
.query_encoder) fine-tuned on training (query, item) pairs into the served item vectors, alone and
hybrid with BM25, one run per seed. Rows carry a t interval over cases of the per-case NDCG@10
(seed-averaged for ours) and, for ours, the interval over seeds; `paired_vs_best_baseline` pairs
the best row of ours with the best baseline, both chosen on validation NDCG@10.

`encoders` times one-query encodes (batch 1, this process's torch threads) of the chosen query
encoder in fp32 and int8 (dynamic quantisation) and scores the chosen configuration with each,
plus int8 item vectors. Writes bench/results/search.json.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.common import load_dataset_arg, print_table, write_result
from recstream.config import REPO_ROOT
from recstream.contracts.models import ITEM_ENCODER
from recstream.data.split import Split, leave_last_out
from recstream.eval.metrics import metrics_from_ranks, target_ranks
from recstream.eval.stats import mean_ci95, ndcg_gains, paired_difference
from recstream.models.code_hash import code_version
from recstream.models.encoder import TextEncoder
from recstream.models.repository import latest_version_dir
from recstream.models.served import ItemEncoder, ServedRetrieval
from recstream.models.training import ARTIFACTS_DIR, split_fingerprint
from recstream.search.protocol import SearchCases, category_cases, known_item_cases, training_pairs
from recstream.search.query_encoder import (
    QueryEncoderConfig,
    dense_scores,
    encode_cases,
    ndcg10,
    save_adapter,
    train_query_encoder,
)
from recstream.search.scoring import BM25Index, fuse, reciprocal_rank_fusion
from recstream.search.served import SearchWeights
from recstream.training.bundle import serving_item_texts

CACHE_DIR = ARTIFACTS_DIR / "search_runs"
#: The modules whose code decides what a query-encoder run produces: the reuse key hashes their
#: import closure (recstream.models.code_hash), so an edit in the towers or training helpers they
#: import retrains, and an edit in export or serving code keeps the cache.
QUERY_ENCODER_MODULES = (
    "recstream.search.protocol",
    "recstream.search.query_encoder",
    "recstream.data.split",
    "recstream.data.datasets",
    "recstream.eval.metrics",
    "recstream.eval.stats",
)
ALPHAS = (0.1, 0.25, 0.5, 1.0, 2.0)
BETAS = (0.0, 0.1, 0.25, 0.5, 1.0)
LAMBDAS = (0.25, 0.5, 1.0, 2.0, 4.0)
TABLE_COLUMNS = ["model", "kind", "personalized", "NDCG@10", "ci95", "HR@10", "MRR", "valid_NDCG@10", "weights"]
ENCODE_SAMPLES = 200


@dataclass
class Stage:
    """One case set with the signals every row draws on."""

    cases: SearchCases
    bm25: np.ndarray
    popularity: np.ndarray
    session: np.ndarray | None
    dense: dict[str, np.ndarray]  # primary dense signals by name (ours: one per seed)


def _ranks(scores: np.ndarray, cases: SearchCases) -> np.ndarray:
    return target_ranks(scores, cases.targets, cases.exclude)


Scorer = Callable[[Stage, dict[str, float]], np.ndarray]


def _scorer(primary: str, hybrid: bool, rrf: bool = False) -> Scorer:
    """A row's score from a stage's signals and weights (alpha, beta, lambda)."""

    def score(st: Stage, w: dict[str, float]) -> np.ndarray:
        if primary == "bm25":
            base = st.bm25
        elif rrf:
            base = reciprocal_rank_fusion([st.dense[primary], st.bm25])
        else:
            base = st.dense[primary]
        parts = [(1.0, base), (w.get("alpha", 0.0) if hybrid and not rrf else 0.0, st.bm25)]
        parts.append((w.get("beta", 0.0), np.broadcast_to(st.popularity, base.shape)))
        if st.session is not None:
            parts.append((w.get("lambda", 0.0), st.session))
        return fuse(parts)

    return score


def _grid(hybrid: bool, personalized: bool) -> list[dict[str, float]]:
    axes: dict[str, tuple[float, ...]] = {"beta": BETAS}
    if hybrid:
        axes["alpha"] = ALPHAS
    if personalized:
        axes["lambda"] = LAMBDAS
    return [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]


def _tune(score: Scorer, valid: Stage, hybrid: bool, personalized: bool) -> tuple[dict[str, float], float]:
    best: tuple[dict[str, float], float] = ({}, -1.0)
    for w in _grid(hybrid, personalized):
        v = ndcg10(score(valid, w), valid.cases)
        if v > best[1]:
            best = (w, v)
    return best


def _row(name: str, kind: str, personalized: bool, ranks: list[np.ndarray], valid: list[float], weights: list) -> dict:
    gains = np.mean([ndcg_gains(r) for r in ranks], axis=0)
    _, lo, hi = mean_ci95(gains)
    per_seed = [metrics_from_ranks(r, ks=(10,)) for r in ranks]
    row: dict[str, Any] = {
        "model": name,
        "kind": kind,
        "personalized": personalized,
        "HR@10": float(np.mean([m["HR@10"] for m in per_seed])),
        "NDCG@10": float(gains.mean()),
        "MRR": float(np.mean([m["MRR"] for m in per_seed])),
        "ci95": [lo, hi],
        "valid_NDCG@10": float(np.mean(valid)),
        "per_seed_valid_NDCG@10": [float(v) for v in valid],
        "weights": weights[0] if len(weights) == 1 else weights,
        "n_cases": len(gains),
    }
    if len(ranks) > 1:
        row["seeds"] = len(ranks)
        row["per_seed_NDCG@10"] = [float(ndcg_gains(r).mean()) for r in ranks]
        _, slo, shi = mean_ci95(row["per_seed_NDCG@10"])
        row["seed_ci95"] = [slo, shi]
    return row


#: (row name, kind, primary signal, hybrid with BM25, reciprocal-rank fusion)
ROWS = [
    ("bm25", "baseline", "bm25", False, False),
    ("dense-zero-shot", "baseline", "minilm", False, False),
    ("hybrid-zero-shot", "baseline", "minilm", True, False),
    ("hybrid-rrf-zero-shot", "baseline", "minilm", False, True),
    ("served-before", "baseline", "minilm_served", False, False),
    ("query-encoder-lora", "ours", "ours", False, False),
    ("query-encoder-lora+bm25", "ours", "ours", True, False),
]


def run_table(valid: Stage, test: Stage, seeds: list[int], personal: bool) -> tuple[list[dict], dict]:
    """Every row (and its personalized twin when `personal`), tuned on `valid`, scored on `test`."""
    rows, ranks = [], {}
    for name, kind, primary, hybrid, rrf in ROWS:
        for personalized in (False, True) if personal else (False,):
            score = _scorer(primary, hybrid, rrf)
            label = name + ("+session" if personalized else "")
            runs = [f"ours@{s}" for s in seeds] if primary == "ours" else [primary]
            got, vals, ws = [], [], []
            for run in runs:
                sc = _scorer(run, hybrid, rrf) if primary == "ours" else score
                w, v = _tune(sc, valid, hybrid, personalized)
                got.append(_ranks(sc(test, w), test.cases))
                vals.append(v)
                ws.append(w)
            rows.append(_row(label, kind, personalized, got, vals, ws))
            ranks[label] = got
    return rows, ranks


def _best(rows: list[dict], kind: str) -> dict:
    return max((r for r in rows if r["kind"] == kind), key=lambda r: r["valid_NDCG@10"])


def _paired(rows: list[dict], ranks: dict, n_seeds: int) -> dict:
    ours, base = _best(rows, "ours"), _best(rows, "baseline")
    base_ranks = ranks[base["model"]] * (n_seeds if len(ranks[base["model"]]) == 1 else 1)
    pd_ = paired_difference(ranks[ours["model"]], base_ranks)
    return {"model": ours["model"], "baseline": base["model"], "chosen_by": "validation NDCG@10", **pd_}


def _adapter_key(split: Split, item_vectors: np.ndarray, valid_sets: list[SearchCases], cfg: QueryEncoderConfig) -> str:
    """Data, item vectors, the validation searches (they stop the training: --known-items changes
    them), config and code."""
    parts = [split_fingerprint(split), cfg.model_dump(), code_version(*QUERY_ENCODER_MODULES)]
    parts.append(hashlib.sha256(np.ascontiguousarray(item_vectors.round(5)).tobytes()).hexdigest())
    parts.append([[c.kind, c.queries, c.targets.tolist()] for c in valid_sets])
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def trained_adapter(split, pairs, item_vectors, valid_sets, seed: int, use_cache: bool) -> tuple[Path, dict]:
    """The LoRA query encoder of one seed (cached by data, item vectors, config and code)."""
    cfg = QueryEncoderConfig(seed=seed)
    path = CACHE_DIR / _adapter_key(split, item_vectors, valid_sets, cfg) / "adapter"
    stats_file = path.parent / "stats.json"
    if use_cache and stats_file.is_file():
        print(f"query encoder seed {seed}: reusing {path.relative_to(REPO_ROOT)}", flush=True)
        return path, json.loads(stats_file.read_text())
    print(f"query encoder seed {seed}: training on {len(pairs)} distinct queries", flush=True)
    tower, stats = train_query_encoder(pairs, item_vectors, valid_sets, cfg)
    save_adapter(tower, path)
    stats_file.write_text(json.dumps(stats, indent=2))
    return path, stats


def _disjoint(cases: SearchCases, held: SearchCases, n: int) -> SearchCases:
    """The first `n` of `cases` whose target is not a target of `held` (known-item test items are
    never validation items, which choose the encoder's epoch and every weight)."""
    seen = set(held.targets.tolist())
    keep = [k for k, t in enumerate(cases.targets.tolist()) if t not in seen][:n]
    return SearchCases(
        kind=cases.kind,
        queries=[cases.queries[k] for k in keep],
        users=cases.users[keep],
        histories=[cases.histories[k] for k in keep],
        targets=cases.targets[keep],
        synthetic=cases.synthetic,
    )


def _encode_timing(encoder: TextEncoder, queries: list[str]) -> tuple[float, float]:
    times = []
    encoder.encode(queries[:4])  # warm-up
    for q in queries:
        t0 = time.perf_counter()
        encoder.encode([q])
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default=os.environ.get("DATASET", "ml-100k"))
    p.add_argument("--seeds", default=os.environ.get("SEEDS", "0,1,2"), help="comma-separated training seeds")
    p.add_argument("--known-items", type=int, default=500, help="synthetic known-item queries per stage")
    p.add_argument("--model-repo", default=str(REPO_ROOT / "model_repo"), help="whose served item vectors")
    p.add_argument("--no-cache", action="store_true")
    p.add_argument(
        "--export", action="store_true", help="write the seed best on validation as a new text_encoder version"
    )
    p.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "2")))
    p.add_argument("--out", default="search", help="result name under bench/results/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    if not seeds:
        raise SystemExit("--seeds needs at least one seed")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    data = load_dataset_arg(args.dataset)
    split = leave_last_out(data)
    texts = serving_item_texts(split)
    model_repo = Path(args.model_repo)
    served = ServedRetrieval.from_repo(model_repo, texts, split.item_ids)
    served_vectors = served.item_vectors.numpy()
    minilm = TextEncoder()
    minilm_items = served.text_vectors.numpy()  # the packaged MiniLM over the same texts
    bm25 = BM25Index(texts)
    counts = np.bincount(split.train["item_idx"].to_numpy(), minlength=split.n_items)
    popularity = np.log1p(counts).astype(np.float32)[None, :]
    case_sets = {
        ("category", "valid"): category_cases(split, "valid"),
        ("category", "test"): category_cases(split, "test"),
        ("known_item", "valid"): known_item_cases(split, args.known_items, seed=1),
    }
    case_sets["known_item", "test"] = _disjoint(
        known_item_cases(split, split.n_items, seed=0), case_sets["known_item", "valid"], args.known_items
    )
    print(f"{data}: {len(case_sets['category', 'test'])} category and {args.known_items} known-item test searches")

    pairs = training_pairs(split)
    valid_sets = [case_sets["category", "valid"], case_sets["known_item", "valid"]]
    adapters, train_stats = {}, {}
    for seed in seeds:
        adapters[seed], train_stats[seed] = trained_adapter(
            split, pairs, served_vectors, valid_sets, seed, not args.no_cache
        )
    ours = {seed: TextEncoder(adapter_dir=adapters[seed]) for seed in seeds}  # as text_encoder serves it

    stages: dict[tuple[str, str], Stage] = {}
    for key, cases in case_sets.items():
        q_minilm = encode_cases(minilm.encode, cases)
        dense = {
            "minilm": dense_scores(q_minilm, minilm_items),
            "minilm_served": dense_scores(q_minilm, served_vectors),
        }
        for seed, enc in ours.items():
            dense[f"ours@{seed}"] = dense_scores(encode_cases(enc.encode, cases), served_vectors)
        session = served.score_index(cases.histories) if key[0] == "category" else None
        stages[key] = Stage(cases, bm25.scores(cases.queries), popularity, session, dense)

    result: dict[str, Any] = {"dataset": data.name, "protocol": __doc__.split("\n\n", 2)[2].split("\n\n")[0]}
    all_ranks = {}
    for kind in ("category", "known_item"):
        rows, ranks = run_table(stages[kind, "valid"], stages[kind, "test"], seeds, personal=kind == "category")
        all_ranks[kind] = ranks
        result["rows" if kind == "category" else "known_item_rows"] = rows
        paired = _paired(rows, ranks, len(seeds))
        result["paired_vs_best_baseline" if kind == "category" else "known_item_paired_vs_best_baseline"] = paired
        print_table(f"search, {kind} queries (test)", [_fmt(r) for r in rows], TABLE_COLUMNS)
        print(
            f"paired NDCG@10 {paired['model']} - {paired['baseline']}: {paired['diff']:+.4f} "
            f"[{paired['ci95'][0]:+.4f}, {paired['ci95'][1]:+.4f}], seeds won {paired['seeds_won']}"
            f"/{paired['seeds_compared']}",
            flush=True,
        )
    result["known_item_synthetic"] = True
    result["cases"] = {f"{k[0]}/{k[1]}": len(v) for k, v in case_sets.items()}
    result["cases_without_category_words"] = case_sets["category", "test"].notes.get("without_category_words", 0)
    result["query_encoder"] = {
        "config": QueryEncoderConfig().model_dump(exclude={"seed"}),
        "training_queries": len(pairs),
        "title_queries": int(pairs.is_title.sum()),
        "per_seed": {str(s): train_stats[s] for s in seeds},
    }
    result["encoders"] = encoder_block(
        result, stages, ours[seeds[0]], adapters[seeds[0]], served, texts, split, model_repo
    )
    if args.export:
        result["exported"] = export(result, split, train_stats, adapters, model_repo)
    result["seconds"] = time.perf_counter() - t_start
    write_result(args.out, result)
    (Path(__file__).parent / "results" / f"{args.out}_ranks.json").write_text(
        json.dumps({k: {m: [r.tolist() for r in rs] for m, rs in v.items()} for k, v in all_ranks.items()})
    )
    return result


def encoder_block(
    result, stages, fp32: TextEncoder, adapter: Path, served, texts, split, model_repo: Path
) -> list[dict]:
    """fp32 vs int8 query (and item) encoders: one-query encode latency and the chosen row's NDCG@10
    with seed 0's weights re-tuned on validation for each precision."""
    best = result["paired_vs_best_baseline"]["model"]
    spec = next(r for r in ROWS if best.removesuffix("+session") == r[0])
    personalized = best.endswith("+session")
    int8 = TextEncoder(adapter_dir=adapter, precision="int8")
    item_encoder = ItemEncoder.load(latest_version_dir(model_repo, ITEM_ENCODER))
    text_int8 = TextEncoder(max_seq_length=item_encoder.max_text_len, precision="int8").encode(texts)
    item_int8 = item_encoder.combine(text_int8, split.item_ids)
    queries = stages["category", "test"].cases.queries[:ENCODE_SAMPLES]
    out = []
    for name, enc, items in (
        ("query fp32, items fp32", fp32, served.item_vectors.numpy()),
        ("query int8, items fp32", int8, served.item_vectors.numpy()),
        ("query int8, items int8", int8, item_int8),
    ):
        scores = {}
        for key in (("category", "valid"), ("category", "test")):
            st = stages[key]
            dense = dict(st.dense, chosen=dense_scores(encode_cases(enc.encode, st.cases), items))
            scores[key] = Stage(st.cases, st.bm25, st.popularity, st.session, dense)
        sc = _scorer("chosen", spec[3], spec[4])
        w, _ = _tune(sc, scores["category", "valid"], spec[3], personalized)
        p50, p99 = _encode_timing(enc, queries)
        out.append(
            {
                "name": name,
                "precision": "int8" if "query int8" in name else "fp32",
                "configuration": best,
                "query_encode_ms_p50": p50,
                "query_encode_ms_p99": p99,
                "NDCG@10": ndcg10(sc(scores["category", "test"], w), scores["category", "test"].cases),
            }
        )
    print_table(
        "query encoders (one query per call)", out, ["name", "query_encode_ms_p50", "query_encode_ms_p99", "NDCG@10"]
    )
    return out


def export(result: dict, split: Split, train_stats: dict, adapters: dict, model_repo: Path) -> dict:
    """The seed best on validation becomes the next text_encoder version, with the fusion weights
    its chosen configuration was tuned to."""
    from recstream.models.export import export_query_encoder
    from recstream.models.training import CheckpointMeta

    # the seed whose encoder scored best on its own validation objective (the one it was
    # early-stopped on: dense-only NDCG@10 on the category and known-item validation cases)
    seed = max(train_stats, key=lambda s: train_stats[s]["valid_ndcg10"])
    chosen = next(r for r in result["rows"] if r["model"] == result["paired_vs_best_baseline"]["model"])
    weights = chosen["weights"]
    if isinstance(weights, list):  # one tuned set per seed, in the order the seeds ran
        weights = weights[list(train_stats).index(seed)]
    meta = CheckpointMeta(
        kind="query_encoder",
        config=QueryEncoderConfig(seed=seed).model_dump(),
        data_hash=split_fingerprint(split),
        metrics={k: float(v) for k, v in train_stats[seed].items()},
        extra={
            "item_encoder_version": latest_version_dir(model_repo, ITEM_ENCODER).name,
            "search_configuration": chosen["model"],
            "search_weights": weights,
        },
    )
    vdir = export_query_encoder(adapters[seed], meta, model_repo, SearchWeights.from_bench(weights))
    print(f"exported the seed-{seed} query encoder as {vdir.relative_to(REPO_ROOT)}", flush=True)
    return {"seed": seed, "version": int(vdir.name), "weights": weights}


def _fmt(row: dict[str, Any]) -> dict[str, Any]:
    out = dict(row)
    out["ci95"] = f"[{row['ci95'][0]:.4f}, {row['ci95'][1]:.4f}]"
    out["weights"] = json.dumps(row["weights"]) if isinstance(row["weights"], dict) else "per seed"
    return out


if __name__ == "__main__":
    main()

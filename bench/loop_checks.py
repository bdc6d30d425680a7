"""bench_loop's checks beside the loop: off-policy estimates against the simulator's exact value,
through the production log path too, rounds until a promotion, and click-to-live through a real
tritonserver."""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from bench.loop_sim import Arm, LoopConfig, SimFeatures, score_requests
from bench.simulator import Request, Simulator
from recstream.continual import (
    Example,
    ReplayBuffer,
    decide,
    fine_tune,
)
from recstream.explore import Greedy, LiftThompson, PlackettLuce
from recstream.models.ranker import RankerConfig, RankerNet, new_ranker
from recstream.ope.estimators import LoggedData, doubly_robust, ips, snips

log = logging.getLogger("bench.loop")


def ope_check(sim: Simulator, cfg: LoopConfig, arm: Arm, logger: str) -> dict[str, Any]:
    """Log a stochastic policy over the explore arm's final model on fresh requests; estimate the
    CTR of that model's greedy policy (IPS / SNIPS / DR); compare to the simulated truth.

    logger "pl": Plackett-Luce (T=0.5, first 2 slots greedy) over the model's scores; propensities
    exact at the logged slot's first sampled position, Monte-Carlo marginals (ope_mc_samples
    Gumbel draws) elsewhere - the protocol of the earlier runs.
    logger "ts": the arm's own Thompson layer with its final posterior held fixed; propensities are
    Monte-Carlo marginals from ope_mc_samples posterior draws. Both are floored at 1/ope_mc_samples.
    """
    rng = np.random.default_rng(cfg.seed + 99)
    pol: PlackettLuce | LiftThompson = PlackettLuce(0.5, greedy_slots=2) if logger == "pl" else arm.policy
    target = Greedy()
    rows: dict[str, list[float]] = {k: [] for k in ("req", "click", "p", "pt", "q")}
    dm, truth = [], 0.0
    for r_i in tqdm(range(cfg.ope_requests), desc=f"OPE logs ({logger})", leave=False):
        r = arm.popularity.view(sim.request(int(rng.integers(sim.n_users)), rng))
        s = score_requests(arm.live, [r])[0]
        ids = [str(int(i)) for i in r.candidates]
        row_of = {iid: j for j, iid in enumerate(ids)}
        if isinstance(pol, LiftThompson):
            groups = arm.groups(sim, r)
            m_log = pol.marginals(s, cfg.k, rng, n_samples=cfg.ope_mc_samples, item_ids=ids, groups=groups)
            shown = pol.rank(ids, s, cfg.k, rng, groups=groups)
        else:
            m_log = pol.marginals(s, cfg.k, rng, n_samples=cfg.ope_mc_samples)
            shown = pol.rank(ids, s, cfg.k, rng)
        m_t = target.marginals(s, cfg.k)
        rel = sim.relevance(r.user, r.candidates)
        exam = sim.exam(np.arange(cfg.k))
        truth += float((m_t * rel[:, None] * exam[None, :]).sum())
        q = (1 / (1 + np.exp(-s)))[:, None] * exam[None, :]  # the model's own click estimate
        dm.append(float((m_t * q).sum()))
        for x in shown:
            j = row_of[x.item_id]
            c = float(rng.random() < rel[j] * exam[x.position])
            rows["req"].append(r_i)
            rows["click"].append(c)
            rows["p"].append(max(m_log[j, x.position], 1.0 / cfg.ope_mc_samples))
            rows["pt"].append(m_t[j, x.position])
            rows["q"].append(q[j, x.position])
    data = LoggedData(
        request=np.array(rows["req"]),
        click=np.array(rows["click"]),
        propensity=np.array(rows["p"]),
        target_propensity=np.array(rows["pt"]),
        slots_per_request=cfg.k,
        q_hat=np.array(rows["q"]),
        dm=np.array(dm),
    )
    online = truth / (cfg.ope_requests * cfg.k)
    ests = {e.method: e for e in (ips(data), snips(data), doubly_robust(data))}
    return {
        "simulated_online_value": online,
        "logging_policy": pol.name,
        "logging_ctr": float(data.click.mean()),
        "estimates": {
            k: {"value": e.value, "ci": [e.low, e.high], "covers": e.contains(online)} for k, e in ests.items()
        },
        "primary": "snips",
    }


def production_ope_check(
    sim: Simulator, cfg: LoopConfig, arm: Arm, candidates: dict[str, RankerNet] | None = None, spec: str = "pl:1:1"
) -> dict[str, Any]:
    """The operator's path (`recstream.ops.cli ope greedy`) against the simulator's truth: logs written
    as the worker and the feedback joiner write them - a RankingLog per answer (the model's top
    EXPLORE_POOL_FACTOR * k candidates in score order, the greedy answer, the ranker's inputs) and a
    TrainingExample per shown slot (its logged propensity, conditional for Plackett-Luce, and the
    simulated click) - are evaluated by recstream.ope.logs for the greedy target, on their own fresh
    requests. Each of `candidates` (other model versions) is evaluated from the same logs as
    `ope --model-version` does: greedy over its order of each logged pool, and the paired difference
    with the live model's order; its truth is that policy's exact expected CTR on the same pools."""
    from recstream.contracts.events import PoolCandidate, RankingLog, TrainingExample
    from recstream.explore import greedy_order, make_policy
    from recstream.ope.logs import evaluate_logs
    from recstream.ope.rescoring import PoolRescorer
    from streams.recommend_ranking import EXPLORE_POOL_FACTOR

    candidates = candidates or {}
    candidate_truth = dict.fromkeys(candidates, 0.0)

    rng = np.random.default_rng(cfg.seed + 97)
    policy = make_policy(spec)
    logs: list[RankingLog] = []
    examples: list[TrainingExample] = []
    truth = 0.0
    exam = sim.exam(np.arange(cfg.k))
    for r_i in tqdm(range(cfg.ope_requests), desc=f"OPE production logs ({spec})", leave=False):
        r = arm.popularity.view(sim.request(int(rng.integers(sim.n_users)), rng))
        s = score_requests(arm.live, [r])[0]
        rel = sim.relevance(r.user, r.candidates)
        top = greedy_order(s)[: EXPLORE_POOL_FACTOR * cfg.k]
        truth += float((rel[top[: cfg.k]] * exam).sum())
        pooled = Request(r.user, r.candidates[top], r.context, r.cand_vectors[top], r.cand_features[top])
        for name, net in candidates.items():
            mine = greedy_order(score_requests(net, [pooled])[0])[: cfg.k]
            candidate_truth[name] += float((rel[top[mine]] * exam).sum())
        pool = [
            PoolCandidate(
                item_id=str(int(r.candidates[i])), score=float(s[i]), features=np.round(r.cand_features[i], 6).tolist()
            )
            for i in top
        ]
        rl = RankingLog(
            request_id=f"q{r_i}",
            user_id=f"u{r.user}",
            model_version=str(arm.version),
            policy_spec=spec,
            k=cfg.k,
            pool=pool,
            greedy=pool[: cfg.k],
            context=np.round(r.context.astype(np.float64), 6).tolist(),
        )
        logs.append(rl)
        row_of = {c.item_id: int(i) for c, i in zip(pool, top, strict=True)}
        for x in policy.rank([c.item_id for c in pool], -np.arange(len(pool), dtype=np.float64), cfg.k, rng):
            clicked = bool(rng.random() < rel[row_of[x.item_id]] * exam[x.position])
            examples.append(rl.outcome(x.item_id, x.position, x.propensity, clicked))
    report = evaluate_logs(logs, examples, "greedy")
    online = truth / (cfg.ope_requests * cfg.k)
    vectors = {str(i): v for i, v in enumerate(sim.item_vectors)}
    models: dict[str, Any] = {}
    for name, net in candidates.items():
        net.eval()
        rep = evaluate_logs(logs, examples, "greedy", rescore=PoolRescorer(net, vectors), candidate_model=name)
        value = candidate_truth[name] / (cfg.ope_requests * cfg.k)
        models[name] = {
            "simulated_online_value": value,
            "simulated_difference": value - online,
            "requests": rep.requests,
            "effective_sample_size": rep.effective_sample_size,
            "estimates": {
                e.method: {"value": e.ctr, "ci": [e.low, e.high], "covers": e.low <= value <= e.high}
                for e in rep.estimates
            },
            "versus_live": {
                e.method: {"value": e.ctr, "ci": [e.low, e.high], "covers": e.low <= value - online <= e.high}
                for e in rep.versus_logging_model
            },
        }
    return {
        "simulated_online_value": online,
        "logging_policy": spec,
        "logging_ctr": report.logged_ctr,
        "requests": report.requests,
        "effective_sample_size": report.effective_sample_size,
        "target_mass_unsupported": report.target_mass_unsupported,
        "estimates": {
            e.method: {"value": e.ctr, "ci": [e.low, e.high], "covers": e.low <= online <= e.high}
            for e in report.estimates
        },
        "candidate_models": models,
    }


def rounds_until_promoted(
    cfg: LoopConfig,
    base: RankerNet,
    next_burst: Callable[[], list[Example]],
    features: SimFeatures,
    max_bursts: int,
) -> dict[str, Any]:
    """The trainer's rounds on successive bursts until the gate accepts a candidate (decision None when
    it never does). A refused burst's examples stay in the buffer for the next round, as in the
    trainer; t0 and timings belong to the accepted round, measured from its own burst's arrival."""
    buf: ReplayBuffer[Example] = ReplayBuffer(cfg.replay)
    refused: list[dict[str, Any]] = []
    for n_burst in range(1, max_bursts + 1):
        burst = next_burst()
        t0 = time.monotonic()  # the burst of clicks has just arrived
        buf.extend(burst)
        # the first round exactly as in earlier runs; later ones draw their own batches
        learner = cfg.learner if n_burst == 1 else cfg.learner.model_copy(update={"seed": cfg.seed + n_burst})
        cand, _ = fine_tune(base, [], features, learner, sample=lambda n: buf.sample(n, exclude_latest=cfg.holdout))
        timings = {"train_s": time.monotonic() - t0}
        d = decide(cand, base, buf.latest(cfg.holdout), features, cfg.gate)
        timings["gate_s"] = time.monotonic() - t0 - timings["train_s"]
        if d.accepted:
            return {
                "candidate": cand,
                "decision": d,
                "t0": t0,
                "timings": timings,
                "burst_examples": len(burst),
                "buffer_examples": len(buf),
                "refused_rounds": refused,
            }
        refused.append({"burst_examples": len(burst), "round_s": time.monotonic() - t0, "reason": d.reason})
    return {"decision": None, "refused_rounds": refused}


def click_to_live(
    sim: Simulator,
    cfg: LoopConfig,
    base: RankerNet,
    next_burst: Callable[[], list[Example]],
    features: SimFeatures,
    max_bursts: int = 5,
) -> dict[str, Any]:
    """Seconds from the end of a click burst to the new version answering in a real tritonserver.

    As the trainer does, a burst whose candidate the gate refuses is kept in the buffer and the next
    burst brings a new round; the time is that of the round that went live (measured from its own
    burst), and the refused rounds are reported with it."""
    import tritonclient.http as httpclient

    from infra.triton_server import TritonServer
    from recstream.continual.registry import ModelRegistry, TritonModelControl
    from recstream.contracts.models import RANKER
    from recstream.models.export import export_ranker
    from recstream.models.ranker import Ranker

    tmp = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    repo = tmp / "model_repo"
    meta = new_ranker(RankerConfig(seed=cfg.seed)).meta
    export_ranker(Ranker(copy.deepcopy(base), meta.model_copy(deep=True)), repo, version=1)
    reg = ModelRegistry(repo)
    reg.init_live()
    server = TritonServer(repo, tmp / "run", http_port=0, grpc_port=0, metrics_port=0, models=[RANKER])
    t_start = time.monotonic()
    server.start(timeout_s=300)
    start_s = time.monotonic() - t_start
    try:
        client = httpclient.InferenceServerClient(url=server.url, network_timeout=60)
        req = sim.request(0, np.random.default_rng(0))

        def served_version() -> str:
            arrays = {
                "CONTEXT": req.context[None],
                "CANDIDATES": req.cand_vectors[None].astype(np.float32),
                "CAND_FEATURES": req.cand_features[None].astype(np.float32),
            }
            inputs = []
            for k, a in arrays.items():
                inp = httpclient.InferInput(k, list(a.shape), "FP32")
                inp.set_data_from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                inputs.append(inp)
            return str(client.infer(RANKER, inputs).get_response()["model_version"])

        assert served_version() == "1"
        rounds = rounds_until_promoted(cfg, base, next_burst, features, max_bursts)
        if rounds["decision"] is None:
            last = rounds["refused_rounds"][-1]["reason"]
            reason = f"gate refused all {max_bursts} rounds: {last}"
            return {
                "click_to_live_s": None,
                "reason": reason,
                "refused_rounds": rounds["refused_rounds"],
                "server_start_s": start_s,
            }
        cand, d, t0, timings = rounds["candidate"], rounds["decision"], rounds["t0"], rounds["timings"]
        v = reg.publish(Ranker(cand, meta.model_copy(deep=True)), {"gate_auc": d.candidate["auc"]})
        reg.promote(v, d.reason)
        control = TritonModelControl(server.url)
        t_load = time.monotonic()
        control.reload()
        while served_version() != str(v):
            time.sleep(0.02)
        total = time.monotonic() - t0
        timings["load_s"] = time.monotonic() - t_load
        control.close()
        client.close()
        return {
            "click_to_live_s": total,
            "version": v,
            "server_start_s": start_s,
            "burst_examples": rounds["burst_examples"],
            "buffer_examples": rounds["buffer_examples"],
            "refused_rounds": rounds["refused_rounds"],
            **timings,
            "via": "real tritonserver (explicit model control), in-process learner; no Kafka",
        }
    finally:
        server.stop(timeout_s=5)
        shutil.rmtree(tmp, ignore_errors=True)

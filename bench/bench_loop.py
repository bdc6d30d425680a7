"""Closed-loop bench: frozen vs continual vs continual+exploration in the MovieLens simulator with drift.

`make bench-loop` (= `python -m bench.bench_loop`) writes bench/results/loop.{md,png,json}.

The default run is a confirmatory test, pre-registered: this text and the defaults below were
committed before it ran, and its report is kept whatever it says.
- Question: the issue's "with exploration, the long-run click-through rate is higher than pure
  exploitation". Seeds 0-9 were spent exploring it in three scenarios (bench_loop_random,
  bench_loop_retrieval, bench_loop_sessions and their replications); their pooled figures were
  chosen after the fact, so they suggest but cannot confirm.
- Scenario: the one that matches the stream worker (bench_loop_sessions): each request's 60
  candidates are the nearest to the user's context, none random, and contexts follow the user's
  clicks in each arm's answers. Arms, policy settings, learner, gate and late window (rounds 24-35,
  drift at 12) unchanged. Seeds 10-29: twenty fresh ones. Run: `make bench-loop` (jobs only change
  the wall time; each seed's figures do not depend on them).
- Primary test, the only one that decides: late-window CTR of explore (the continual system plus
  the Thompson layer) minus continual (the same learner, greedy: pure exploitation of the ranker),
  paired over seeds. The must-show holds if the two-sided 95 % Student-t interval lies above 0.
  Power: seeds 0-9 of this scenario gave +0.0052 with a per-seed SD of 0.0051; at the replication's
  +0.0035 twenty seeds give about 80 %.
- Reported, not deciding: explore - exploit_lift (the same layer ranked by its posterior mean: does
  the exploring pay, or the learning between LoRA rounds), the other differences, NDCG@10, the OPE
  checks and click-to-live (on seed 10).

Protocol (one seed, common random users across arms):
1. Warm-up: a uniformly random logging policy shows lists to simulated users before the drift; a
   RankerNet is trained on those logs (full training, IPW) -> v1, the starting point of every arm.
2. Rounds: each round `users_per_round` requests; each arm scores the candidates with its live
   model, its policy orders them, the simulator clicks. After `drift_round` the users' tastes rotate.
   - frozen: v1 forever, greedy;
   - continual: greedy; after every round a LoRA round on the replay buffer, gated on the newest
     held-back window, promotes a not-worse candidate;
   - explore: as continual, plus a Thompson-sampling layer of per-item click lifts over the ranker's
     scores that learns after every request (Monte-Carlo propensities are logged);
   - exploit_lift: as explore, but the layer ranks by the posterior mean lift (the ablation that
     tells exploring apart from learning per-item corrections between LoRA rounds).
   CTR = clicks per shown slot. NDCG@10 = the live model's greedy top-10 graded by true relevance
   (model quality, independent of the exploration a list carries).
3. OPE check: on fresh requests, log the explore arm's PL policy and estimate the CTR of its greedy
   policy (IPS / SNIPS / DR with CIs); the "simulated online value" is that greedy policy's exact
   expected CTR on the same requests under the simulator.
4. click_to_live_s: a burst of clicks -> LoRA round -> gate -> atomic version write -> Triton
   load_model -> the new version answers unversioned requests, through a real tritonserver on a
   temporary copy of the repository.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
import typer
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from bench.common import RESULTS_DIR, peak_rss_mb, write_result
from bench.loop_report import markdown, plot, verdict
from bench.loop_stats import add_holm, phase_means, t_interval
from bench.simulator import LivePopularity, LiveSessions, Request, SimConfig, Simulator, load_simulator
from recstream.continual import (
    Example,
    GateConfig,
    LearnerConfig,
    ReplayBuffer,
    ReplayConfig,
    decide,
    fine_tune,
)
from recstream.explore import Greedy, LiftThompson, PlackettLuce, RankingPolicy
from recstream.models.ranker import ITEM_DIM, RankerConfig, RankerNet, new_ranker
from recstream.ope.estimators import LoggedData, doubly_robust, ips, snips

log = logging.getLogger("bench.loop")


class LoopConfig(BaseModel):
    seed: int | None = Field(
        None, description="Seed of the OPE check and click-to-live, run first (default: the first of seeds)"
    )
    seeds: list[int] = Field(
        default_factory=lambda: list(range(10, 30)),
        description="Independent loop repetitions (10-29: the confirmatory run; 0-9 were used to explore)",
    )
    jobs: int = Field(2, ge=1, description="Seeds run at once, one process each (one torch thread per process)")
    rounds: int = 36
    drift_round: int = 12
    users_per_round: int = 200
    k: int = 10
    warmup_requests: int = 3000
    pretrain_steps: int = 600
    holdout: int = Field(1000, description="Newest impressions held back for the gate each round")
    explore_prior: float = Field(5.0, description="Thompson layer: prior weight of an item's lift (expected clicks)")
    explore_half_life: float = Field(20000.0, description="Thompson layer: evidence half-life in impressions")
    explore_group_prior: float = Field(20.0, description="Thompson layer: prior weight of a category's lift")
    explore_groups: str = Field("category", description="Thompson layer pooling key: category | segment_category")
    explore_mc_samples: int = Field(256, description="Posterior draws behind each logged propensity")
    ope_requests: int = 3000
    model_ope_logging: str = Field(
        "pl:3", description="Logging policy whose logs judge other model versions (full support: no greedy head)"
    )
    ope_mc_samples: int = 2000
    learner: LearnerConfig = Field(default_factory=lambda: LearnerConfig(mode="lora", steps=100, lr=3e-3))
    replay: ReplayConfig = Field(
        default_factory=lambda: ReplayConfig(recent_capacity=6000, reservoir_capacity=20000, recent_fraction=0.7)
    )
    gate: GateConfig = Field(default_factory=lambda: GateConfig(tolerance=0.01))
    live_popularity: bool = Field(
        True, description="Each arm's clicks feed its popularity feature, as the stream's item-popularity table does"
    )
    triton: bool = True
    random_candidates: int = Field(
        0, description="Uniformly random candidates per request of 60 (0: retrieval only, as the stream worker)"
    )
    live_sessions: bool = Field(
        True, description="Each arm's users' contexts follow what they clicked in its answers (LiveSessions)"
    )
    checks: bool = Field(True, description="Run the OPE checks and click-to-live after the loop")
    name: str = Field("loop", description="Result file stem: bench/results/NAME.{json,md,png}")
    scenario: str = Field("", description="One line on what this run varies, for the report")


class SimFeatures:
    """FeatureSource over the simulator: user context + item vectors + features logged at serving."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def build(self, examples: list[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = np.fromiter((int(e.user) for e in examples), dtype=np.int64, count=len(examples))
        i = np.fromiter((int(e.item) for e in examples), dtype=np.int64, count=len(examples))
        ctx = np.concatenate([self.sim.user_context[u], np.zeros((len(u), ITEM_DIM), np.float32)], axis=1)
        for n, e in enumerate(examples):  # logged at serving (live sessions): the context as served
            if e.context is not None:
                ctx[n] = e.context
        feats = np.stack([e.cand_features for e in examples]).astype(np.float32)
        return ctx, self.sim.item_vectors[i], feats


@torch.inference_mode()
def score_requests(net: torch.nn.Module, reqs: list[Request]) -> np.ndarray:
    """Logits [B, n] for a batch of requests with equal candidate counts."""
    net.eval()
    ctx = torch.from_numpy(np.stack([r.context for r in reqs]))
    cand = torch.from_numpy(np.stack([r.cand_vectors for r in reqs]))
    feats = torch.from_numpy(np.stack([r.cand_features for r in reqs]))
    return net(ctx, cand, feats).numpy().astype(np.float64)


def log_examples(
    req: Request, shown: list, rows: np.ndarray, clicks: np.ndarray, version: str, with_context: bool = False
) -> list[Example]:
    """with_context: keep the served context with each example (it is not the user's fixed one)."""
    out = []
    for s, j, c in zip(shown, rows, clicks, strict=True):  # rows: the shown items' candidate rows
        out.append(
            Example(
                user=str(req.user),
                item=str(int(req.candidates[j])),
                position=s.position,
                propensity=s.propensity,
                label=float(c),
                model_version=version,
                cand_features=req.cand_features[j],
                context=req.context if with_context else None,
            )
        )
    return out


def user_segment(sim: Simulator, user: int) -> str:
    """A coarse user segment: the most frequent category of the user's recent history (the context
    window the ranker sees), as a stream worker could read it from the session."""
    cats = sim.categories[sim.history[user][-sim.cfg.context_len :]]
    values, counts = np.unique(cats, return_counts=True)
    return str(values[int(np.argmax(counts))])


class Arm:
    """One system under test: a live model, a policy, and (optionally) a continual learner."""

    def __init__(
        self,
        name: str,
        net: RankerNet,
        policy: RankingPolicy,
        learn: bool,
        cfg: LoopConfig,
        popularity: LivePopularity,
    ) -> None:
        self.name = name
        self.popularity = copy.deepcopy(popularity)  # each system's clicks make its own items popular
        self.sessions = LiveSessions(cfg.live_sessions)  # and move its own users' sessions
        self.live = copy.deepcopy(net)
        self.policy = policy
        self.learn = learn
        self.cfg = cfg
        self.version = 1
        self.buffer: ReplayBuffer[Example] = ReplayBuffer(cfg.replay.model_copy(update={"seed": cfg.seed}))
        self.rng = np.random.default_rng(cfg.seed + zlib.crc32(name.encode()) % 1000)
        self.history: list[dict[str, float]] = []
        self.promotions = 0
        self.refusals = 0

    def groups(self, sim: Simulator, r: Request) -> list[str]:
        """The exploration layer's pooling key per candidate: its category, optionally per user segment."""
        cats = sim.categories[r.candidates]
        mode = self.cfg.explore_groups
        if mode == "category":
            return cats.tolist()
        if mode == "category_age":  # new releases (no interaction history yet) pooled apart per category
            age = np.where(self.popularity.counts[r.candidates] > 0, "old", "new")
            return [f"{c}|{a}" for c, a in zip(cats, age, strict=True)]
        seg = user_segment(sim, r.user)
        return [f"{seg}|{c}" for c in cats]

    def requests(self, sim: Simulator, users: np.ndarray, cand_rng: np.random.Generator) -> list[Request]:
        """This round's requests as this system's users' sessions stand."""
        return [sim.request(int(u), cand_rng, self.sessions.items(int(u))) for u in users]

    def serve(self, sim: Simulator, reqs: list[Request], click_rng: np.random.Generator) -> dict[str, float]:
        # Popularity features as of the start of the round (a round's clicks count from the next one).
        reqs = [self.popularity.view(r) for r in reqs]
        scores = score_requests(self.live, reqs)
        clicks_total, slots, ndcg, hot_slots = 0.0, 0, [], 0.0
        new: list[Example] = []
        observe = getattr(self.policy, "observe", None)  # policies that learn online from each click
        for r, s in zip(reqs, scores, strict=True):
            ids = [str(int(i)) for i in r.candidates]
            row_of = {iid: j for j, iid in enumerate(ids)}
            groups = self.groups(sim, r)
            if observe is not None:
                shown = self.policy.rank(ids, s, self.cfg.k, self.rng, groups=groups)  # type: ignore[call-arg]
            else:
                shown = self.policy.rank(ids, s, self.cfg.k, self.rng)
            rows = np.array([row_of[x.item_id] for x in shown])
            p = sim.click_probability(r.user, r.candidates[rows], np.array([x.position for x in shown]))
            c = (click_rng.random(len(p)) < p).astype(np.float64)
            self.popularity.add(r.candidates[rows], c)
            self.sessions.add(r.user, r.candidates[rows], c)
            hot_slots += float(sim.hot[r.candidates[rows]].sum()) if sim.drifted else 0.0
            if observe is not None:
                for x, j, cl in zip(shown, rows, c, strict=True):
                    observe(x.item_id, x.position, float(s[j]), float(cl), groups[j])
            clicks_total += c.sum()
            slots += len(c)
            ndcg.append(sim.ndcg_at_k(r.user, r.candidates, np.argsort(-s, kind="stable"), self.cfg.k))
            new += log_examples(r, shown, rows, c, f"v{self.version}", with_context=self.sessions.live)
        self.buffer.extend(new)
        return {"ctr": clicks_total / slots, "ndcg10": float(np.mean(ndcg)), "hot_share": hot_slots / slots}

    def update(self, features: SimFeatures) -> dict[str, Any]:
        if not self.learn:
            return {}
        window = self.buffer.latest(self.cfg.holdout)
        cand, stats = fine_tune(
            self.live,
            [],
            features,
            self.cfg.learner.model_copy(update={"seed": self.cfg.seed + self.version}),
            sample=lambda n: self.buffer.sample(n, exclude_latest=self.cfg.holdout),
        )
        d = decide(cand, self.live, window, features, self.cfg.gate)
        if d.accepted:
            self.live = cand
            self.version += 1
            self.promotions += 1
        else:
            self.refusals += 1
        return {"accepted": d.accepted, "reason": d.reason, **stats}


def explore_policy(cfg: LoopConfig, sample: bool = True) -> LiftThompson:
    """The exploring arm's layer over the ranked list: Thompson sampling of per-item click lifts,
    pooled per category, learning from every click (exact item/slot of each click, MC propensities).

    sample=False is the same layer ranking by the posterior *mean* lift: it learns from the same
    clicks but never explores on purpose - the ablation that separates "exploration" from "a
    per-item correction that learns between LoRA rounds"."""
    return LiftThompson(
        prior=cfg.explore_prior,
        half_life=cfg.explore_half_life,
        exam_eta=cfg.learner.exam_eta,
        mc_samples=cfg.explore_mc_samples,
        group_prior=cfg.explore_group_prior,
        sample=sample,
    )


def pretrain(sim: Simulator, cfg: LoopConfig, features: SimFeatures) -> tuple[RankerNet, list[Example], LivePopularity]:
    """v1: trained on logs of a uniformly random policy before the drift; the popularity every arm
    starts from includes the warm-up's clicks."""
    rng = np.random.default_rng(cfg.seed + 7)
    logs: list[Example] = []
    popularity = LivePopularity(sim)
    for _ in tqdm(range(cfg.warmup_requests), desc="warm-up logs", leave=False):
        r = popularity.view(sim.request(int(rng.integers(sim.n_users)), rng))
        rows = rng.permutation(len(r.candidates))[: cfg.k]
        p = sim.click_probability(r.user, r.candidates[rows], np.arange(len(rows)))
        c = (rng.random(len(p)) < p).astype(np.float64)
        popularity.add(r.candidates[rows], c)
        prop = 1.0 / len(r.candidates)  # uniform permutation: P(item at slot) = 1/n exactly
        for pos, (j, cl) in enumerate(zip(rows, c, strict=True)):
            logs.append(
                Example(str(r.user), str(int(r.candidates[j])), pos, prop, float(cl), "v1", 0, r.cand_features[j])
            )
    base = new_ranker(RankerConfig(seed=cfg.seed)).net
    # exam_eta=0: under uniform random logging the slot is independent of the item, so position bias
    # does not distort the relevance order and correcting it would only add variance.
    pre = LearnerConfig(mode="full", steps=cfg.pretrain_steps, lr=2e-3, exam_eta=0.0, seed=cfg.seed)
    net, stats = fine_tune(base, logs, features, pre)
    log.info("pretrained v1: %s", stats)
    return net, logs, popularity


def run_loop(
    sim: Simulator, cfg: LoopConfig, base: RankerNet, features: SimFeatures, popularity: LivePopularity
) -> dict[str, Any]:
    arms = [
        Arm("frozen", base, Greedy(), learn=False, cfg=cfg, popularity=popularity),
        Arm("continual", base, Greedy(), learn=True, cfg=cfg, popularity=popularity),
        Arm("explore", base, explore_policy(cfg), learn=True, cfg=cfg, popularity=popularity),
        Arm("exploit_lift", base, explore_policy(cfg, sample=False), learn=True, cfg=cfg, popularity=popularity),
    ]
    user_rng = np.random.default_rng(cfg.seed + 11)
    curves: dict[str, list[dict[str, float]]] = {a.name: [] for a in arms}
    for t in tqdm(range(cfg.rounds), desc=f"rounds (seed {cfg.seed})"):
        if t == cfg.drift_round:
            sim.drift()
        users = user_rng.integers(0, sim.n_users, cfg.users_per_round)
        for a in arms:
            # Common random numbers: the same users, candidate draws and click draws for every arm (the
            # same requests, unless live sessions have taken its users elsewhere).
            reqs = a.requests(sim, users, np.random.default_rng(cfg.seed * 1000 + t))
            click_rng = np.random.default_rng(cfg.seed * 7919 + t)
            m = a.serve(sim, reqs, click_rng)
            u = a.update(features)
            curves[a.name].append({"round": t, **m, "version": a.version, "accepted": float(u.get("accepted", 0))})
    summary = {a.name: {"promotions": a.promotions, "refusals": a.refusals, "final_version": a.version} for a in arms}
    return {"curves": curves, "arms": summary, "live": {a.name: a for a in arms}}


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


ARMS = ("frozen", "continual", "explore", "exploit_lift")


def run_seed(cfg: LoopConfig) -> dict[str, Any]:
    """One independent repetition: its own simulator (tastes, drift, hits), warm-up logs, v1 and loop."""
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    sim = load_simulator(
        SimConfig(seed=cfg.seed, live_popularity=cfg.live_popularity, n_random_candidates=cfg.random_candidates)
    )
    features = SimFeatures(sim)
    base, _, popularity = pretrain(sim, cfg, features)
    out = run_loop(sim, cfg, base, features, popularity)
    out.update(sim=sim, features=features, base=base, wall_s=time.monotonic() - t0)
    return out


def run_seed_summary(cfg: LoopConfig) -> dict[str, Any]:
    """run_seed in a worker process: only what the report needs crosses back (curves, arm counters)."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out = run_seed(cfg)
    return {"curves": out["curves"], "arms": out["arms"], "wall_s": out["wall_s"]}


def run_seeds(cfg: LoopConfig) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every seed's loop (in cfg.seeds order) and the first seed's full output, which the checks need.

    This process runs the first seed, then takes seeds from the back of the queue that `jobs - 1`
    spawned processes work through from the front. Each seed owns its random streams and runs
    single-threaded, so the figures do not depend on `jobs`."""
    first_cfg, rest = cfg.model_copy(update={"seed": cfg.seeds[0]}), cfg.seeds[1:]
    if cfg.jobs == 1 or not rest:
        outs = [run_seed(first_cfg), *(run_seed(cfg.model_copy(update={"seed": sd})) for sd in rest)]
        return outs, outs[0]
    ctx = multiprocessing.get_context("spawn")  # no forked torch / tqdm state in the workers
    with ProcessPoolExecutor(max_workers=min(cfg.jobs - 1, len(rest)), mp_context=ctx) as pool:
        futures = {sd: pool.submit(run_seed_summary, cfg.model_copy(update={"seed": sd})) for sd in rest}
        first = run_seed(first_cfg)
        here = {}
        for sd in reversed(rest):
            if futures[sd].cancel():  # not started by a worker yet: run it here
                out = run_seed(cfg.model_copy(update={"seed": sd}))
                here[sd] = {"curves": out["curves"], "arms": out["arms"], "wall_s": out["wall_s"]}
        outs = [first, *(here[sd] if sd in here else futures[sd].result() for sd in rest)]
    return outs, first


def run_checks(first: dict[str, Any], cfg: LoopConfig) -> dict[str, Any]:
    """OPE checks and click-to-live on the first seed's simulator (drifted) and explore arm."""
    sim, features, base = first["sim"], first["features"], first["base"]
    ope = ope_check(sim, cfg, first["live"]["explore"], "pl")
    ope_ts = ope_check(sim, cfg, first["live"]["explore"], "ts")
    # Other model versions judged from the explore arm's logs: the frozen arm's v1 (stale since the
    # drift) and the continual arm's live model.
    others = {"frozen_v1": first["live"]["frozen"].live, "continual_live": first["live"]["continual"].live}
    ope_production = production_ope_check(sim, cfg, first["live"]["explore"])
    ope_models = production_ope_check(sim, cfg, first["live"]["explore"], others, spec=cfg.model_ope_logging)
    burst_user_rng = np.random.default_rng(cfg.seed + 5)
    # The burst only carries the measurement; it is logged by the same Plackett-Luce policy as in
    # earlier runs (a fresh Thompson layer knows nothing yet and would make a noisier burst).
    burst_arm = Arm(
        "burst",
        base,
        PlackettLuce(0.5, greedy_slots=2),
        learn=False,
        cfg=cfg,
        popularity=first["live"]["explore"].popularity,
    )
    click_rng = np.random.default_rng(3)

    def next_burst() -> list[Example]:
        """300 more requests served and clicked: the examples they added."""
        seen = burst_arm.buffer.seen
        reqs = [sim.request(int(u), burst_user_rng) for u in burst_user_rng.integers(0, sim.n_users, 300)]
        burst_arm.serve(sim, reqs, click_rng)
        return burst_arm.buffer.latest(burst_arm.buffer.seen - seen)

    c2l: dict[str, Any]
    if cfg.triton:
        try:
            c2l = click_to_live(sim, cfg, base, next_burst, features)
        except Exception as exc:  # the bench still reports the simulation when Triton is unavailable
            log.exception("click-to-live measurement failed")
            c2l = {"click_to_live_s": None, "reason": f"tritonserver unavailable: {exc}"}
    else:
        c2l = {"click_to_live_s": None, "reason": "disabled"}

    return {
        "ope": ope,
        "ope_thompson_logs": ope_ts,
        "ope_production_logs": ope_production,
        "ope_model_versions": ope_models,
        "click_to_live": c2l,
    }


def main(cfg: LoopConfig | None = None) -> dict[str, Any]:
    cfg = cfg or LoopConfig()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny matrices: one thread is ~10x faster than two on a shared 2-core box
    t_all = time.monotonic()
    seeds = list(dict.fromkeys([*([] if cfg.seed is None else [cfg.seed]), *cfg.seeds]))  # the checks' seed first
    cfg = cfg.model_copy(update={"seeds": seeds, "seed": seeds[0]})
    late = (cfg.drift_round + (cfg.rounds - cfg.drift_round) // 2, cfg.rounds)  # long run after the drift
    phases = {
        "pre-drift": (0, cfg.drift_round),
        "just after drift": (cfg.drift_round, cfg.drift_round + 4),
        "late (2nd half post-drift)": late,
    }
    per_seed: list[dict[str, Any]] = []
    seed_curves: dict[str, list[list[dict[str, float]]]] = {a: [] for a in ARMS}
    arm_stats: dict[str, list[dict[str, Any]]] = {a: [] for a in ARMS}
    outs, first = run_seeds(cfg)
    for seed, out in zip(seeds, outs, strict=True):
        row: dict[str, Any] = {"seed": seed, "wall_s": out["wall_s"]}
        for a in ARMS:
            row[f"ctr_{a}"] = phase_means(out["curves"][a], *late, "ctr")
            row[f"ndcg10_{a}"] = phase_means(out["curves"][a], *late, "ndcg10")
            row[f"hot_share_{a}"] = phase_means(out["curves"][a], *late, "hot_share")
            seed_curves[a].append(out["curves"][a])
            arm_stats[a].append(out["arms"][a])
        row["ctr_explore_minus_continual"] = row["ctr_explore"] - row["ctr_continual"]
        row["ctr_all_rounds_explore_minus_continual"] = phase_means(
            out["curves"]["explore"], 0, cfg.rounds, "ctr"
        ) - phase_means(out["curves"]["continual"], 0, cfg.rounds, "ctr")
        per_seed.append(row)
        log.info("seed %d: %s", seed, {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})

    checks = run_checks(first, cfg) if cfg.checks else {}

    # Mean curves over seeds (per round), phase table over seeds.
    curves: dict[str, list[dict[str, float]]] = {}
    for a in ARMS:
        curves[a] = []
        for t in range(cfg.rounds):
            pts = [sc[t] for sc in seed_curves[a]]
            curves[a].append(
                {
                    "round": t,
                    "ctr": float(np.mean([p["ctr"] for p in pts])),
                    "ctr_sd": float(np.std([p["ctr"] for p in pts], ddof=1)) if len(pts) > 1 else 0.0,
                    "ndcg10": float(np.mean([p["ndcg10"] for p in pts])),
                    "ndcg10_sd": float(np.std([p["ndcg10"] for p in pts], ddof=1)) if len(pts) > 1 else 0.0,
                    "hot_share": float(np.mean([p["hot_share"] for p in pts])),
                }
            )
    rows = []
    for a in ARMS:
        row = {"arm": a}
        for ph, (lo, hi) in phases.items():
            row[f"CTR {ph}"] = phase_means(curves[a], lo, hi, "ctr")
            row[f"NDCG@10 {ph}"] = phase_means(curves[a], lo, hi, "ndcg10")
        row["promotions"] = float(np.mean([s["promotions"] for s in arm_stats[a]]))
        row["refusals"] = float(np.mean([s["refusals"] for s in arm_stats[a]]))
        rows.append(row)

    ci = {
        f"{m}_{a}": t_interval([r[f"{m}_{a}"] for r in per_seed]) for m in ("ctr", "ndcg10", "hot_share") for a in ARMS
    }
    diffs = {
        "explore_minus_continual": t_interval([r["ctr_explore"] - r["ctr_continual"] for r in per_seed]),
        "explore_minus_frozen": t_interval([r["ctr_explore"] - r["ctr_frozen"] for r in per_seed]),
        "explore_minus_exploit_lift": t_interval([r["ctr_explore"] - r["ctr_exploit_lift"] for r in per_seed]),
        "exploit_lift_minus_continual": t_interval([r["ctr_exploit_lift"] - r["ctr_continual"] for r in per_seed]),
        "continual_minus_frozen": t_interval([r["ctr_continual"] - r["ctr_frozen"] for r in per_seed]),
    }
    add_holm(diffs, per_seed)
    # Model quality of each arm's live ranker (greedy top-10, independent of the exploration layer).
    ndcg_diffs = {}
    for name in diffs:
        hi, lo = name.split("_minus_")
        d = [r[f"ndcg10_{hi}"] - r[f"ndcg10_{lo}"] for r in per_seed]
        ndcg_diffs[name] = {**t_interval(d), "seeds_positive": int(sum(x > 0 for x in d))}
    all_rounds = t_interval([r["ctr_all_rounds_explore_minus_continual"] for r in per_seed])
    all_rounds["seeds_positive"] = int(sum(r["ctr_all_rounds_explore_minus_continual"] > 0 for r in per_seed))
    for name, d in diffs.items():
        hi, lo = name.split("_minus_")
        d["seeds_positive"] = int(sum(r[f"ctr_{hi}"] > r[f"ctr_{lo}"] for r in per_seed))
    result = {
        "ctr_frozen": ci["ctr_frozen"]["mean"],
        "ctr_continual": ci["ctr_continual"]["mean"],
        "ctr_explore": ci["ctr_explore"]["mean"],
        "ndcg10_frozen": ci["ndcg10_frozen"]["mean"],
        "ndcg10_continual": ci["ndcg10_continual"]["mean"],
        "ndcg10_explore": ci["ndcg10_explore"]["mean"],
        **(
            {
                "ope_estimate": checks["ope"]["estimates"][checks["ope"]["primary"]]["value"],
                "ope_ci": checks["ope"]["estimates"][checks["ope"]["primary"]]["ci"],
                "simulated_online_value": checks["ope"]["simulated_online_value"],
                "click_to_live_s": checks["click_to_live"].get("click_to_live_s"),
            }
            if checks
            else {}
        ),
        "ctr_explore_minus_continual": diffs["explore_minus_continual"]["mean"],
        "ctr_explore_minus_continual_ci": diffs["explore_minus_continual"]["ci"],
        "seeds": seeds,
        "metric_window": f"rounds {late[0]}..{late[1] - 1} (drift at round {cfg.drift_round}); "
        f"means over {len(seeds)} seeds, 95% Student-t CIs over seeds",
        "ci": ci,
        "paired_differences": diffs,
        "paired_ndcg10_differences": ndcg_diffs,
        "paired_difference_all_rounds_explore_minus_continual": all_rounds,
        "explore_verdict": verdict(diffs["explore_minus_continual"]),
        "explore_vs_exploit_lift_verdict": verdict(diffs["explore_minus_exploit_lift"], "the mean-lift exploitation"),
        "per_seed": per_seed,
        "phases": rows,
        "curves": curves,
        "curves_per_seed": {
            a: {str(sd): [round(p["ctr"], 5) for p in sc] for sd, sc in zip(seeds, seed_curves[a], strict=True)}
            for a in ARMS
        },
        **checks,
        "config": cfg.model_dump(),
        "wall_s": time.monotonic() - t_all,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_result(cfg.name, result)
    plot(curves, len(cfg.seeds), cfg.drift_round, RESULTS_DIR / f"{cfg.name}.png")
    report = RESULTS_DIR / f"{cfg.name}.md"
    report.write_text(markdown(result, phases))
    print(report.read_text())
    return result


def scenario_cli(default_name: str, scenario: str, **settings: Any) -> Callable[..., dict[str, Any]]:
    """The command of a loop run: `settings` over LoopConfig's (a variant, bench_loop_*.py, passes its
    own, checks off: the OPE checks and click-to-live are bench_loop's), its own result files, and
    optionally other seeds (`--seeds`, the first leads, as in main) under another name (`--name`)."""

    def run(
        seeds: Annotated[list[int] | None, typer.Option(help="Loop seeds (default: the run's own)")] = None,
        name: Annotated[str, typer.Option(help="Result file stem under bench/results")] = default_name,
        jobs: Annotated[int, typer.Option(min=1, help="Seeds run at once, one process each")] = 2,
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {"seeds": seeds, "seed": None} if seeds else {}
        run_settings = {"checks": False, **settings, "name": name, "scenario": scenario, "jobs": jobs, **extra}
        return main(LoopConfig(**run_settings))

    return run


SCENARIO = (
    "the confirmatory run: retrieval-only candidates (60 nearest to the user's context, none random) from live "
    "sessions (the context follows the user's clicks in the arm's answers), as the stream worker retrieves; "
    "20 fresh seeds (pre-registered, see the module doc)."
)

if __name__ == "__main__":
    typer.run(scenario_cli("loop", SCENARIO, checks=True))

"""The closed loop of bench_loop: its configuration (the pre-registered defaults), the arms (a live
ranker, a policy, a learner and a gate each) and the rounds they play against the simulator."""

from __future__ import annotations

import copy
import logging
import zlib
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from bench.simulator import LivePopularity, LiveSessions, Request, Simulator
from recstream.continual import (
    Example,
    GateConfig,
    LearnerConfig,
    ReplayBuffer,
    ReplayConfig,
    decide,
    fine_tune,
)
from recstream.explore import Greedy, LiftThompson, RankingPolicy
from recstream.models.ranker import ITEM_DIM, RankerConfig, RankerNet, new_ranker

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

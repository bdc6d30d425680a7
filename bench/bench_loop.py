"""Closed-loop bench: frozen vs continual vs continual+exploration in the MovieLens simulator with drift.

`make bench-loop` (= `python -m bench.bench_loop`) writes bench/results/loop.{md,png,json}.

Protocol (one seed, common random users across arms):
1. Warm-up: a uniformly random logging policy shows lists to simulated users before the drift; a
   RankerNet is trained on those logs (full training, IPW) -> v1, the starting point of every arm.
2. Rounds: each round `users_per_round` requests; each arm scores the candidates with its live
   model, its policy orders them, the simulator clicks. After `drift_round` the users' tastes rotate.
   - frozen: v1 forever, greedy;
   - continual: greedy; after every round a LoRA round on the replay buffer, gated on the newest
     held-back window, promotes a not-worse candidate;
   - explore: as continual, but the lists come from a Plackett-Luce policy (exact propensities, used
     as IPW weights).
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
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, Field
from tqdm.auto import tqdm

from bench.common import RESULTS_DIR, peak_rss_mb, write_result
from recstream.continual import (
    Example,
    GateConfig,
    LearnerConfig,
    ReplayBuffer,
    ReplayConfig,
    decide,
    fine_tune,
)
from recstream.explore import Greedy, PlackettLuce, RankingPolicy
from recstream.models.ranker import ITEM_DIM, RankerConfig, RankerNet, new_ranker
from recstream.ope import LoggedData, doubly_robust, ips, snips
from recstream.simulator import Request, SimConfig, Simulator, load_simulator

log = logging.getLogger("bench.loop")


class LoopConfig(BaseModel):
    seed: int = 0
    rounds: int = 36
    drift_round: int = 12
    users_per_round: int = 200
    k: int = 10
    warmup_requests: int = 3000
    pretrain_steps: int = 600
    holdout: int = Field(1000, description="Newest impressions held back for the gate each round")
    explore_temperature: float = 0.5
    explore_greedy_slots: int = Field(2, description="Slots kept greedy by the exploring arm")
    ope_requests: int = 3000
    ope_mc_samples: int = 2000
    learner: LearnerConfig = Field(default_factory=lambda: LearnerConfig(mode="lora", steps=100, lr=3e-3))
    replay: ReplayConfig = Field(
        default_factory=lambda: ReplayConfig(recent_capacity=6000, reservoir_capacity=20000, recent_fraction=0.7)
    )
    gate: GateConfig = Field(default_factory=lambda: GateConfig(tolerance=0.01))
    triton: bool = True


class SimFeatures:
    """FeatureSource over the simulator: user context + item vectors + features logged at serving."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def build(self, examples: list[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = np.fromiter((int(e.user) for e in examples), dtype=np.int64, count=len(examples))
        i = np.fromiter((int(e.item) for e in examples), dtype=np.int64, count=len(examples))
        ctx = np.concatenate([self.sim.user_context[u], np.zeros((len(u), ITEM_DIM), np.float32)], axis=1)
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


def log_examples(sim: Simulator, req: Request, shown: list, clicks: np.ndarray, version: str) -> list[Example]:
    out = []
    for s, c in zip(shown, clicks, strict=True):
        j = int(s.item_id)  # item_ids passed to the policy are candidate row indices
        out.append(
            Example(user=str(req.user), item=str(int(req.candidates[j])), position=s.position,
                    propensity=s.propensity, label=float(c), model_version=version,
                    cand_features=req.cand_features[j])
        )
    return out


class Arm:
    """One system under test: a live model, a policy, and (optionally) a continual learner."""

    def __init__(self, name: str, net: RankerNet, policy: RankingPolicy, learn: bool, cfg: LoopConfig) -> None:
        self.name = name
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

    def serve(self, sim: Simulator, reqs: list[Request], click_rng: np.random.Generator) -> dict[str, float]:
        scores = score_requests(self.live, reqs)
        clicks_total, slots, ndcg = 0.0, 0, []
        new: list[Example] = []
        for r, s in zip(reqs, scores, strict=True):
            ids = [str(j) for j in range(len(s))]
            shown = self.policy.rank(ids, s, self.cfg.k, self.rng)
            rows = np.array([int(x.item_id) for x in shown])
            p = sim.click_probability(r.user, r.candidates[rows], np.array([x.position for x in shown]))
            c = (click_rng.random(len(p)) < p).astype(np.float64)
            clicks_total += c.sum()
            slots += len(c)
            ndcg.append(sim.ndcg_at_k(r.user, r.candidates, np.argsort(-s, kind="stable"), self.cfg.k))
            new += log_examples(sim, r, shown, c, f"v{self.version}")
        self.buffer.extend(new)
        return {"ctr": clicks_total / slots, "ndcg10": float(np.mean(ndcg))}

    def update(self, features: SimFeatures) -> dict[str, Any]:
        if not self.learn:
            return {}
        window = self.buffer.latest(self.cfg.holdout)
        cand, stats = fine_tune(
            self.live, [], features, self.cfg.learner.model_copy(update={"seed": self.cfg.seed + self.version}),
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


def explore_policy(cfg: LoopConfig) -> PlackettLuce:
    return PlackettLuce(cfg.explore_temperature, greedy_slots=cfg.explore_greedy_slots)


def pretrain(sim: Simulator, cfg: LoopConfig, features: SimFeatures) -> tuple[RankerNet, list[Example]]:
    """v1: trained on logs of a uniformly random policy before the drift."""
    rng = np.random.default_rng(cfg.seed + 7)
    logs: list[Example] = []
    for _ in tqdm(range(cfg.warmup_requests), desc="warm-up logs", leave=False):
        r = sim.request(int(rng.integers(sim.n_users)), rng)
        rows = rng.permutation(len(r.candidates))[: cfg.k]
        p = sim.click_probability(r.user, r.candidates[rows], np.arange(len(rows)))
        c = (rng.random(len(p)) < p).astype(np.float64)
        prop = 1.0 / len(r.candidates)  # uniform permutation: P(item at slot) = 1/n exactly
        for pos, (j, cl) in enumerate(zip(rows, c, strict=True)):
            logs.append(Example(str(r.user), str(int(r.candidates[j])), pos, prop, float(cl), "v1", 0,
                                r.cand_features[j]))
    base = new_ranker(RankerConfig(seed=cfg.seed)).net
    # exam_eta=0: under uniform random logging the slot is independent of the item, so position bias
    # does not distort the relevance order and correcting it would only add variance.
    pre = LearnerConfig(mode="full", steps=cfg.pretrain_steps, lr=2e-3, exam_eta=0.0, seed=cfg.seed)
    net, stats = fine_tune(base, logs, features, pre)
    log.info("pretrained v1: %s", stats)
    return net, logs


def run_loop(sim: Simulator, cfg: LoopConfig, base: RankerNet, features: SimFeatures) -> dict[str, Any]:
    arms = [
        Arm("frozen", base, Greedy(), learn=False, cfg=cfg),
        Arm("continual", base, Greedy(), learn=True, cfg=cfg),
        Arm("explore", base, explore_policy(cfg), learn=True, cfg=cfg),
    ]
    user_rng = np.random.default_rng(cfg.seed + 11)
    curves: dict[str, list[dict[str, float]]] = {a.name: [] for a in arms}
    for t in tqdm(range(cfg.rounds), desc="rounds"):
        if t == cfg.drift_round:
            sim.drift()
        users = user_rng.integers(0, sim.n_users, cfg.users_per_round)
        cand_rng = np.random.default_rng(cfg.seed * 1000 + t)
        reqs = [sim.request(int(u), cand_rng) for u in users]  # same requests for every arm
        for a in arms:
            click_rng = np.random.default_rng(cfg.seed * 7919 + t)  # common random numbers for clicks
            m = a.serve(sim, reqs, click_rng)
            u = a.update(features)
            curves[a.name].append({"round": t, **m, "version": a.version, "accepted": float(u.get("accepted", 0))})
    summary = {a.name: {"promotions": a.promotions, "refusals": a.refusals, "final_version": a.version} for a in arms}
    return {"curves": curves, "arms": summary, "live": {a.name: a.live for a in arms}}


def ope_check(sim: Simulator, cfg: LoopConfig, net: RankerNet) -> dict[str, Any]:
    """Log PL(T) of `net` on fresh requests; estimate its greedy policy's CTR; compare to the truth."""
    rng = np.random.default_rng(cfg.seed + 99)
    logging_pol = explore_policy(cfg)
    target = Greedy()
    rows: dict[str, list[float]] = {k: [] for k in ("req", "click", "p", "pt", "q")}
    dm, truth = [], 0.0
    for r_i in tqdm(range(cfg.ope_requests), desc="OPE logs", leave=False):
        r = sim.request(int(rng.integers(sim.n_users)), rng)
        s = score_requests(net, [r])[0]
        m_log = logging_pol.marginals(s, cfg.k, rng, n_samples=cfg.ope_mc_samples)
        m_t = target.marginals(s, cfg.k)
        rel = sim.relevance(r.user, r.candidates)
        exam = sim.exam(np.arange(cfg.k))
        truth += float((m_t * rel[:, None] * exam[None, :]).sum())
        q = (1 / (1 + np.exp(-s)))[:, None] * exam[None, :]  # the model's own click estimate
        dm.append(float((m_t * q).sum()))
        shown = logging_pol.rank([str(j) for j in range(len(s))], s, cfg.k, rng)
        for x in shown:
            j = int(x.item_id)
            c = float(rng.random() < rel[j] * exam[x.position])
            rows["req"].append(r_i)
            rows["click"].append(c)
            rows["p"].append(max(m_log[j, x.position], 1.0 / cfg.ope_mc_samples))
            rows["pt"].append(m_t[j, x.position])
            rows["q"].append(q[j, x.position])
    data = LoggedData(
        request=np.array(rows["req"]), click=np.array(rows["click"]), propensity=np.array(rows["p"]),
        target_propensity=np.array(rows["pt"]), slots_per_request=cfg.k, q_hat=np.array(rows["q"]),
        dm=np.array(dm),
    )
    online = truth / (cfg.ope_requests * cfg.k)
    ests = {e.method: e for e in (ips(data), snips(data), doubly_robust(data))}
    return {
        "simulated_online_value": online,
        "logging_ctr": float(data.click.mean()),
        "estimates": {
            k: {"value": e.value, "ci": [e.low, e.high], "covers": e.contains(online)} for k, e in ests.items()
        },
        "primary": "snips",
    }


def click_to_live(sim: Simulator, cfg: LoopConfig, base: RankerNet, burst: list[Example],
                  features: SimFeatures) -> dict[str, Any]:
    """Seconds from the end of a click burst to the new version answering in a real tritonserver."""
    import tritonclient.http as httpclient

    from infra.triton_server import TritonServer
    from recstream.continual.registry import ModelRegistry, TritonModelControl
    from recstream.models.export import RANKER_MODEL_NAME, export_ranker
    from recstream.models.ranker import Ranker

    tmp = Path(tempfile.mkdtemp(prefix="bench_loop_"))
    repo = tmp / "model_repo"
    meta = new_ranker(RankerConfig(seed=cfg.seed)).meta
    export_ranker(Ranker(copy.deepcopy(base), meta.model_copy(deep=True)), repo, version=1)
    reg = ModelRegistry(repo)
    reg.init_live()
    server = TritonServer(repo, tmp / "run", http_port=0, grpc_port=0, metrics_port=0, models=[RANKER_MODEL_NAME])
    t_start = time.monotonic()
    server.start(timeout_s=300)
    start_s = time.monotonic() - t_start
    try:
        client = httpclient.InferenceServerClient(url=server.url, network_timeout=60)
        req = sim.request(0, np.random.default_rng(0))

        def served_version() -> str:
            arrays = {"CONTEXT": req.context[None], "CANDIDATES": req.cand_vectors[None].astype(np.float32),
                      "CAND_FEATURES": req.cand_features[None].astype(np.float32)}
            inputs = []
            for k, a in arrays.items():
                inp = httpclient.InferInput(k, list(a.shape), "FP32")
                inp.set_data_from_numpy(np.ascontiguousarray(a, dtype=np.float32))
                inputs.append(inp)
            return str(client.infer(RANKER_MODEL_NAME, inputs).get_response()["model_version"])

        assert served_version() == "1"
        buf: ReplayBuffer[Example] = ReplayBuffer(cfg.replay)
        t0 = time.monotonic()  # the burst of clicks has just arrived
        buf.extend(burst)
        timings: dict[str, float] = {}
        cand, _ = fine_tune(base, [], features, cfg.learner,
                            sample=lambda n: buf.sample(n, exclude_latest=cfg.holdout))
        timings["train_s"] = time.monotonic() - t0
        d = decide(cand, base, buf.latest(cfg.holdout), features, cfg.gate)
        timings["gate_s"] = time.monotonic() - t0 - timings["train_s"]
        if not d.accepted:
            return {"click_to_live_s": None, "reason": f"gate refused: {d.reason}", "server_start_s": start_s}
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
        return {"click_to_live_s": total, "version": v, "server_start_s": start_s, "burst_examples": len(burst),
                **timings, "via": "real tritonserver (explicit model control), in-process learner; no Kafka"}
    finally:
        server.stop(timeout_s=5)
        shutil.rmtree(tmp, ignore_errors=True)


def phase_means(curve: list[dict[str, float]], lo: int, hi: int, key: str) -> float:
    return float(np.mean([c[key] for c in curve[lo:hi]]))


def plot(curves: dict[str, list[dict[str, float]]], cfg: LoopConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, title in ((axes[0], "ctr", "CTR per round"), (axes[1], "ndcg10", "NDCG@10 of the live model")):
        for name, curve in curves.items():
            ax.plot([c["round"] for c in curve], [c[key] for c in curve], label=name, marker=".")
        ax.axvline(cfg.drift_round - 0.5, color="grey", ls="--", label="drift")
        ax.set_xlabel("round")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(cfg: LoopConfig | None = None) -> dict[str, Any]:
    cfg = cfg or LoopConfig()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)  # tiny matrices: one thread is ~10x faster than two on a shared 2-core box
    torch.manual_seed(cfg.seed)
    t_all = time.monotonic()
    sim = load_simulator(SimConfig(seed=cfg.seed))
    features = SimFeatures(sim)
    base, _ = pretrain(sim, cfg, features)
    out = run_loop(sim, cfg, base, features)
    curves = out["curves"]
    late = (cfg.drift_round + (cfg.rounds - cfg.drift_round) // 2, cfg.rounds)  # long run after the drift
    phases = {
        "pre-drift": (0, cfg.drift_round),
        "just after drift": (cfg.drift_round, cfg.drift_round + 4),
        "late (2nd half post-drift)": late,
    }
    ope = ope_check(sim, cfg, out["live"]["explore"])
    burst_user_rng = np.random.default_rng(cfg.seed + 5)
    burst_arm = Arm("burst", base, explore_policy(cfg), learn=False, cfg=cfg)
    reqs = [sim.request(int(u), burst_user_rng) for u in burst_user_rng.integers(0, sim.n_users, 300)]
    burst_arm.serve(sim, reqs, np.random.default_rng(3))
    c2l: dict[str, Any]
    if cfg.triton:
        try:
            c2l = click_to_live(sim, cfg, base, list(burst_arm.buffer.recent), features)
        except Exception as exc:  # the bench still reports the simulation when Triton is unavailable
            log.exception("click-to-live measurement failed")
            c2l = {"click_to_live_s": None, "reason": f"tritonserver unavailable: {exc}"}
    else:
        c2l = {"click_to_live_s": None, "reason": "disabled"}

    rows = []
    for name, curve in curves.items():
        row: dict[str, Any] = {"arm": name}
        for ph, (lo, hi) in phases.items():
            row[f"CTR {ph}"] = phase_means(curve, lo, hi, "ctr")
            row[f"NDCG@10 {ph}"] = phase_means(curve, lo, hi, "ndcg10")
        row.update(out["arms"][name])
        rows.append(row)
    result = {
        "ctr_frozen": phase_means(curves["frozen"], *late, "ctr"),
        "ctr_continual": phase_means(curves["continual"], *late, "ctr"),
        "ctr_explore": phase_means(curves["explore"], *late, "ctr"),
        "ndcg10_frozen": phase_means(curves["frozen"], *late, "ndcg10"),
        "ndcg10_continual": phase_means(curves["continual"], *late, "ndcg10"),
        "ndcg10_explore": phase_means(curves["explore"], *late, "ndcg10"),
        "ope_estimate": ope["estimates"][ope["primary"]]["value"],
        "ope_ci": ope["estimates"][ope["primary"]]["ci"],
        "simulated_online_value": ope["simulated_online_value"],
        "click_to_live_s": c2l.get("click_to_live_s"),
        "metric_window": f"rounds {late[0]}..{late[1] - 1} (drift at round {cfg.drift_round})",
        "phases": rows,
        "ope": ope,
        "click_to_live": c2l,
        "curves": curves,
        "config": cfg.model_dump(),
        "wall_s": time.monotonic() - t_all,
        "peak_rss_mb": peak_rss_mb(),
    }
    write_result("loop", result)
    plot(curves, cfg, RESULTS_DIR / "loop.png")
    (RESULTS_DIR / "loop.md").write_text(markdown(result, phases))
    print((RESULTS_DIR / "loop.md").read_text())
    return result


def markdown(r: dict[str, Any], phases: dict[str, tuple[int, int]]) -> str:
    lines = ["# Closed loop: frozen vs continual vs continual + exploration", "",
             f"MovieLens-100k simulator, drift at round {r['config']['drift_round']} of {r['config']['rounds']}, "
             f"{r['config']['users_per_round']} requests/round, k={r['config']['k']}. Wall {r['wall_s']:.0f} s.", "",
             "| arm | " + " | ".join(f"CTR {p}" for p in phases) + " | " + " | ".join(f"NDCG@10 {p}" for p in phases)
             + " | promotions | refusals |",
             "|---" * (3 + 2 * len(phases)) + "|"]
    for row in r["phases"]:
        lines.append(f"| {row['arm']} | " + " | ".join(f"{row[f'CTR {p}']:.4f}" for p in phases) + " | "
                     + " | ".join(f"{row[f'NDCG@10 {p}']:.4f}" for p in phases)
                     + f" | {row['promotions']} | {row['refusals']} |")
    ope = r["ope"]
    lines += ["", "## Off-policy estimate vs simulated online value", "",
              f"Greedy policy of the explore arm's final model, estimated from its Plackett-Luce logs "
              f"(T={r['config']['explore_temperature']}, first {r['config']['explore_greedy_slots']} slots greedy, "
              f"logging CTR {ope['logging_ctr']:.4f}); "
              f"simulated online value **{ope['simulated_online_value']:.4f}**.", "",
              "| estimator | estimate | 95% CI | covers online value |", "|---|---|---|---|"]
    for k, e in ope["estimates"].items():
        lines.append(f"| {k} | {e['value']:.4f} | [{e['ci'][0]:.4f}, {e['ci'][1]:.4f}] | {e['covers']} |")
    c = r["click_to_live"]
    lines += ["", "## Click to live", ""]
    if c.get("click_to_live_s") is not None:
        lines.append(f"Burst of {c['burst_examples']} impressions -> LoRA round ({c['train_s']:.1f} s) -> gate "
                     f"({c['gate_s']:.1f} s) -> atomic version write + Triton load_model ({c['load_s']:.1f} s): "
                     f"**{c['click_to_live_s']:.1f} s** until v{c['version']} answers ({c['via']}).")
    else:
        lines.append(f"Not measured: {c.get('reason')}")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""The closed-loop bench's report: the markdown tables, the verdicts in words and the CTR/NDCG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bench.simulator import SimConfig


def plot(curves: dict[str, list[dict[str, float]]], n_seeds: int, drift_round: int, path: Path) -> None:
    """CTR and NDCG@10 per round, mean over seeds with a +-1 standard error band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    n = n_seeds
    for ax, key, title in ((axes[0], "ctr", "CTR per round"), (axes[1], "ndcg10", "NDCG@10 of the live model")):
        for name, curve in curves.items():
            x = np.array([c["round"] for c in curve])
            y = np.array([c[key] for c in curve])
            se = np.array([c[f"{key}_sd"] for c in curve]) / np.sqrt(n)
            ax.plot(x, y, label=name, marker=".")
            ax.fill_between(x, y - se, y + se, alpha=0.2)
        ax.axvline(drift_round - 0.5, color="grey", ls="--", label="drift")
        ax.set_xlabel("round")
        ax.set_title(f"{title} (mean of {n} seeds, band: +-1 s.e.)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict(d: dict[str, Any], baseline: str = "pure exploitation") -> str:
    """What the paired late-window CI of explore - baseline says, in words."""
    lo, hi = d["ci"]
    if d.get("n", 0) < 2:
        return f"one seed: no interval, so no verdict on exploration against {baseline}"
    if lo > 0:
        return f"exploration beats {baseline} (95% CI of the paired difference above 0)"
    if hi < 0:
        return f"exploration loses to {baseline} (95% CI of the paired difference below 0)"
    return f"no significant difference between exploration and {baseline} (95% CI of the paired difference covers 0)"


def candidates_line(random_candidates: int) -> str:
    n = SimConfig().n_candidates
    if random_candidates == 0:
        return f"{n} candidates per request, all nearest to the user's context (retrieval only)"
    nearest = n - random_candidates
    return f"{n} candidates per request ({nearest} nearest to the user's context, {random_candidates} random)"


def _paired_row(name: str, d: dict[str, Any], extra: str = "") -> str:
    """One paired-difference table row: comparison, mean [CI], seeds > 0, then `extra` cells."""
    return (
        f"| {name.replace('_minus_', ' - ')} | {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
        f"| {d['seeds_positive']}/{d['n']} |{extra}"
    )


def _ci(d: dict[str, Any]) -> str:
    return f"{d['mean']:.4f} [{d['ci'][0]:.4f}, {d['ci'][1]:.4f}]"


def markdown(r: dict[str, Any], phases: dict[str, tuple[int, int]]) -> str:
    c = r["config"]
    n = len(r["seeds"])
    lines = [
        f"# Closed loop: frozen vs continual vs continual + exploration ({c['name']})",
        "",
        f"MovieLens-100k simulator, drift at round {c['drift_round']} of {c['rounds']}, "
        f"{c['users_per_round']} requests/round, k={c['k']}, {candidates_line(c['random_candidates'])}; "
        f"{n} seeds {r['seeds']} (each its own simulator, "
        f"warm-up and v1; the arms of a seed share requests and click random numbers). "
        + (
            "Popularity is live: each arm's clicks add to its own popularity feature (refreshed every round), as "
            "the stream worker's item-popularity table counts behaviour events. "
            if c["live_popularity"]
            else "Popularity feature fixed at the catalogue's counts (the protocol before live popularity). "
        )
        + (
            "Sessions are live: each arm's users' contexts follow the items they clicked in its answers (the "
            "newest of their real history and those clicks), and clicked items are not recommended again. "
            if c.get("live_sessions")
            else ""
        )
        + f"Wall {r['wall_s']:.0f} s.",
        "",
        *([f"**Scenario:** {c['scenario']}", ""] if c.get("scenario") else []),
        "Exploration arm: Thompson sampling of a per-item click lift over the ranker's scores "
        f"(Gamma posterior, item prior weight {c['explore_prior']:g}, pooled per {c['explore_groups']} with prior "
        f"weight {c['explore_group_prior']:g}, half-life {c['explore_half_life']:g} impressions), updated after "
        "every request from its clicks; propensities are Monte-Carlo marginals "
        f"({c['explore_mc_samples']} posterior draws). Ablation `exploit_lift`: the same layer, learning from the "
        "same kind of feedback, ranking by the posterior *mean* lift (no deliberate exploration) - it separates "
        "the value of exploring from the value of a per-item correction that learns between LoRA rounds.",
        "",
        f"## Late window ({r['metric_window']})",
        "",
        "| arm | CTR late, mean [95% CI] | NDCG@10 late, mean [95% CI] | shown slots that are new hits |",
        "|---|---|---|---|",
    ]
    for a in [row["arm"] for row in r["phases"]]:
        lines.append(
            f"| {a} | {_ci(r['ci'][f'ctr_{a}'])} | {_ci(r['ci'][f'ndcg10_{a}'])} | {_ci(r['ci'][f'hot_share_{a}'])} |"
        )
    lines += [
        "",
        "| paired CTR difference (per seed) | mean [95% CI, per comparison] | seeds > 0 | paired t p | Holm p |",
        "|---|---|---|---|---|",
    ]
    for name, d in r["paired_differences"].items():
        lines.append(_paired_row(name, d, f" {d['p']:.3f} | {d['p_holm']:.3f} |"))
    lines += [
        "",
        "Paired NDCG@10 differences of the live rankers (each arm's greedy top-10, without its exploration "
        "layer: what the data an arm collected taught its ranker):",
        "",
        "| paired NDCG@10 difference | mean [95% CI] | seeds > 0 |",
        "|---|---|---|",
    ]
    lines += [_paired_row(name, d) for name, d in r["paired_ndcg10_differences"].items()]
    a = r["paired_difference_all_rounds_explore_minus_continual"]
    lines += [
        "",
        f"**Verdict (late window): {r['explore_verdict']}.** Over all {c['rounds']} rounds (pre-drift and recovery "
        f"included) explore - continual = {a['mean']:+.4f} [{a['ci'][0]:+.4f}, {a['ci'][1]:+.4f}], "
        f"{a['seeds_positive']}/{a['n']} seeds > 0. Against the mean-lift ablation: "
        f"{r['explore_vs_exploit_lift_verdict']}.",
    ]
    lines += [
        "",
        "Per seed (late window):",
        "",
        "| seed | CTR frozen | CTR continual | CTR explore | CTR exploit_lift | explore - continual | "
        "NDCG@10 frozen | NDCG@10 continual | NDCG@10 explore | NDCG@10 exploit_lift |",
        "|---" * 10 + "|",
    ]
    for s in r["per_seed"]:
        lines.append(
            f"| {s['seed']} | {s['ctr_frozen']:.4f} | {s['ctr_continual']:.4f} | {s['ctr_explore']:.4f} | "
            f"{s['ctr_exploit_lift']:.4f} | {s['ctr_explore_minus_continual']:+.4f} | {s['ndcg10_frozen']:.4f} | "
            f"{s['ndcg10_continual']:.4f} | {s['ndcg10_explore']:.4f} | {s['ndcg10_exploit_lift']:.4f} |"
        )
    lines += [
        "",
        "## Phases (mean over seeds)",
        "",
        "| arm | "
        + " | ".join(f"CTR {p}" for p in phases)
        + " | "
        + " | ".join(f"NDCG@10 {p}" for p in phases)
        + " | promotions | refusals |",
        "|---" * (3 + 2 * len(phases)) + "|",
    ]
    for row in r["phases"]:
        lines.append(
            f"| {row['arm']} | "
            + " | ".join(f"{row[f'CTR {p}']:.4f}" for p in phases)
            + " | "
            + " | ".join(f"{row[f'NDCG@10 {p}']:.4f}" for p in phases)
            + f" | {row['promotions']:.1f} | {row['refusals']:.1f} |"
        )
    if "ope" in r:
        lines += checks_markdown(r)
    lines.append("")
    return "\n".join(lines)


def checks_markdown(r: dict[str, Any]) -> list[str]:
    """The OPE and click-to-live sections of the report."""
    c = r["config"]
    lines: list[str] = []
    ope, ope_ts = r["ope"], r["ope_thompson_logs"]
    lines += [
        "",
        "## Off-policy estimate vs simulated online value",
        "",
        f"Seed {c['seed']}, {c['ope_requests']} fresh requests: the greedy policy of the explore arm's final model, "
        f"estimated from logs of (a) {ope['logging_policy']} (Plackett-Luce T=0.5, first 2 slots greedy, over the same "
        "model; first sampled slot exact, later slots Monte-Carlo marginals) - the primary check, as in earlier "
        f"runs - and (b) the arm's own Thompson layer {ope_ts['logging_policy']} (final posterior held fixed; "
        "Monte-Carlo marginals). Propensities from "
        f"{c['ope_mc_samples']} draws per request, floored at 1/{c['ope_mc_samples']}. "
        f"Simulated online value **{ope['simulated_online_value']:.4f}**.",
        "",
        "| logging policy | estimator | estimate | 95% CI | covers online value |",
        "|---|---|---|---|---|",
    ]
    for o in (ope, ope_ts):
        for k, e in o["estimates"].items():
            lines.append(
                f"| {o['logging_policy']} | {k} | {e['value']:.4f} | [{e['ci'][0]:.4f}, {e['ci'][1]:.4f}] | "
                f"{e['covers']} |"
            )
    prod = r["ope_production_logs"]
    lines += [
        "",
        f"The operator's path (`recstream.ops.cli ope greedy`): {prod['requests']} other fresh requests logged as the "
        f"worker and the feedback joiner log them (ranking-log + training-examples, `{prod['logging_policy']}` over "
        "the pool order, conditional propensities as logged), evaluated by `recstream.ope.logs` with exact "
        f"marginals. Simulated online value of greedy on those requests **{prod['simulated_online_value']:.4f}**; "
        f"logged CTR {prod['logging_ctr']:.4f}; effective sample size {prod['effective_sample_size']:.0f}.",
        "",
        "| estimator | estimate | 95% CI | covers online value |",
        "|---|---|---|---|",
    ]
    for k, e in prod["estimates"].items():
        lines.append(f"| {k} | {e['value']:.4f} | [{e['ci'][0]:.4f}, {e['ci'][1]:.4f}] | {e['covers']} |")
    models = r["ope_model_versions"]
    if models.get("candidate_models"):
        lines += [
            "",
            f"Other model versions (`ope greedy --model-version`), from {models['requests']} further fresh requests "
            f"logged by `{models['logging_policy']}` over the live model's pool order (a greedy head slot would "
            "leave a version with another top item unsupported): each logged pool reranked by the version from the "
            "logged inputs, greedy over that order, and the difference paired with the live model's order of the same "
            "pools. Truth: that policy's exact expected CTR on the same pools.",
            "",
            "| model | simulated value | SNIPS [95% CI] | DR [95% CI] | true difference vs live | "
            "DR difference [95% CI] | covers | ESS |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in models["candidate_models"].items():
            sn, dr, dd = m["estimates"]["snips"], m["estimates"]["dr"], m["versus_live"]["dr"]
            lines.append(
                f"| {name} | {m['simulated_online_value']:.4f} | {sn['value']:.4f} [{sn['ci'][0]:.4f}, "
                f"{sn['ci'][1]:.4f}] | {dr['value']:.4f} [{dr['ci'][0]:.4f}, {dr['ci'][1]:.4f}] | "
                f"{m['simulated_difference']:+.4f} | {dd['value']:+.4f} [{dd['ci'][0]:+.4f}, {dd['ci'][1]:+.4f}] | "
                f"{dd['covers']} | {m['effective_sample_size']:.0f} |"
            )
    cl = r["click_to_live"]
    lines += ["", "## Click to live", ""]
    if cl.get("click_to_live_s") is not None:
        lines.append(
            f"Burst of {cl['burst_examples']} impressions -> LoRA round ({cl['train_s']:.1f} s) -> gate "
            f"({cl['gate_s']:.1f} s) -> atomic version write + Triton load_model ({cl['load_s']:.1f} s): "
            f"**{cl['click_to_live_s']:.1f} s** until v{cl['version']} answers ({cl['via']})."
        )
        for n, rr in enumerate(cl.get("refused_rounds", []), 1):
            lines.append(
                f"Before it, burst {n} ({rr['burst_examples']} impressions) made a round of {rr['round_s']:.1f} s "
                f"whose candidate the gate refused ({rr['reason']}); its examples stayed in the buffer."
            )
    else:
        lines.append(f"Not measured: {cl.get('reason')}")
    return lines

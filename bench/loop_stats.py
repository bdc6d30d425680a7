"""Statistics of the closed-loop bench: phase means, Student-t intervals over seeds, paired t-tests
with Holm's adjustment (shared by bench_loop and pool_seeds)."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import stats


def phase_means(curve: list[dict[str, float]], lo: int, hi: int, key: str) -> float:
    return float(np.mean([c[key] for c in curve[lo:hi]]))


def t_interval(x: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and Student-t confidence interval over independent repetitions (seeds)."""
    a = np.asarray(x, dtype=np.float64)
    m = float(a.mean())
    if len(a) < 2:
        return {"mean": m, "ci": [m, m], "n": len(a)}
    half = float(stats.t.ppf(0.5 + level / 2, len(a) - 1) * a.std(ddof=1) / np.sqrt(len(a)))
    return {"mean": m, "ci": [m - half, m + half], "sd": float(a.std(ddof=1)), "n": len(a)}


def holm_adjusted(p_values: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment: the paired comparisons share the same seeds, so each one's own
    95 % interval overstates how sure the set of them is."""
    names = sorted(p_values, key=p_values.__getitem__)
    out, running = {}, 0.0
    for rank, name in enumerate(names):
        running = max(running, (len(names) - rank) * p_values[name])
        out[name] = min(1.0, running)
    return out


def add_holm(diffs: dict[str, dict[str, Any]], per_seed: list[dict[str, Any]]) -> None:
    """Paired t-test p (difference = 0) per comparison, and its Holm-adjusted value over all of them."""
    raw = {}
    for name in diffs:
        hi, lo = name.split("_minus_")
        d = np.array([r[f"ctr_{hi}"] - r[f"ctr_{lo}"] for r in per_seed])
        raw[name] = float(stats.ttest_1samp(d, 0.0).pvalue) if len(d) > 1 and np.ptp(d) > 1e-12 else 1.0
    for name, p_adj in holm_adjusted(raw).items():
        diffs[name]["p"] = raw[name]
        diffs[name]["p_holm"] = p_adj

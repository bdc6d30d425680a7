"""Off-policy evaluation of a candidate ranking policy's CTR from logged impressions.

Why: trying a policy online costs real users' clicks; the logs of a *stochastic* logging policy
(recstream.explore, with exact propensities) let us estimate what another policy would have earned.

Model: the item-position click model - a click on (item i, slot j) depends on the request context,
i and j only, not on the other items shown. Then, with marginal propensities
pi(i at j | x) of the target (e) and logging (0) policies, per request x

    V(x) = sum_{shown (i, j)} c_ij * pi_e(i, j | x) / pi_0(i, j | x)          (IPS, unbiased)

is an unbiased estimate of the target's expected clicks per request whenever pi_0 > 0 where
pi_e > 0. CTR = sum V / sum k over requests (clicks per shown slot, also when k varies). SNIPS
divides by the realised sum of weights instead of its expectation (k per request): a little bias,
much less variance. Doubly robust adds
a click model q(x, i, j): V_DR = sum_{i,j} pi_e q + sum_shown w (c - q); unbiased if either the
propensities or q are right. Confidence intervals: CLT over requests (requests are i.i.d.), or a
percentile bootstrap over requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Estimate:
    """A point estimate of CTR with a (1 - alpha) confidence interval."""

    value: float
    low: float
    high: float
    n_requests: int
    method: str

    @property
    def ci(self) -> tuple[float, float]:
        return (self.low, self.high)

    def contains(self, x: float) -> bool:
        return self.low <= x <= self.high


@dataclass
class LoggedData:
    """Logged impressions, one row each, grouped into requests by `request` (0..R-1).

    target_propensity: the candidate policy's marginal P(item at this slot) in that request;
    slots_per_request: k, or one k per request when answers differ in length (CTR = clicks per slot);
    q_hat (optional): a click model's P(click) for the row; dm (optional, [R]): the click model's
    expected clicks per request under the target policy, sum_{i,j} pi_e(i,j) q(i,j).
    """

    request: np.ndarray
    click: np.ndarray
    propensity: np.ndarray
    target_propensity: np.ndarray
    slots_per_request: int | np.ndarray
    q_hat: np.ndarray | None = None
    dm: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.request = np.asarray(self.request, dtype=np.int64)
        self.click = np.asarray(self.click, dtype=np.float64)
        self.propensity = np.asarray(self.propensity, dtype=np.float64)
        self.target_propensity = np.asarray(self.target_propensity, dtype=np.float64)
        n = len(self.request)
        for name in ("click", "propensity", "target_propensity"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} rows, request has {n}")
        if np.any(self.propensity <= 0):
            raise ValueError("logging propensities must be > 0 (the logging policy must have explored)")
        if self.q_hat is not None:
            self.q_hat = np.asarray(self.q_hat, dtype=np.float64)
        if self.dm is not None:
            self.dm = np.asarray(self.dm, dtype=np.float64)
        k = np.asarray(self.slots_per_request, dtype=np.float64)
        if np.any(k <= 0) or (k.ndim == 1 and len(k) != self.n_requests):
            raise ValueError("slots_per_request must be > 0, one value or one per request")

    @property
    def n_requests(self) -> int:
        return int(self.request.max()) + 1 if len(self.request) else 0

    def weights(self, clip: float | None = None) -> np.ndarray:
        w = self.target_propensity / self.propensity
        return np.minimum(w, clip) if clip is not None else w


def _per_request(data: LoggedData, values: np.ndarray) -> np.ndarray:
    return np.bincount(data.request, weights=values, minlength=data.n_requests)


def _slots(data: LoggedData) -> np.ndarray:
    """Shown slots per request, as an array (one value broadcast when every answer has k)."""
    return np.broadcast_to(np.asarray(data.slots_per_request, dtype=np.float64), (data.n_requests,))


def _ratio(num: np.ndarray, den: np.ndarray, alpha: float, method: str) -> Estimate:
    """sum(num) / sum(den) over requests, CI by the delta method for a ratio of means:
    var(num - value * den) / (n * mean(den)^2). With den = slots per request this is clicks per
    shown slot, the CTR, also when answers differ in length (constant k: the plain CLT interval)."""
    n = len(num)
    value = float(num.sum() / den.sum())
    resid = num - value * den
    se = float(np.sqrt(resid.var(ddof=1) / n) / den.mean()) if n > 1 else float("inf")
    z = float(stats.norm.ppf(1 - alpha / 2))
    return Estimate(value, value - z * se, value + z * se, n, method)


def ips(data: LoggedData, alpha: float = 0.05, clip: float | None = None) -> Estimate:
    """Inverse propensity scoring; `clip` caps weights (biased down, lower variance)."""
    per_req = _per_request(data, data.weights(clip) * data.click)
    return _ratio(per_req, _slots(data), alpha, "ips" if clip is None else f"ips_clip{clip:g}")


def snips(data: LoggedData, alpha: float = 0.05) -> Estimate:
    """Self-normalised IPS: sum(w c) / sum(w), CI by the delta method over requests."""
    w = data.weights()
    return _ratio(_per_request(data, w * data.click), _per_request(data, w), alpha, "snips")


def doubly_robust(data: LoggedData, alpha: float = 0.05) -> Estimate:
    """DR: the click model's expected value plus IPS-weighted residuals of the logged clicks."""
    if data.q_hat is None or data.dm is None:
        raise ValueError("doubly robust needs q_hat (per row) and dm (per request)")
    per_req = data.dm + _per_request(data, data.weights() * (data.click - data.q_hat))
    return _ratio(per_req, _slots(data), alpha, "dr")


def bootstrap_ci(
    data: LoggedData, estimator: str = "ips", n_boot: int = 500, alpha: float = 0.05, seed: int = 0
) -> Estimate:
    """Percentile bootstrap over requests for 'ips' | 'snips' | 'dr' (no normality assumption)."""
    w = data.weights()
    a = _per_request(data, w * data.click)
    b = _per_request(data, w)
    if estimator == "dr":
        if data.q_hat is None or data.dm is None:
            raise ValueError("doubly robust needs q_hat and dm")
        a = data.dm + _per_request(data, w * (data.click - data.q_hat))
    rng = np.random.default_rng(seed)
    n = len(a)
    idx = rng.integers(0, n, size=(n_boot, n))
    if estimator != "snips":
        b = _slots(data)
    boots = a[idx].sum(1) / b[idx].sum(1)
    value = float(a.sum() / b.sum())
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2])
    return Estimate(value, float(lo), float(hi), n, f"{estimator}_bootstrap")

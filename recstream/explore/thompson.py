"""Thompson sampling over a per-item click lift on top of the ranker: exploration that learns online.

Why: a fixed-temperature policy (Plackett-Luce, epsilon-greedy) explores the same amount forever
and everywhere - it keeps paying for items it already knows are bad, and it cannot move an item it
has found to be good above the ranker's order. The continual learner only fixes the ranker in
periodic rounds. This layer learns from every click in between, and explores where it is
uncertain (items with few recent impressions), not where the ranker is merely unsure of the order.

Model (position-based click model, the one the learner's IPW weights assume):

    P(click | item i at slot j) = exam(j) * min(1, lift_i * sigmoid(s_i)),   exam(j) = 1 / (1 + j) ** eta

where s_i is the ranker's logit for the request and lift_i is an unknown per-item correction of the
ranker (1 = the ranker is right). With clicks C_i and expected clicks X_i = sum exam(j) sigmoid(s)
over the item's impressions, the Gamma-Poisson conjugate gives the posterior

    lift_i ~ Gamma(shape = prior + C_i, rate = prior + X_i)         (prior mean 1, prior weight `prior`)

Evidence decays with a half-life counted in observed impressions, so the posterior follows drift
and the ranker's own promotions. `rank` draws one lift per candidate and orders by the sampled
click probability (Thompson sampling); an item shown often has a tight posterior (exploited), a new
or rarely shown one has a wide posterior (explored).

Propensities: the law of a Thompson-sampled ranking has no closed form. Each shown slot carries the
marginal P(item at slot | posterior, scores) estimated from `mc_samples` independent posterior draws
(vectorised), floored at 1 / mc_samples - an estimate, stated as such, like PlackettLuce.marginals.

Feedback: the caller reports each shown slot's outcome with `observe`. The simulator loop does it
after each request; a stream worker does it through recstream.explore.feedback.PolicyFeedback when
the feedback joiner closes an impression window. Without feedback the policy is a posterior-prior
randomisation of the ranker's order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from recstream.explore.policies import MIN_PROPENSITY, Shown, _check, greedy_order


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(x, -30.0, 30.0)))


#: An item whose decayed evidence (clicks or expected clicks) is below this share of the prior is
#: forgotten: its posterior is the prior's to within this share.
FORGET_SHARE = 1e-3
#: Faded items are looked for once the policy holds this many (then twice what it kept).
FORGET_CHECK_ITEMS = 4096


class LiftThompson:
    """Thompson sampling of per-item click lifts over the ranker's scores (see the module doc)."""

    def __init__(
        self,
        prior: float = 2.0,
        half_life: float = 20000.0,
        exam_eta: float = 1.0,
        mc_samples: int = 256,
        group_prior: float = 0.0,
        sample: bool = True,
    ) -> None:
        finite = all(math.isfinite(x) for x in (prior, half_life, exam_eta, group_prior))
        if not finite or prior <= 0 or half_life <= 0 or mc_samples < 1 or group_prior < 0:
            raise ValueError("prior, half_life and mc_samples must be finite and > 0, group_prior >= 0")
        self.group_prior = float(group_prior)
        self._groups: LiftThompson | None = (
            LiftThompson(group_prior, half_life, exam_eta, mc_samples, sample=sample) if group_prior > 0 else None
        )
        self.prior = float(prior)
        self.half_life = float(half_life)
        self.exam_eta = float(exam_eta)
        self.mc_samples = int(mc_samples)
        self.sample = bool(sample)  # False: rank by the posterior mean lift (exploitation only, an ablation)
        self.stochastic = self.sample
        self.name = f"{'ts' if sample else 'mean'}_lift_p{self.prior:g}_h{self.half_life:g}"
        self._index: dict[str, int] = {}
        self._clicks = np.zeros(64)
        self._expected = np.zeros(64)
        self._t_last = np.zeros(64)
        self.t = 0.0  # impressions observed so far (the decay clock)
        self._forget_at = FORGET_CHECK_ITEMS  # items held when faded ones are next forgotten

    # ---- posterior ----------------------------------------------------------------------------
    def _rows(self, item_ids: Sequence[str], create: bool) -> np.ndarray:
        rows = np.empty(len(item_ids), dtype=np.int64)
        for n, iid in enumerate(item_ids):
            r = self._index.get(iid)
            if r is None:
                if not create:
                    rows[n] = -1
                    continue
                r = len(self._index)
                self._index[iid] = r
                if r >= len(self._clicks):
                    grow = len(self._clicks)
                    self._clicks = np.concatenate([self._clicks, np.zeros(grow)])
                    self._expected = np.concatenate([self._expected, np.zeros(grow)])
                    self._t_last = np.concatenate([self._t_last, np.zeros(grow)])
            rows[n] = r
        return rows

    def posterior(self, item_ids: Sequence[str], groups: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(shape, rate) of each item's lift posterior, evidence decayed to now. With groups (and
        group_prior > 0) an item's prior mean is its group's posterior mean lift (empirical Bayes)."""
        rows = self._rows(item_ids, create=False)
        known = rows >= 0
        c = np.zeros(len(rows))
        x = np.zeros(len(rows))
        r = rows[known]
        f = 0.5 ** ((self.t - self._t_last[r]) / self.half_life)
        c[known] = self._clicks[r] * f
        x[known] = self._expected[r] * f
        mean0 = 1.0
        if self._groups is not None and groups is not None:
            mean0 = self._groups.lift_mean(groups)
        return self.prior * mean0 + c, self.prior + x

    def group_lift_mean(self, groups: Sequence[str]) -> np.ndarray:
        """Posterior mean lift of each group (the prior mean of its unseen items); 1 without pooling."""
        return self._groups.lift_mean(groups) if self._groups is not None else np.ones(len(groups))

    def lift_mean(self, item_ids: Sequence[str], groups: Sequence[str] | None = None) -> np.ndarray:
        a, b = self.posterior(item_ids, groups)
        return a / b

    def observe(self, item_id: str, position: int, score: float, clicked: float, group: str | None = None) -> None:
        """One shown slot's outcome: the item, its slot, the ranker logit it was shown with, click 0/1."""
        if self._groups is not None and group is not None:
            self._groups.observe(group, position, score, clicked)
        r = int(self._rows([item_id], create=True)[0])
        self.t += 1.0
        f = 0.5 ** ((self.t - self._t_last[r]) / self.half_life)
        exam = 1.0 / (1.0 + position) ** self.exam_eta
        self._clicks[r] = self._clicks[r] * f + float(clicked)
        self._expected[r] = self._expected[r] * f + exam * float(_sigmoid(np.array([score]))[0])
        self._t_last[r] = self.t
        if len(self._index) >= self._forget_at:
            self._forget_faded()

    def _forget_faded(self) -> None:
        """Drop the items whose decayed evidence no longer moves their posterior (below FORGET_SHARE
        of the prior: they rank as unseen items do). With catalogue churn every item ever shown kept
        its row, in memory and in the saved state, for good."""
        n = len(self._index)
        f = 0.5 ** ((self.t - self._t_last[:n]) / self.half_life)
        floor = FORGET_SHARE * self.prior
        keep = np.flatnonzero((self._clicks[:n] * f >= floor) | (self._expected[:n] * f >= floor))
        ids = sorted(self._index, key=self._index.__getitem__)
        self._assign([ids[r] for r in keep], self._clicks[keep], self._expected[keep], self._t_last[keep], self.t)
        self._forget_at = max(FORGET_CHECK_ITEMS, 2 * len(keep))

    # ---- persistence --------------------------------------------------------------------------
    def evidence(self) -> dict[str, np.ndarray]:
        """What the policy has learned, as arrays (items, clicks, expected clicks, decay clock): what a
        worker saves so that a restart keeps it. Prior, half-life and sampling are settings, not state,
        so evidence saved under ts: loads into lift: and back."""
        n = len(self._index)
        out = {
            "items": np.array(sorted(self._index, key=self._index.__getitem__), dtype=str),
            "clicks": self._clicks[:n].copy(),
            "expected": self._expected[:n].copy(),
            "t_last": self._t_last[:n].copy(),
            "t": np.array([self.t]),
        }
        if self._groups is not None:
            out.update({f"group_{k}": v for k, v in self._groups.evidence().items()})
        return out

    @staticmethod
    def _parsed(state: Mapping[str, np.ndarray]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray, float]:
        ids = [str(x) for x in state["items"]]
        arrays = [np.asarray(state[k], dtype=np.float64).reshape(-1) for k in ("clicks", "expected", "t_last")]
        if any(len(a) != len(ids) for a in arrays):
            raise ValueError("policy evidence arrays have different lengths")
        t = np.asarray(state["t"], dtype=np.float64).reshape(-1)
        if len(t) != 1:
            raise ValueError("policy evidence has no clock")
        return ids, *arrays, float(t[0])

    def _assign(self, ids: list[str], clicks: np.ndarray, expected: np.ndarray, t_last: np.ndarray, t: float) -> None:
        n, cap = len(ids), max(64, len(ids))
        self._index = {iid: r for r, iid in enumerate(ids)}
        self._clicks, self._expected, self._t_last = np.zeros(cap), np.zeros(cap), np.zeros(cap)
        self._clicks[:n], self._expected[:n], self._t_last[:n] = clicks, expected, t_last
        self.t = t

    def load_evidence(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the learned state with `evidence()` output; everything is checked before anything
        changes (a group-pooled policy keeps its group prior flat when the state had no groups)."""
        own = self._parsed(state)
        group = None
        if self._groups is not None and "group_items" in state:
            group = self._parsed({k.removeprefix("group_"): v for k, v in state.items() if k.startswith("group_")})
        self._assign(*own)
        if group is not None:
            self._groups._assign(*group)

    # ---- ranking ------------------------------------------------------------------------------
    @staticmethod
    def _sampled_logits(base: np.ndarray, a: np.ndarray, b: np.ndarray, draws: np.ndarray) -> np.ndarray:
        # log P(click | examined) = log min(1, lift * sigmoid(s)); the cap at 1 keeps a huge lift draw
        # from outranking a sure click forever, ties broken by the ranker's order via greedy_order.
        return np.minimum(0.0, np.log(draws) + base)

    def _order(self, s: np.ndarray, a: np.ndarray, b: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        base = np.log(_sigmoid(s))
        draw = rng.gamma(a, 1.0 / b) if self.sample else a / b
        return greedy_order(self._sampled_logits(base, a, b, draw) + 1e-9 * s)

    def rank(
        self,
        item_ids: Sequence[str],
        scores: np.ndarray,
        k: int,
        rng: np.random.Generator,
        groups: Sequence[str] | None = None,
    ) -> list[Shown]:
        s, k = _check(item_ids, scores, k)
        a, b = self.posterior(item_ids, groups)
        order = self._order(s, a, b, rng)[:k]
        m = self._marginals(s, a, b, k, rng)
        floor = max(MIN_PROPENSITY, 1.0 / self.mc_samples)
        return [Shown(item_ids[int(i)], j, float(min(1.0, max(floor, m[i, j])))) for j, i in enumerate(order)]

    def _marginals(
        self, s: np.ndarray, a: np.ndarray, b: np.ndarray, k: int, rng: np.random.Generator, n: int | None = None
    ) -> np.ndarray:
        n = n or self.mc_samples
        base = np.log(_sigmoid(s))
        if not self.sample:  # deterministic given the posterior: one order, propensity 1
            n = 1
            draws = (a / b)[None, :]
        else:
            draws = rng.gamma(a[None, :], 1.0 / b[None, :], size=(n, len(s)))
        z = self._sampled_logits(base[None, :], a, b, draws) + 1e-9 * s[None, :]
        # greedy_order per draw (descending, ties by index): lexsort on (index, -z) row-wise == stable argsort of -z
        orders = np.argsort(-z, axis=1, kind="stable")[:, :k]
        m = np.zeros((len(s), k))
        for j in range(k):
            m[:, j] = np.bincount(orders[:, j], minlength=len(s)) / n
        return m

    def marginals(
        self,
        scores: np.ndarray,
        k: int,
        rng: np.random.Generator | None = None,
        n_samples: int | None = None,
        item_ids: Sequence[str] | None = None,
        groups: Sequence[str] | None = None,
    ) -> np.ndarray:
        """P(item i at slot j) under the current posterior, estimated from n_samples posterior draws.
        Without item_ids every candidate is treated as never seen (prior only)."""
        s = np.asarray(scores, dtype=np.float64)
        k = min(k, len(s))
        ids = list(item_ids) if item_ids is not None else [f"\0unseen{n}" for n in range(len(s))]
        a, b = self.posterior(ids, groups)
        return self._marginals(s, a, b, k, rng or np.random.default_rng(0), n_samples)

"""Exploration policies over a ranked candidate list, as pure functions of (ids, scores, rng).

Why exploration: a ranker that only ever shows its own top-k learns nothing about the items it
buries, and after a change in tastes it cannot find out. Every policy here returns, for each shown
slot, the exact probability with which it made that choice, so the logs support off-policy
evaluation (recstream.ope) and inverse-propensity-weighted training (recstream.continual).

Interface shared by every policy (what the stream recommender calls):

    policy.name                                   arm label, goes into RecommendationResult.policy
    policy.rank(item_ids, scores, k, rng)         -> list[Shown(item_id, position, propensity)]
    policy.marginals(scores, k, rng=None)         -> [n, k] array, P(item i shown at slot j)

`propensity` semantics per policy (documented on each class):
* Greedy / EpsilonGreedy: the *marginal* P(item at slot) (exact, closed form);
* PlackettLuce: the *conditional* P(item at slot | items in earlier slots), exact; its slot-0 value
  is also the marginal. Marginals of later slots have no closed form: `exact_marginals` integrates
  them numerically (off-policy evaluation of logs), `marginals` estimates them by Gumbel-top-k
  sampling (fast, for the simulator).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

#: Smallest propensity we ever report: the contract requires > 0, and float underflow must not break it.
MIN_PROPENSITY = 1e-12


@dataclass(frozen=True)
class Shown:
    """One shown slot: which item, where, and with what probability the policy put it there."""

    item_id: str
    position: int
    propensity: float


class RankingPolicy(Protocol):
    name: str
    stochastic: bool  # False: one order per input, every propensity 1 (nothing to evaluate other policies with)

    def rank(self, item_ids: Sequence[str], scores: np.ndarray, k: int, rng: np.random.Generator) -> list[Shown]: ...

    def marginals(self, scores: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray: ...


def _check(item_ids: Sequence[str], scores: np.ndarray, k: int) -> tuple[np.ndarray, int]:
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if len(item_ids) != len(s):
        raise ValueError(f"{len(item_ids)} item ids but {len(s)} scores")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return s, min(int(k), len(s))


def greedy_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; ties broken by index so the order is deterministic."""
    s = np.asarray(scores, dtype=np.float64)
    return np.lexsort((np.arange(len(s)), -s))


def _clip(p: float) -> float:
    return float(min(1.0, max(MIN_PROPENSITY, p)))


class Greedy:
    """Pure exploitation: the top-k by score, every propensity 1."""

    name = "greedy"
    stochastic = False

    def rank(self, item_ids: Sequence[str], scores: np.ndarray, k: int, rng: np.random.Generator) -> list[Shown]:
        s, k = _check(item_ids, scores, k)
        return [Shown(item_ids[i], j, 1.0) for j, i in enumerate(greedy_order(s)[:k])]

    def marginals(self, scores: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        k = min(k, len(s))
        m = np.zeros((len(s), k))
        m[greedy_order(s)[:k], np.arange(k)] = 1.0
        return m


class PlackettLuce:
    """Sample a ranking slot by slot from softmax(scores / temperature) over the not-yet-shown items.

    propensity = P(item at slot j | slots < j) = exp(s_i/T) / sum_{remaining} exp(s/T), exact. The
    probability of the whole shown prefix is the product of the propensities. Temperature -> 0 is
    greedy; large temperature is uniform. `name` carries the temperature so arms are distinguishable.

    greedy_slots = g keeps the first g slots greedy (propensity exactly 1) and samples only the
    rest: exploration where users look less (position bias), so it costs fewer clicks, while the
    IPW weights of the learner still credit the clicks it earns down there.
    """

    def __init__(self, temperature: float = 1.0, greedy_slots: int = 0) -> None:
        if not (math.isfinite(temperature) and temperature > 0) or greedy_slots < 0:
            raise ValueError("temperature must be a finite number > 0 and greedy_slots >= 0")
        self.temperature = float(temperature)
        self.greedy_slots = int(greedy_slots)
        self.stochastic = True
        self.name = f"pl_t{self.temperature:g}" + (f"_g{self.greedy_slots}" if self.greedy_slots else "")

    def _logits(self, s: np.ndarray) -> np.ndarray:
        z = s / self.temperature
        return z - z.max()

    def rank(self, item_ids: Sequence[str], scores: np.ndarray, k: int, rng: np.random.Generator) -> list[Shown]:
        s, k = _check(item_ids, scores, k)
        z = self._logits(s)
        alive = np.ones(len(s), dtype=bool)
        out: list[Shown] = []
        g = min(self.greedy_slots, k)
        for j, i in enumerate(greedy_order(s)[:g]):
            out.append(Shown(item_ids[int(i)], j, 1.0))
            alive[i] = False
        for j in range(g, k):
            # Renormalised in log space over what is left: with a low temperature the remaining
            # weights would all underflow against the global maximum.
            live = np.where(alive, z, -np.inf)
            p = np.exp(live - live.max())
            p /= p.sum()
            i = int(rng.choice(len(s), p=p))
            out.append(Shown(item_ids[i], j, _clip(p[i])))
            alive[i] = False
        return out

    def first_sampled_slot_probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Exact P(item at slot greedy_slots) = softmax(scores / T) over the items not shown greedily."""
        s = np.asarray(scores, dtype=np.float64)
        rest = greedy_order(s)[self.greedy_slots :]
        p = np.zeros(len(s))
        p[rest] = np.exp(self._logits(s[rest]))
        return p / p.sum()

    def slot0_probabilities(self, scores: np.ndarray) -> np.ndarray:
        """Exact P(item at slot 0)."""
        if self.greedy_slots:
            return Greedy().marginals(scores, 1)[:, 0]
        return self.first_sampled_slot_probabilities(scores)

    def sample_orders(self, scores: np.ndarray, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
        """n independent rankings [n, k] by the Gumbel-top-k trick (same law as `rank`, vectorised)."""
        s = np.asarray(scores, dtype=np.float64)
        k = min(k, len(s))
        g = min(self.greedy_slots, k)
        head = greedy_order(s)[:g]
        z = s / self.temperature
        noisy = z[None, :] + rng.gumbel(size=(n, len(z)))
        noisy[:, head] = -np.inf
        m = k - g
        if m == 0:
            return np.broadcast_to(head, (n, g)).copy()
        top = np.argpartition(-noisy, m - 1, axis=1)[:, :m]
        order = np.take_along_axis(noisy, top, axis=1).argsort(axis=1)[:, ::-1]
        tail = np.take_along_axis(top, order, axis=1)
        return np.concatenate([np.broadcast_to(head, (n, g)), tail], axis=1)

    def exact_marginals(self, scores: np.ndarray, k: int) -> np.ndarray:
        """P(item i at slot j) without sampling (see `sampling_marginals`): off-policy evaluation of
        production logs uses these."""
        s = np.asarray(scores, dtype=np.float64)
        k = min(k, len(s))
        g = min(self.greedy_slots, k)
        order = greedy_order(s)
        m = np.zeros((len(s), k))
        m[order[:g], np.arange(g)] = 1.0
        rest = order[g:]
        if k > g:
            m[np.ix_(rest, np.arange(g, k))] = sampling_marginals(self._logits(s[rest]), k - g)
        return m

    def marginals(
        self, scores: np.ndarray, k: int, rng: np.random.Generator | None = None, n_samples: int = 4000
    ) -> np.ndarray:
        """P(item i at slot j): greedy slots and the first sampled slot exact, later slots estimated
        from n_samples Gumbel-top-k draws (fast, used by the simulator; `exact_marginals` is exact)."""
        s = np.asarray(scores, dtype=np.float64)
        k = min(k, len(s))
        rng = rng or np.random.default_rng(0)
        orders = self.sample_orders(s, k, n_samples, rng)
        m = np.zeros((len(s), k))
        for j in range(k):
            m[:, j] = np.bincount(orders[:, j], minlength=len(s)) / n_samples
        g = min(self.greedy_slots, k)
        if g < k:
            m[:, g] = self.first_sampled_slot_probabilities(s)
        return m


def sampling_marginals(log_weights: np.ndarray, k: int, points_per_unit: int = 80) -> np.ndarray:
    """[n, k] P(item i is the j-th draw) when k items are drawn without replacement, each draw with
    probability proportional to exp(log_weights) (the Plackett-Luce law), exact up to quadrature
    error. Log weights, because a low temperature spreads them over more than floating point holds.

    Exponential clocks: the draw order is the order in which independent E_i ~ Exp(w_i) ring, so
    item i is drawn j-th when exactly j of the others rang before it:

        P(i at j) = integral over t of  w_i exp(-w_i t) * PoissonBinomial_{l != i}(j; 1 - exp(-w_l t)) dt

    integrated over log t by the trapezoid rule (the integrand is smooth there, whatever the spread
    of the weights), the Poisson-binomial law by its O(n k) recursion. Each item gets its own window
    of log t: from where the heaviest item's clock starts to ring (or 30 units below its own clock,
    if that is later; the exponential tail below is added in closed form) to where its own clock or
    the k-th other clock has surely rung. So the cost does not grow with the spread of the weights.
    Items of log weight -inf are never drawn. Why not Monte Carlo: one pool shape's estimate is
    shared by every logged request of that shape, so its error would be a bias; and cells with tiny
    probabilities need their value, not a floor.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    n = len(lw)
    k = min(int(k), n)
    m = np.zeros((n, k))
    live = np.flatnonzero(lw > -np.inf)
    if k == 0 or len(live) == 0:
        return m
    lw_live = lw[live] - lw[live].max()
    ranked = np.sort(lw_live)[::-1]
    rang_surely, quiet = np.log(60.0), np.log(1e-7)
    for a, i in enumerate(live):
        own = lw_live[a]
        top = rang_surely - own
        others = len(live) - 1
        if others >= k:  # once k others have rung, item a cannot be among the first k
            kth_other = ranked[k] if own >= ranked[k - 1] else ranked[k - 1]
            top = min(top, rang_surely - kth_other)
        bottom = max(quiet, -30.0 - own)
        if top <= bottom:
            continue
        y = np.linspace(bottom, top, max(400, int(points_per_unit * (top - bottom))))
        rest = np.delete(lw_live, a)
        with np.errstate(over="ignore"):  # a clock far past its time rings with probability 1
            ring = -np.expm1(-np.exp(rest[:, None] + y[None, :]))  # [others, points] P(E_l < t)
        dist = np.zeros((len(y), k))  # P(exactly j others rang by t), j < k
        dist[:, 0] = 1.0
        for p in ring:
            dist[:, 1:] = dist[:, 1:] * (1.0 - p[:, None]) + dist[:, :-1] * p[:, None]
            dist[:, 0] *= 1.0 - p
        u = np.exp(own + y)
        integrand = (u * np.exp(-u))[:, None] * dist  # d/dy P(E_i < e^y), times the others' law
        # Below the window the integrand grows like e^y, so its tail is about its value there (at
        # most e^-30 off where the window starts after the heaviest clock's).
        m[i] = np.trapz(integrand, y, axis=0) + integrand[0]
    return m


class EpsilonGreedy:
    """Greedy top-k, except each of the first `explore_slots` slots, independently with probability
    epsilon, shows an item drawn uniformly from the pool below the top-k instead (without
    replacement across slots). The displaced greedy items are dropped.

    Marginals are closed-form, so `propensity` is the exact marginal P(item at slot):
    greedy item at its own slot j < explore_slots: 1 - epsilon; any pool item at such a slot:
    epsilon / |pool|; slots >= explore_slots: 1. With fewer pool items than exploring slots (a
    filtered, short candidate list) only the first |pool| slots explore, so every draw has an item.
    """

    def __init__(self, epsilon: float = 0.1, explore_slots: int = 3) -> None:
        if not 0 <= epsilon <= 1 or explore_slots < 0:  # NaN fails the first test too
            raise ValueError("epsilon must be in [0, 1] and explore_slots >= 0")
        self.epsilon = float(epsilon)
        self.explore_slots = int(explore_slots)
        self.stochastic = self.epsilon > 0 and self.explore_slots > 0
        self.name = f"eps{self.epsilon:g}_s{self.explore_slots}"

    def rank(self, item_ids: Sequence[str], scores: np.ndarray, k: int, rng: np.random.Generator) -> list[Shown]:
        s, k = _check(item_ids, scores, k)
        order = greedy_order(s)
        pool = list(order[k:])
        n_pool = len(pool)
        rng_pool = rng.permutation(pool) if pool else np.array([], dtype=np.int64)
        explore = min(self.explore_slots, n_pool)
        used = 0
        out: list[Shown] = []
        for j, i in enumerate(order[:k]):
            if j < explore:
                if rng.random() < self.epsilon:
                    # A uniformly random permutation read in order = uniform draws without replacement;
                    # each pool item is at slot j with probability 1/|pool| given exploring there.
                    out.append(Shown(item_ids[int(rng_pool[used])], j, _clip(self.epsilon / n_pool)))
                    used += 1
                else:
                    out.append(Shown(item_ids[int(i)], j, _clip(1.0 - self.epsilon)))
            else:
                out.append(Shown(item_ids[int(i)], j, 1.0))
        return out

    def marginals(self, scores: np.ndarray, k: int, rng: np.random.Generator | None = None) -> np.ndarray:
        s = np.asarray(scores, dtype=np.float64)
        k = min(k, len(s))
        order = greedy_order(s)
        pool = order[k:]
        explore = min(self.explore_slots, len(pool))
        m = np.zeros((len(s), k))
        for j in range(k):
            if j < explore:
                m[order[j], j] = 1.0 - self.epsilon
                m[pool, j] = self.epsilon / len(pool)
            else:
                m[order[j], j] = 1.0
        return m

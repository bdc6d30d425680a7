"""A user simulator built from MovieLens-100k that closes the recommend -> click -> learn loop offline.

Why: the continual learner and the exploration policies can only be judged by what they do to
future clicks, and that needs users who react. Ground truth comes from the real data:

* each user's genre taste theta_u = rating-weighted genre shares over ALL of the user's real
  interactions (train and held-out), smoothed towards the global genre mix;
* each item's quality = standardised log popularity + mean rating;
* a global genre trend tau (what is "in" this season), one weight per genre;
* items the user really rated >= 4 get a boost (their held-out real positives stay attractive).

P(click | u, i, slot j) = exam(j) * sigmoid(bias + a_u * cos(theta_u, g_i) + a_t * tau . g_i
                                           + a_q * quality_i + a_h * liked_ui)
with position bias exam(j) = 1 / (1 + j) ** eta (users look less at lower slots).

Drift (`drift()`): tastes rotate - every user's genre shares move to the next genre in a fixed
cyclic order, the trend vector is replaced by another one, old real "likes" stop counting, and
`hot_fraction` of the items are released as new hits (+a_hot logit): they are not candidates before
the drift and have no interaction history (popularity feature 0) when they arrive, so a greedy ranker
that learnt "popular = good" does not show them - only showing them reveals them.

Popularity is live (`LivePopularity`, on by default): the ranker's popularity feature counts the
catalogue's real interactions plus every click the simulated users make on what a system showed
them, as the stream worker's item-popularity table counts behaviour events. What a system shows
therefore changes what its ranker sees next (a hit that gets clicked becomes "popular"; one that is
never shown stays at 0) - the feedback loop that exploration exists to break.

What the ranker sees: item vectors (a fixed random projection of the genre multi-hot plus item
noise, 384-d, unit norm; a stand-in for text embeddings that keeps the bench seconds-fast) and a
context = the mean vector of the user's last real training interactions. By default the context is
fixed (only learning can follow the change); with `LiveSessions` a system's users' contexts follow
the items they clicked in its answers, as the stream worker's session vectors do.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from recstream.models.ranker import AFFINITY_WINDOW, ITEM_DIM, candidate_features, popularity_feature


class SimConfig(BaseModel):
    seed: int = 0
    bias: float = -1.2
    a_user: float = 2.5
    a_trend: float = 2.0
    a_quality: float = 0.5
    a_liked: float = 1.0
    eta: float = Field(1.0, description="Position-bias exponent: exam(j) = 1/(1+j)**eta")
    n_candidates: int = Field(60, description="Candidates per request: retrieval top + random")
    n_random_candidates: int = Field(30, description="Of which uniformly random (so new tastes can surface)")
    context_len: int = AFFINITY_WINDOW
    item_noise: float = Field(0.5, description="Item-specific share of the item vectors")
    hot_fraction: float = Field(0.05, description="Share of items that become hits at the drift")
    a_hot: float = Field(2.0, description="Logit boost of a hit after the drift")
    live_popularity: bool = Field(
        True, description="Clicks in the loop add to the popularity feature (False: the catalogue's counts, fixed)"
    )


@dataclass
class Request:
    """One simulated recommendation request: who, which candidates, and the ranker inputs."""

    user: int
    candidates: np.ndarray  # item indices [n]
    context: np.ndarray  # [768]
    cand_vectors: np.ndarray  # [n, 384]
    cand_features: np.ndarray  # [n, K]


class Simulator:
    """Users with ground-truth click probabilities derived from their real MovieLens interactions."""

    def __init__(self, interactions: pd.DataFrame, items: pd.DataFrame, cfg: SimConfig | None = None) -> None:
        self.cfg = cfg or SimConfig()
        rng = np.random.default_rng(self.cfg.seed)
        self.rng = rng
        self.item_ids = items["item_id"].astype(str).tolist()
        item_index = {iid: n for n, iid in enumerate(self.item_ids)}
        genres_col = items["genres"] if "genres" in items else items["category"]
        genre_lists = [str(g).split() or ["unknown"] for g in genres_col.fillna("unknown")]
        self.genres = sorted({g for gl in genre_lists for g in gl})
        gidx = {g: n for n, g in enumerate(self.genres)}
        n_items, n_genres = len(self.item_ids), len(self.genres)
        g = np.zeros((n_items, n_genres))
        for n, gl in enumerate(genre_lists):
            g[n, [gidx[x] for x in gl]] = 1.0
        self.G = g / g.sum(1, keepdims=True)  # genre shares per item
        self.categories = np.asarray(items["category"].astype(str).tolist(), dtype=object)

        inter = interactions.copy()
        inter["u"] = inter["user_id"].astype(str)
        inter["i"] = inter["item_id"].astype(str).map(item_index)
        inter = inter.sort_values(["u", "ts"], kind="stable")
        self.user_ids = sorted(inter["u"].unique().tolist())
        uidx = {u: n for n, u in enumerate(self.user_ids)}
        inter["un"] = inter["u"].map(uidx)
        rating = inter["rating"].fillna(4.0).to_numpy()
        n_users = len(self.user_ids)

        # Taste: rating-weighted genre shares over all of the user's real interactions, smoothed.
        theta = np.zeros((n_users, n_genres))
        np.add.at(theta, inter["un"].to_numpy(), self.G[inter["i"].to_numpy()] * (rating[:, None] - 2.0).clip(0.5))
        theta = theta / theta.sum(1, keepdims=True)
        glob = self.G.sum(0) / self.G.sum()
        self.theta0 = 0.8 * theta + 0.2 * glob
        counts = np.bincount(inter["i"].to_numpy(), minlength=n_items).astype(np.float64)
        mean_r = np.bincount(inter["i"].to_numpy(), weights=rating, minlength=n_items) / np.maximum(counts, 1)
        lp = np.log1p(counts)
        self.counts = counts
        self.quality = (lp - lp.mean()) / (lp.std() + 1e-9) * 0.5 + (mean_r - 3.5).clip(-2, 2) * 0.5
        liked = inter[rating >= 4]
        self.liked = [set() for _ in range(n_users)]
        for un, i in zip(liked["un"].to_numpy(), liked["i"].to_numpy(), strict=True):
            self.liked[un].add(int(i))
        # The user's real history (all but the last interaction = "training" part) forms the context.
        seqs = inter.groupby("un")["i"].apply(lambda s: s.to_numpy()).reindex(range(n_users))
        self.history = [np.asarray(s[:-1] if len(s) > 1 else s, dtype=np.int64) for s in seqs]

        # Item vectors: fixed random projection of genres + item-specific noise, unit norm.
        proj = rng.normal(size=(n_genres, ITEM_DIM))
        vec = self.G @ proj + self.cfg.item_noise * rng.normal(size=(n_items, ITEM_DIM))
        self.item_vectors = (vec / np.linalg.norm(vec, axis=1, keepdims=True)).astype(np.float32)
        ctx = np.zeros((n_users, ITEM_DIM), dtype=np.float32)
        for u, h in enumerate(self.history):
            v = self.item_vectors[h[-self.cfg.context_len :]].mean(0)
            ctx[u] = v / (np.linalg.norm(v) + 1e-9)
        self.user_context = ctx
        self.trend0 = rng.normal(0, 1, n_genres)
        self.theta = self.theta0.copy()
        self.trend = self.trend0.copy()
        self.liked_on = True
        self.drifted = False
        # Items that become hits at the drift (new favourites nobody's history predicts: only
        # showing them reveals them, which is what exploration is for).
        hot_rng = np.random.default_rng(self.cfg.seed + 2)
        self.hot = np.zeros(n_items)
        self.hot[hot_rng.choice(n_items, round(self.cfg.hot_fraction * n_items), replace=False)] = 1.0
        # The hits are *new releases*: not in the catalogue before the drift, no interaction history
        # (popularity feature 0) after it - the classic blind spot of a greedy learner.
        self.feature_counts = np.where(self.hot > 0, 0.0, counts)
        self._affinity_cache: np.ndarray | None = None

    # ---- ground truth -------------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def exam(self, positions: np.ndarray) -> np.ndarray:
        return 1.0 / (1.0 + np.asarray(positions, dtype=np.float64)) ** self.cfg.eta

    def relevance(self, user: int, items: np.ndarray) -> np.ndarray:
        """P(click | examined) for one user and items (no position bias)."""
        c = self.cfg
        th = self.theta[user]
        gi = self.G[items]
        cos = (gi @ th) / (np.linalg.norm(gi, axis=1) * np.linalg.norm(th) + 1e-12)
        liked = np.array([i in self.liked[user] for i in items], dtype=np.float64) if self.liked_on else 0.0
        logit = c.bias + c.a_user * cos + c.a_trend * (gi @ self.trend) + c.a_quality * self.quality[items]
        hot = c.a_hot * self.hot[items] if self.drifted else 0.0
        return 1.0 / (1.0 + np.exp(-(logit + c.a_liked * liked + hot)))

    def click_probability(self, user: int, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self.relevance(user, items) * self.exam(positions)

    def clicks(self, user: int, items: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return (self.rng.random(len(items)) < self.click_probability(user, items, positions)).astype(np.float64)

    def drift(self) -> None:
        """Tastes change: genre shares rotate by one genre, a new trend, old real likes fade, and a
        few random items become hits."""
        self.theta = np.roll(self.theta0, 1, axis=1)
        self.trend = np.random.default_rng(self.cfg.seed + 1).normal(0, 1, len(self.genres))
        self.liked_on = False
        self.drifted = True

    # ---- what the ranker sees ------------------------------------------------------------------
    def session_context(self, user: int, session: np.ndarray) -> np.ndarray:
        """The context vector of the user's real history followed by `session` (items clicked in the
        loop, oldest first): the mean of the newest context_len items, unit norm."""
        if len(session) == 0:
            return self.user_context[user]
        recent = np.concatenate([self.history[user], session])[-self.cfg.context_len :]
        v = self.item_vectors[recent].mean(0)
        return (v / (np.linalg.norm(v) + 1e-9)).astype(np.float32)

    def request(self, user: int, rng: np.random.Generator | None = None, session: np.ndarray | None = None) -> Request:
        """Candidates (retrieval top by context cosine + random) and the ranker's input tensors.

        session: items the user clicked in the loop, oldest first (`LiveSessions`); they move the
        context, count among the recent categories, and are not recommended again."""
        rng = rng or self.rng
        c = self.cfg
        clicked = np.asarray(session if session is not None else [], dtype=np.int64)
        ctx = self.session_context(user, clicked)
        sims = self.item_vectors @ ctx
        seen = np.concatenate([self.history[user], clicked]) if len(clicked) else self.history[user]
        unreleased = np.flatnonzero(self.hot) if not self.drifted else np.zeros(0, dtype=np.int64)
        sims_masked = sims.copy()
        sims_masked[seen] = -np.inf
        sims_masked[unreleased] = -np.inf
        n_top = c.n_candidates - c.n_random_candidates
        top = np.argpartition(-sims_masked, n_top)[:n_top]
        pool = np.setdiff1d(np.arange(self.n_items), np.concatenate([top, seen, unreleased]))
        rand = rng.choice(pool, size=min(c.n_random_candidates, len(pool)), replace=False)
        cand = np.concatenate([top, rand]).astype(np.int64)
        feats = candidate_features(
            sims[cand],
            self.feature_counts[cand],
            self.categories[cand].tolist(),
            self.categories[seen[-c.context_len :]].tolist(),
            float(self.counts.max()),
        )
        context = np.concatenate([ctx, np.zeros(ITEM_DIM, dtype=np.float32)]).astype(np.float32)
        return Request(user, cand, context, self.item_vectors[cand], feats)

    def ndcg_at_k(self, user: int, candidates: np.ndarray, order: np.ndarray, k: int = 10) -> float:
        """NDCG@k of a shown order over the candidates, graded by true relevance (drift-aware)."""
        rel = self.relevance(user, candidates)
        disc = 1.0 / np.log2(np.arange(2, k + 2))
        dcg = float((rel[order[:k]] * disc[: len(order[:k])]).sum())
        ideal = float((np.sort(rel)[::-1][:k] * disc[: min(k, len(rel))]).sum())
        return dcg / ideal if ideal > 0 else 0.0


class LivePopularity:
    """One system's view of item popularity: the catalogue's counts plus the clicks its own answers
    earned. Each system under test keeps its own (what it showed decides what it learns is popular)."""

    def __init__(self, sim: Simulator) -> None:
        self.counts = sim.feature_counts.copy()
        self.live = sim.cfg.live_popularity

    def add(self, items: np.ndarray, clicks: np.ndarray) -> None:
        """Clicks on shown items (impressions without a click do not count, as in the stream)."""
        if self.live:
            np.add.at(self.counts, np.asarray(items, dtype=np.int64), np.asarray(clicks, dtype=np.float64))

    def view(self, req: Request) -> Request:
        """The request with its popularity feature computed from these counts."""
        if not self.live:
            return req
        feats = req.cand_features.copy()
        feats[:, 1] = popularity_feature(self.counts[req.candidates], float(self.counts.max()))
        return replace(req, cand_features=feats)


class LiveSessions:
    """One system's view of its users' sessions: the items each user clicked in its answers, oldest
    first. With it the context follows the clicks, as the stream worker's session vector follows
    behaviour events (what a system shows decides where its users' sessions, and so its retrieval,
    go next); clicked items are not recommended again, as the worker hides seen items. Off: every
    request uses the user's fixed real history."""

    def __init__(self, live: bool) -> None:
        self.live = live
        self.clicked: dict[int, list[int]] = {}

    def items(self, user: int) -> np.ndarray | None:
        return np.asarray(self.clicked[user], dtype=np.int64) if self.live and user in self.clicked else None

    def add(self, user: int, items: np.ndarray, clicks: np.ndarray) -> None:
        """The clicked ones of a shown list, in slot order."""
        if self.live:
            picked = [int(i) for i, c in zip(items, clicks, strict=True) if c > 0]
            if picked:
                self.clicked.setdefault(user, []).extend(picked)


def load_simulator(cfg: SimConfig | None = None, dataset: str = "ml-100k") -> Simulator:
    """The simulator over a recstream.data data set (MovieLens-100k by default)."""
    from recstream.data import load_dataset

    data = load_dataset(dataset)
    return Simulator(data.interactions, data.items, cfg)

"""Second-stage ranker: a small MLP over precomputed vectors and cheap per-candidate features.

Per candidate the cost is a few dot products plus a ~150k-parameter MLP, so 100 candidates take well
under a millisecond of compute; the request budget goes to transport, not to the model.

Parity rule: `build_features` is the ONLY place the MLP input is assembled. Training, in-process
scoring (`Ranker.score`) and the Triton python backend (model_repo/ranker/<v>/model.py) all call
`RankerNet.forward`, which calls it, so the three paths cannot drift. The raw per-candidate
features (`candidate_features`) are also computed by one function, used by training and workers.

Wire form (one request):
    CONTEXT       float32 [CONTEXT_DIM]        session vector (384) ++ query vector (384, zeros = none)
    CANDIDATES    float32 [n, ITEM_DIM]        candidate item vectors (from Qdrant / the item tower)
    CAND_FEATURES float32 [n, N_CAND_FEATURES] see CAND_FEATURE_NAMES
    SCORES        float32 [n]                  higher = better (logits)
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn

from recstream.models.co_visitation import (
    CO_VISIT_WINDOW,
    FOLLOW_LAG_DECAY,
    FOLLOW_LAGS,
    FOLLOW_RECENCY_DECAY,
    FOLLOW_WINDOW,
    CoVisitation,
)
from recstream.models.training import (
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
    set_seed,
)
from recstream.recommend.trending import DAY_S, TREND_DAYS, trend_days

log = logging.getLogger(__name__)

ITEM_DIM = 384
CONTEXT_DIM = 2 * ITEM_DIM
CAND_FEATURE_NAMES = (
    "retrieval_score",
    "log_popularity",
    "category_affinity",
    "same_category_as_last",
    "trending",
    "co_visitation",
    "follows",
)
N_CAND_FEATURES = len(CAND_FEATURE_NAMES)
AFFINITY_WINDOW = 20  # recent items that define the session's category affinity
TREND_NORM = float(np.log1p(200.0))
#: The follows feature is log1p(FOLLOW_SCALE * the summed share): shares of a few per cent map to ~1.
FOLLOW_SCALE = 100.0
VEC_SCALE = float(ITEM_DIM) ** 0.5
PROD_SCALE = float(ITEM_DIM)
FEATURE_SCHEMA = {
    "version": 6,
    "trend": "distinct-user interactions in the 7 UTC days before the request's day",
    "popularity": "distinct (user, item) interactions",
    "co_visitation": f"log1p of the summed item-knn similarity to the last {CO_VISIT_WINDOW} history items",
    "follows": f"log1p({FOLLOW_SCALE:g} x how much the candidate followed the last {FOLLOW_WINDOW} history items "
    f"(within {FOLLOW_LAGS} positions, lag decay {FOLLOW_LAG_DECAY}, recency decay {FOLLOW_RECENCY_DECAY}))",
    "scales": {"item": VEC_SCALE, "products": PROD_SCALE},
    "context": ["session[384]", "query[384]"],
    "item_dim": ITEM_DIM,
    "cand_features": list(CAND_FEATURE_NAMES),
    "derived": ["item", "session*item", "query*item", "session.item", "query.item", "has_query"],
    "affinity_window": AFFINITY_WINDOW,
}
N_MLP_INPUTS = 3 * ITEM_DIM + 3 + N_CAND_FEATURES
N_SCALAR_FEATURES = 3 + N_CAND_FEATURES  # session.item, query.item, has_query, cand features (the tail)


def feature_schema_hash(schema: dict | None = None) -> str:
    """Hash of the feature layout; a ranker refuses inputs built for another layout."""
    blob = json.dumps(schema or FEATURE_SCHEMA, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


#: Where a ranker version's meta.json (`extra`) keeps how many of each list's slots it fills from its
#: co-visitation statistic (chosen on validation; serving reads it for the version Triton serves).
CO_VISITED_SLOTS = "co_visitation_candidates"


#: The same for the slots filled with the items that most followed the session's last items.
FOLLOW_SLOTS = "follows_candidates"


#: Whether the version's lists place the candidates nobody has interacted with by retrieval (the
#: cold-start rule, `recstream.recommend.rerank.new_item_order`) or let the ranker order them like the
#: rest: chosen on the data set's validation by `make train` (recstream.training.new_items). A
#: version without the key places them.
PLACES_NEW_ITEMS = "places_new_items"


def places_new_items(meta: CheckpointMeta | None) -> bool:
    """Whether a ranker version's lists place new items by retrieval (`PLACES_NEW_ITEMS`)."""
    return meta is None or bool(meta.extra.get(PLACES_NEW_ITEMS, True))


def co_visited_slots(meta: CheckpointMeta | None, co_visitation: CoVisitation | None) -> int:
    """Slots a ranker version fills from its co-visitation statistic: none without the statistic."""
    if meta is None or co_visitation is None:
        return 0
    return int(meta.extra.get(CO_VISITED_SLOTS, 0))


def follow_slots(meta: CheckpointMeta | None, co_visitation: CoVisitation | None) -> int:
    """Slots a ranker version fills from its statistic's follows: none without them."""
    if meta is None or co_visitation is None or co_visitation.follows is None:
        return 0
    return int(meta.extra.get(FOLLOW_SLOTS, 0))


class FeatureSchemaMismatch(RuntimeError):
    """The weights were trained on a different feature layout than this code builds."""


# --- features ----------------------------------------------------------------------------------


def build_features(context: torch.Tensor, candidates: torch.Tensor, cand_features: torch.Tensor) -> torch.Tensor:
    """MLP input [B, n, N_MLP_INPUTS] from context [B, 768], candidates [B, n, 384], features [B, n, K]."""
    session = context[:, :ITEM_DIM].unsqueeze(1)  # [B, 1, d]
    query = context[:, ITEM_DIM:].unsqueeze(1)
    has_query = (query.abs().sum(-1, keepdim=True) > 0).to(candidates.dtype).expand(-1, candidates.shape[1], -1)
    s_i = session * candidates
    q_i = query * candidates
    # unit vectors have per-dimension values ~1/sqrt(d) and products ~1/d: rescale to O(1) so the MLP
    # learns at one learning rate (the dot products are already O(1))
    return torch.cat(
        [
            candidates * VEC_SCALE,
            s_i * PROD_SCALE,
            q_i * PROD_SCALE,
            s_i.sum(-1, keepdim=True),
            q_i.sum(-1, keepdim=True),
            has_query,
            cand_features,
        ],
        dim=-1,
    )


def popularity_feature(counts: np.ndarray, max_count: float) -> np.ndarray:
    """Interactions per candidate on a log scale, 1 = the catalogue's most interacted item."""
    return (np.log1p(np.asarray(counts, dtype=np.float64)) / np.log1p(max(max_count, 1.0))).astype(np.float32)


def candidate_features(
    retrieval_scores: np.ndarray,
    candidate_counts: np.ndarray,
    candidate_categories: Sequence[str],
    recent_categories: Sequence[str],
    max_count: float,
    candidate_recent_counts: np.ndarray | None = None,
    candidate_co_visitation: np.ndarray | None = None,
    candidate_follows: np.ndarray | None = None,
) -> np.ndarray:
    """Raw per-candidate features [n, N_CAND_FEATURES] (float32), in CAND_FEATURE_NAMES order.

    retrieval_scores: session.item cosine from the retrieval stage; candidate_counts: interactions
    seen so far per candidate (0 for a new item); recent_categories: the session's item categories,
    oldest first (the last AFFINITY_WINDOW count); max_count: the largest count in the catalogue;
    candidate_recent_counts: interactions per candidate on the days `trend_days(request time)`;
    candidate_co_visitation: `CoVisitation.scores` of the candidates for the session's history;
    candidate_follows: `CoVisitation.follow_scores` of the same.
    """
    n = len(candidate_categories)
    out = np.zeros((n, N_CAND_FEATURES), dtype=np.float32)
    out[:, 0] = np.asarray(retrieval_scores, dtype=np.float32)
    out[:, 1] = popularity_feature(candidate_counts, max_count)
    recent = list(recent_categories)[-AFFINITY_WINDOW:]
    if recent:
        # An item without a category ("") keeps its place in the window and matches nothing, so a
        # catalogue without categories gives 0 here offline as it does served.
        share: dict[str, float] = {}
        for c in recent:
            if c:
                share[c] = share.get(c, 0.0) + 1.0 / len(recent)
        last = recent[-1]
        out[:, 2] = [share.get(c, 0.0) for c in candidate_categories]
        out[:, 3] = [1.0 if c and c == last else 0.0 for c in candidate_categories]
    if candidate_recent_counts is not None:
        out[:, 4] = np.log1p(np.asarray(candidate_recent_counts, dtype=np.float64)) / TREND_NORM
    if candidate_co_visitation is not None:
        out[:, 5] = np.log1p(np.asarray(candidate_co_visitation, dtype=np.float64))
    if candidate_follows is not None:
        out[:, 6] = np.log1p(FOLLOW_SCALE * np.asarray(candidate_follows, dtype=np.float64))
    return out


# --- the network -------------------------------------------------------------------------------


class RankerConfig(BaseModel):
    hidden: list[int] = Field(default_factory=lambda: [128, 64])
    dropout: float = 0.1
    init_retrieval_weight: float = Field(20.0, description="Start at retrieval order (1 / two-tower temperature)")
    co_visitation_weights: list[float] = Field(
        default_factory=lambda: [0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0],
        description="Starting weights of the co-visitation feature tried on validation before training",
    )
    follows_weights: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
        description="Starting weights of the follows feature tried on validation (after co-visitation's)",
    )
    follows_candidates: list[int] = Field(
        default_factory=lambda: [0, 5, 10, 20],
        description="Slots of the reranked list given to the items that most followed the history's last items "
        "(after the co-visited ones), tried on validation",
    )
    co_visitation_candidates: list[int] = Field(
        default_factory=lambda: [0, 10, 25, 40],
        description="Slots of the reranked list given to the items most co-visited with the history that "
        "retrieval did not bring, tried on validation (0 = retrieval's candidates alone)",
    )
    positions_per_user: int = Field(5, description="Most recent training positions used per user")
    rerank_depth: int = Field(100, description="Candidates from retrieval that the ranker reorders")
    lr: float = Field(5e-4, description="ml-100k: 2e-3 overfits after one epoch; 5e-4 peaks at epoch 2")
    weight_decay: float = 1e-2
    batch_size: int = 128
    epochs: int = 15
    patience: int = 3
    seed: int = 0


class RankerNet(nn.Module):
    """MLP over build_features(...) -> one logit per candidate."""

    def __init__(self, cfg: RankerConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = N_MLP_INPUTS
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)
        # "wide" linear part over the scalar features (dots, cand features). Initialised to the
        # similarity to what the request is about, / temperature, with a zero MLP output: session.item
        # for a recommendation (its retrieval order), plus query.item for a search (a search without a
        # session keeps its retrieval order; with one, the session breaks near-ties of the query). An
        # untrained ranker never ignores a search's query, and training learns corrections on top.
        self.wide = nn.Linear(N_SCALAR_FEATURES, 1)
        with torch.no_grad():
            self.wide.weight.zero_()
            self.wide.bias.zero_()
            self.wide.weight[0, 0] = cfg.init_retrieval_weight
            self.wide.weight[0, 1] = cfg.init_retrieval_weight
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()

    def forward(self, context: torch.Tensor, candidates: torch.Tensor, cand_features: torch.Tensor) -> torch.Tensor:
        """Scores [B, n] for context [B, 768], candidates [B, n, 384], cand_features [B, n, K]."""
        x = build_features(context, candidates, cand_features)
        return (self.mlp(x) + self.wide(x[..., -N_SCALAR_FEATURES:])).squeeze(-1)


class Ranker:
    """Inference wrapper used in-process and inside Triton; refuses a foreign feature schema."""

    WEIGHTS = "ranker.safetensors"
    META = "meta.json"

    def __init__(self, net: RankerNet, meta: CheckpointMeta, co_visitation: CoVisitation | None = None) -> None:
        got = meta.extra.get("feature_schema_hash")
        if got != feature_schema_hash():
            raise FeatureSchemaMismatch(
                f"ranker weights were built for feature schema {got}, this code builds {feature_schema_hash()}"
            )
        self.net = net.eval()
        self.meta = meta
        # the statistic behind the co_visitation feature, saved beside the weights that use it
        self.co_visitation = co_visitation

    @property
    def co_visitation_candidates(self) -> int:
        """Slots of each list filled from the co-visitation statistic (chosen on validation)."""
        return co_visited_slots(self.meta, self.co_visitation)

    @property
    def follows_candidates(self) -> int:
        """Slots of each list filled from the statistic's follows (chosen on validation)."""
        return follow_slots(self.meta, self.co_visitation)

    @property
    def version_tag(self) -> str:
        return str(self.meta.extra.get("version", "0"))

    @torch.inference_mode()
    def score(self, context: np.ndarray, candidates: np.ndarray, cand_features: np.ndarray) -> np.ndarray:
        """One request: context [768], candidates [n, 384], cand_features [n, K] -> scores [n]."""
        return self.score_batch(context[None], candidates[None], cand_features[None])[0]

    @torch.inference_mode()
    def score_batch(self, context: np.ndarray, candidates: np.ndarray, cand_features: np.ndarray) -> np.ndarray:
        """Batched: [B, 768], [B, n, 384], [B, n, K] -> [B, n] float32."""
        ctx = torch.from_numpy(np.ascontiguousarray(context, dtype=np.float32))
        cand = torch.from_numpy(np.ascontiguousarray(candidates, dtype=np.float32))
        feats = torch.from_numpy(np.ascontiguousarray(cand_features, dtype=np.float32))
        if cand.shape[-1] != ITEM_DIM or ctx.shape[-1] != CONTEXT_DIM or feats.shape[-1] != N_CAND_FEATURES:
            raise ValueError(
                f"ranker expects context [{CONTEXT_DIM}], candidates [n, {ITEM_DIM}], features [n, "
                f"{N_CAND_FEATURES}]; got {tuple(ctx.shape)}, {tuple(cand.shape)}, {tuple(feats.shape)}"
            )
        return self.net(ctx, cand, feats).numpy().astype(np.float32)

    def save(self, path: Path) -> Path:
        """Weights (safetensors, tensors only) + meta.json into a folder (e.g. a Triton version dir)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.co_visitation is not None:
            self.co_visitation.save(path)
        # meta.json last: it carries the reuse key, so a save cut short is retrained, never reused
        save_checkpoint(path, {"ranker": self.net.state_dict()}, self.meta)
        return path

    @classmethod
    def load(cls, path: Path) -> Ranker:
        tensors, meta = load_checkpoint(path)
        cfg = RankerConfig.model_validate(meta.config)
        net = RankerNet(cfg)
        net.load_state_dict(tensors["ranker"])
        return cls(net, meta, CoVisitation.load(path))


def new_ranker(cfg: RankerConfig | None = None, data_hash: str = "none", **extra: object) -> Ranker:
    """A randomly initialised ranker with valid metadata (tests, smoke exports)."""
    cfg = cfg or RankerConfig()
    set_seed(cfg.seed)
    meta = CheckpointMeta(
        kind="ranker",
        config=cfg.model_dump(),
        data_hash=data_hash,
        extra={"feature_schema": FEATURE_SCHEMA, "feature_schema_hash": feature_schema_hash(), **extra},
    )
    return Ranker(RankerNet(cfg), meta)


# --- training data from the retrieval model ----------------------------------------------------


class RankingContext:
    """Catalogue statistics the features need (popularity counts, categories) for one training set."""

    def __init__(
        self,
        item_categories: Sequence[str],
        train_seqs: Sequence[np.ndarray],
        n_items: int,
        events: tuple[np.ndarray, np.ndarray] | None = None,
        item_ids: Sequence[str] | None = None,
    ) -> None:
        """events: (item index, unix seconds) of the training interactions, for the trending feature;
        item_ids: the catalogue's ids (index order), which the co-visitation statistic is keyed by."""
        self.categories = np.asarray(item_categories, dtype=object)
        counts = np.bincount(np.concatenate([np.asarray(s) for s in train_seqs if len(s)]), minlength=n_items)
        self.counts = counts.astype(np.float64)
        self.max_count = float(self.counts.max()) if len(self.counts) else 1.0
        ids = list(item_ids) if item_ids is not None else [str(i) for i in range(n_items)]
        self.co_visitation = CoVisitation.fit(train_seqs, ids)
        self._keys: np.ndarray | None = None
        if events is not None:
            items, ts = (np.asarray(a, dtype=np.int64) for a in events)
            days = ts // DAY_S
            self._d0 = int(days.min()) - TREND_DAYS - 1 if len(days) else 0
            self._span = int(days.max()) - self._d0 + 2 if len(days) else 1
            self._keys = np.sort(items * self._span + (days - self._d0))

    def recent_counts(self, cand: np.ndarray, now: float | None) -> np.ndarray | None:
        """Interactions per candidate on the days `trend_days(now)`, from the training events."""
        if self._keys is None or now is None:
            return None
        days = trend_days(now)
        lo_day = int(np.clip(days.start - self._d0, 0, self._span))
        hi_day = int(np.clip(days.stop - self._d0, 0, self._span))
        base = np.asarray(cand, dtype=np.int64) * self._span
        hi = np.searchsorted(self._keys, base + hi_day, side="left")
        lo = np.searchsorted(self._keys, base + lo_day, side="left")
        return (hi - lo).astype(np.float64)

    def features(
        self,
        history: np.ndarray,
        cand: np.ndarray,
        retrieval_scores: np.ndarray,
        now: float | None = None,
        co_visitation: CoVisitation | None = None,
    ) -> np.ndarray:
        """Features of `cand` (item indices) after `history`; `co_visitation`: the statistic to use
        instead of this context's own (a trained ranker's, which is what serving uses)."""
        stat = co_visitation or self.co_visitation
        return candidate_features(
            retrieval_scores,
            self.counts[cand],
            self.categories[cand].tolist(),
            self.categories[np.asarray(history, dtype=np.int64)].tolist(),
            self.max_count,
            self.recent_counts(cand, now),
            stat.scores_idx(history, cand),
            stat.follow_scores_idx(history, cand),
        )


def candidate_slate(
    scores: np.ndarray,
    history: np.ndarray,
    depth: int,
    co_visitation: CoVisitation | None = None,
    n_co: int = 0,
    n_follow: int = 0,
) -> np.ndarray:
    """The `depth` candidates a ranker reorders (item indices, in slate order): the unseen items with
    the best retrieval scores, the last `n_co + n_follow` of them replaced by, first, the unseen
    items most co-visited with the history and, then, those that most followed its last items, none
    of which retrieval ranked above them (retrieval's next items fill what the statistic cannot).
    Serving builds the same slate from the vector store and the ranker's statistic
    (streams/recommend_retrieval.py)."""
    s = np.array(scores, dtype=np.float64, copy=True)
    history = np.asarray(history, dtype=np.int64)
    s[history] = -np.inf
    depth = min(depth, len(s) - 1)
    top = np.argpartition(-s, depth)[:depth]
    top = top[np.argsort(-s[top], kind="stable")]
    if co_visitation is None:
        return top
    n_co = min(max(n_co, 0), depth)
    n_follow = min(max(n_follow, 0), depth - n_co)
    n_extra = n_co + n_follow
    if not n_extra:
        return top
    head = top[: depth - n_extra]
    taken = np.concatenate([history, head])
    co = co_visitation.top_idx(history, n_co, taken)
    follows = co_visitation.follow_top_idx(history, n_follow + len(co), taken)
    extra = np.concatenate([co, follows[~np.isin(follows, co)][:n_follow]]).astype(np.int64)
    # slots the statistic could not fill go back to retrieval's next items
    fill = top[depth - n_extra :][~np.isin(top[depth - n_extra :], extra)][: n_extra - len(extra)]
    return np.concatenate([head, fill, extra])

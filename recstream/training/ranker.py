"""Training the second-stage ranker (offline): training lists from a retrieval model's slates,
the co-visitation choice on validation, the training loop and offline re-ranking. The ranker itself
(features, network, scoring) is recstream.models.ranker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recstream.models.ranker import (
    CAND_FEATURE_NAMES,
    CO_VISITED_SLOTS,
    FOLLOW_SLOTS,
    ITEM_DIM,
    N_CAND_FEATURES,
    N_SCALAR_FEATURES,
    Ranker,
    RankerConfig,
    RankingContext,
    candidate_slate,
    new_ranker,
)
from recstream.models.sequence import SequenceScorer
from recstream.models.sequence_fusion import SequenceFusion, fused_scores, sequence_candidates
from recstream.models.training import EarlyStopping, peak_rss_mb, set_seed
from recstream.recommend.rerank import new_item_order

log = logging.getLogger(__name__)


def truncate_sequences(train_seqs: Sequence[np.ndarray], n_last: int) -> list[np.ndarray]:
    """Each user's training sequence without its last `n_last` items (>= 1 item kept): the training
    set of the out-of-fold retrieval model whose scores the ranker learns from."""
    return [np.asarray(s[: max(1, len(s) - n_last)]) for s in train_seqs]


def split_events(split: object) -> tuple[np.ndarray, np.ndarray]:
    """(item index, ts) of a split's training interactions."""
    train = split.train  # type: ignore[attr-defined]
    return train["item_idx"].to_numpy(np.int64), train["ts"].to_numpy(np.int64)


def split_train_times(split: object) -> list[np.ndarray]:
    """Per user, the timestamps aligned with split.train_seqs."""
    train = split.train  # type: ignore[attr-defined]
    users = train["user_idx"].to_numpy()
    ts = train["ts"].to_numpy(np.int64)
    bounds = np.searchsorted(users, np.arange(len(split.train_seqs) + 1))  # type: ignore[attr-defined]
    return [ts[bounds[u] : bounds[u + 1]] for u in range(len(bounds) - 1)]


def request_times(split: object, users: np.ndarray, histories: Sequence[np.ndarray]) -> list[float | None]:
    """Request time of each case = time of its last history interaction (train, or the valid item)."""
    train_times = split_train_times(split)
    valid = split.valid  # type: ignore[attr-defined]
    valid_ts = dict(zip(valid["user_idx"].tolist(), valid["ts"].tolist(), strict=True))
    out: list[float | None] = []
    for u, h in zip(np.asarray(users).tolist(), histories, strict=True):
        n_train = len(train_times[u])
        if len(h) == n_train + 1 and u in valid_ts:
            out.append(float(valid_ts[u]))
        elif n_train and len(h) <= n_train:
            out.append(float(train_times[u][max(len(h), 1) - 1]))
        else:
            out.append(None)
    return out


def _retrieval_scores(retrieval: object, histories: Sequence[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
    """(session vectors [B, d], full-catalogue retrieval scores [B, n_items]).

    The model's own `score_index` when it has one: the two-tower scores items without training data
    (new / cold) by content on the warm items' scale, which a bare dot product with their text
    vector does not do (that ranks them last: NDCG@10 = 0 on cold targets).
    """
    sess = retrieval.session_vectors_from_index(histories)  # type: ignore[attr-defined]
    score_index = getattr(retrieval, "score_index", None)
    if score_index is not None:
        return sess, np.asarray(score_index(histories))
    return sess, (sess @ retrieval.item_vectors.T).numpy()  # type: ignore[attr-defined]


def _examples(
    retrieval: object,
    ctx: RankingContext,
    histories: Sequence[np.ndarray],
    positives: np.ndarray,
    depth: int,
    times: Sequence[float | None] | None = None,
    n_co: int = 0,
    n_follow: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training lists shaped exactly like serving lists: `candidate_slate` (the top retrieved unseen
    items in retrieval order, `n_co` of them from `ctx`'s co-visitation and `n_follow` from its
    follows), kept only when the positive is among them (otherwise no reranking can reach it).

    Returns (context [N, 768], candidate indices [N, depth], features [N, depth, K], label column [N]).
    Sampling negatives differently from serving teaches the wrong thing: with "positive + the top
    hard negatives" lists the positive always scores below every hard negative unless it is itself
    in the top few, so the ranker learns to demote high retrieval scores.
    """
    sess, scores = _retrieval_scores(retrieval, histories)
    keep, cands, feats, labels = [], [], [], []
    for r, (h, pos) in enumerate(zip(histories, positives, strict=True)):
        top = candidate_slate(scores[r], h, depth, ctx.co_visitation, n_co, n_follow)
        hit = np.flatnonzero(top == pos)
        if not len(hit):
            continue
        keep.append(r)
        cands.append(top)
        labels.append(int(hit[0]))
        feats.append(ctx.features(h, top, scores[r][top], None if times is None else times[r]))
    s_np = sess.numpy()[keep]
    context = np.concatenate([s_np, np.zeros_like(s_np)], axis=1).astype(np.float32)
    return (
        context,
        np.asarray(cands, dtype=np.int64).reshape(len(keep), depth),
        np.asarray(feats, dtype=np.float32).reshape(len(keep), depth, N_CAND_FEATURES),
        np.asarray(labels, dtype=np.int64),
    )


@dataclass
class RankedSlate:
    """One request's served list before the new-item placement: the slate (candidate indices in
    retrieval order, then the sequence model's candidates), the ranker's scores, the sequence
    model's scores of the same candidates (None: not served) and which candidates nobody has
    interacted with."""

    candidates: np.ndarray
    ranker_scores: np.ndarray
    is_new: np.ndarray
    sequence_scores: np.ndarray | None = None
    weight: float = 0.0  # of the sequence model's score in the order

    def order_scores(self, weight: float) -> np.ndarray:
        """What the list is ordered by: the ranker's scores fused with the sequence model's."""
        if self.sequence_scores is None:
            return self.ranker_scores
        return fused_scores(self.ranker_scores, self.sequence_scores, weight)

    def order(self, new_item_slot_factor: float | None = 1.0, weight: float | None = None) -> np.ndarray:
        """Candidate indices in list order, as the worker orders them (`new_item_order`; a factor of
        None places nothing: the ranker orders new items too); `weight` overrides the sequence
        fusion's weight the slate was built with."""
        scores = self.order_scores(self.weight if weight is None else weight)
        if new_item_slot_factor is None:
            return self.candidates[np.argsort(-scores, kind="stable")]
        return self.candidates[new_item_order(scores, self.is_new, new_item_slot_factor)]


def ranked_slates(
    ranker: Ranker,
    retrieval: object,
    ctx: RankingContext,
    histories: Sequence[np.ndarray],
    depth: int = 100,
    times: Sequence[float | None] | None = None,
    sequence: SequenceScorer | None = None,
    fusion: SequenceFusion | None = None,
) -> tuple[np.ndarray, list[RankedSlate]]:
    """(full-catalogue retrieval scores [B, n_items], each request's ranked slate).

    With a `sequence` model (trained on the same catalogue), its best `fusion.candidates` items
    outside the slate and the history join the slate, and the list is ordered by the ranker's
    scores fused with its own (`fusion.weight`); `fusion` defaults to the one it ships with."""
    sess, scores = _retrieval_scores(retrieval, histories)
    # the statistic the ranker ships with, as serving uses it (popularity and trend stay the context's:
    # serving counts them live)
    co_visitation = ranker.co_visitation
    if co_visitation is not None and len(co_visitation.item_ids) != len(ctx.counts):
        raise ValueError(f"ranker's co-visitation covers {len(co_visitation.item_ids)} items, not {len(ctx.counts)}")
    fusion = fusion or (sequence.fusion if sequence is not None else None)
    sequence_scores = None
    if sequence is not None and fusion is not None and fusion.active:
        if len(sequence.item_ids) != len(ctx.counts):
            raise ValueError(f"sequence model covers {len(sequence.item_ids)} items, not {len(ctx.counts)}")
        sequence_scores = sequence.score_index(histories)
    vecs = retrieval.item_vectors.numpy()  # type: ignore[attr-defined]
    n_co, n_follow = ranker.co_visitation_candidates, ranker.follows_candidates
    slates = []
    for r, h in enumerate(histories):
        top = candidate_slate(scores[r], h, depth, co_visitation, n_co, n_follow)
        seq = None
        if sequence_scores is not None:
            extra = sequence_candidates(sequence_scores[r], np.concatenate([h, top]), fusion.candidates)
            top = np.concatenate([top, extra])
            seq = sequence_scores[r][top]
        feats = ctx.features(h, top, scores[r][top], None if times is None else times[r], co_visitation)
        context = np.concatenate([sess[r].numpy(), np.zeros(ITEM_DIM, dtype=np.float32)])
        rs = ranker.score(context, vecs[top], feats).astype(np.float64)
        weight = fusion.weight if fusion is not None else 0.0
        slates.append(RankedSlate(top, rs, ctx.counts[top] == 0, seq, weight))
    return scores, slates


def rerank_scores(
    ranker: Ranker,
    retrieval: object,
    ctx: RankingContext,
    histories: Sequence[np.ndarray],
    depth: int = 100,
    times: Sequence[float | None] | None = None,
    new_item_slot_factor: float | None = 1.0,
    sequence: SequenceScorer | None = None,
) -> np.ndarray:
    """Full-catalogue scores [B, n_items]: the ranker orders the top-`depth` retrieved (unseen) items,
    everything else keeps its retrieval order below them (so metrics stay full-ranking).

    Items without any interaction data (`ctx.counts == 0`: new or cold items) are placed by
    retrieval, at their slot times `new_item_slot_factor`, and the ranker orders the others around
    them, as the worker does (`recstream.recommend.rerank.new_item_order`; None: the ranker orders
    them too, for a version whose validation turned the placement off). A `sequence` model adds its
    candidates and its score as its fusion says (`ranked_slates`).
    """
    scores, slates = ranked_slates(ranker, retrieval, ctx, histories, depth, times, sequence)
    return listed_scores(scores, slates, new_item_slot_factor)


def listed_scores(
    scores: np.ndarray,
    slates: Sequence[RankedSlate],
    new_item_slot_factor: float | None = 1.0,
    weight: float | None = None,
) -> np.ndarray:
    """Full-catalogue scores [B, n_items] of ranked slates: each list in its order above every other
    item, which keeps its retrieval score (`weight`: see `RankedSlate.order`)."""
    out = scores.astype(np.float64)
    for r, slate in enumerate(slates):
        ordered = slate.order(new_item_slot_factor, weight)
        # scores fall with the slot, above every non-candidate
        out[r, ordered] = 1e3 + np.arange(len(ordered), 0, -1, dtype=np.float64)
    return out


def train_ranker(
    cfg: RankerConfig,
    retrieval: object,
    train_seqs: Sequence[np.ndarray],
    item_categories: Sequence[str],
    valid_histories: Sequence[np.ndarray] | None = None,
    valid_targets: np.ndarray | None = None,
    data_hash: str = "none",
    progress: bool = True,
    events: tuple[np.ndarray, np.ndarray] | None = None,
    train_times: Sequence[np.ndarray] | None = None,
    valid_times: Sequence[float | None] | None = None,
    example_retrieval: object | None = None,
    item_ids: Sequence[str] | None = None,
) -> tuple[Ranker, dict[str, float]]:
    """Listwise softmax over [positive + hard retrieved + random] for the last training positions.

    `example_retrieval` builds the training lists: pass a retrieval model fitted WITHOUT each user's
    last `positions_per_user` items (`truncate_sequences`), so the retrieval scores the ranker learns
    from are out-of-sample, as they are at serving time. With the serving model itself, the
    positives are transitions it memorised, their retrieval score is inflated, and the ranker learns
    nothing but "trust retrieval". Early stopping uses full-ranking NDCG@10 of `retrieval` -> rerank
    on the validation cases.

    Before the first epoch the co-visitation feature's weight is chosen on validation from
    `cfg.co_visitation_weights` (a learned MLP starting at weight 0 did not pick the feature up
    within the few epochs it trains before it overfits: 0.1203 -> 0.1201 valid NDCG@10 on ml-100k,
    where a validation-chosen starting weight gave 0.1347); then, with that weight, how many of each
    list's slots go to co-visited items retrieval missed (`cfg.co_visitation_candidates`), and when
    some do, the weight again among the higher ones (where co-occurrence beats the vector search the
    ranker so becomes item-knn over its own candidates); the lists trained on have the slots chosen.
    `item_ids` key the saved statistic.
    """
    from recstream.eval.metrics import metrics_from_ranks, target_ranks

    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = time.perf_counter()
    n_items = retrieval.item_vectors.shape[0]  # type: ignore[attr-defined]
    if cfg.rerank_depth > n_items - 1:
        # a catalogue smaller than the depth is reordered whole, less one (a list leaves an item out)
        cfg = cfg.model_copy(update={"rerank_depth": n_items - 1})
    ctx = RankingContext(item_categories, train_seqs, n_items, events, item_ids)
    hist, pos, when = [], [], []
    for u, s in enumerate(train_seqs):
        for t in range(max(1, len(s) - cfg.positions_per_user), len(s)):
            hist.append(s[:t])
            pos.append(s[t])
            when.append(None if train_times is None else float(train_times[u][t - 1]))
    source, source_ctx = retrieval, ctx
    if example_retrieval is not None:
        # popularity as the out-of-fold model knew it: the positives' own interactions not counted
        source = example_retrieval
        source_ctx = RankingContext(
            item_categories, truncate_sequences(train_seqs, cfg.positions_per_user), n_items, events, item_ids
        )
    ranker = new_ranker(cfg, data_hash)
    ranker.co_visitation = ctx.co_visitation
    net = ranker.net
    stopper = EarlyStopping(patience=cfg.patience)
    best: dict[str, torch.Tensor] | None = None
    stats: dict[str, float] = {}

    def _valid(epoch: int) -> float:
        if valid_histories is None or valid_targets is None:
            return float(epoch)  # no validation: every epoch is "better", so the last one is kept
        net.eval()
        s = rerank_scores(ranker, retrieval, ctx, valid_histories, cfg.rerank_depth, valid_times)
        ranks = target_ranks(s, valid_targets, list(valid_histories))
        return metrics_from_ranks(ranks)["NDCG@10"]

    # epoch 0 = the initialisation: the retrieval order plus the co-visitation weight that does best
    # on validation (0 = the retrieval order itself), then with that weight the number of slots given
    # to co-visited candidates that retrieval missed. The ranker that ships is never worse than
    # retrieval on validation, and where co-occurrence beats the vector search (a sparse catalogue,
    # weak text) the ranker becomes item-knn over its own candidates: an honest fallback, chosen on
    # validation, served by the same path.
    co_col = N_SCALAR_FEATURES - N_CAND_FEATURES + CAND_FEATURE_NAMES.index("co_visitation")
    validating = valid_histories is not None

    def _try(weight: float, n_co: int) -> float:
        with torch.no_grad():
            net.wide.weight[0, co_col] = weight
        ranker.meta.extra[CO_VISITED_SLOTS] = n_co
        value = _valid(0)
        log.info("ranker: co-visitation weight %.2f, %d co-visited candidates: valid NDCG@10 %.4f", weight, n_co, value)
        return value

    by_weight = {w: _try(w, 0) for w in (cfg.co_visitation_weights if validating else [0.0])}
    weight = max(by_weight, key=lambda w: (by_weight[w], -w))
    by_slots = {0: by_weight[weight]}
    by_slots |= {n: _try(weight, n) for n in (cfg.co_visitation_candidates if validating else []) if n > 0}
    n_co = max(by_slots, key=lambda n: (by_slots[n], -n))
    if n_co:  # co-visited candidates earn their slots: their weight may now do better higher
        by_weight = {weight: by_slots[n_co]} | {w: _try(w, n_co) for w in cfg.co_visitation_weights if w > weight}
        weight = max(by_weight, key=lambda w: (by_weight[w], -w))
        by_slots[n_co] = by_weight[weight]
    with torch.no_grad():
        net.wide.weight[0, co_col] = weight
    ranker.meta.extra[CO_VISITED_SLOTS] = n_co
    # then the follows feature's weight (what followed the session's last items), on top of those
    follows_col = N_SCALAR_FEATURES - N_CAND_FEATURES + CAND_FEATURE_NAMES.index("follows")

    def _try_follows(w: float) -> float:
        with torch.no_grad():
            net.wide.weight[0, follows_col] = w
        value = _valid(0)
        log.info("ranker: follows weight %.2f: valid NDCG@10 %.4f", w, value)
        return value

    by_follows = {0.0: by_slots[n_co]} | {w: _try_follows(w) for w in cfg.follows_weights if validating and w != 0}
    follows_weight = max(by_follows, key=lambda w: (by_follows[w], -w))
    with torch.no_grad():
        net.wide.weight[0, follows_col] = follows_weight

    # and the slots given to the items that most followed the session's last items
    def _try_follow_slots(n: int) -> float:
        ranker.meta.extra[FOLLOW_SLOTS] = n
        value = _valid(0)
        log.info("ranker: %d follows candidates: valid NDCG@10 %.4f", n, value)
        return value

    by_follow_slots = {0: by_follows[follows_weight]}
    by_follow_slots |= {n: _try_follow_slots(n) for n in (cfg.follows_candidates if validating else []) if n > 0}
    n_follow = max(by_follow_slots, key=lambda n: (by_follow_slots[n], -n))
    ranker.meta.extra[FOLLOW_SLOTS] = n_follow
    stats["co_visitation_weight"] = weight
    stats["co_visitation_candidates"] = float(n_co)
    stats["follows_weight"] = follows_weight
    stats["follows_candidates"] = float(n_follow)
    stats["valid_ndcg10_epoch0"] = by_follow_slots[n_follow]
    stopper.step(stats["valid_ndcg10_epoch0"], 0)

    context, cands, feats, labels = _examples(
        source, source_ctx, hist, np.asarray(pos), cfg.rerank_depth, when, n_co, n_follow
    )
    vecs = source.item_vectors  # type: ignore[attr-defined]
    log.info(
        "ranker: %d of %d positions have the positive in their list of %d", len(cands), len(hist), cfg.rerank_depth
    )
    ctx_t, feats_t = torch.from_numpy(context), torch.from_numpy(feats)
    labels_t = torch.from_numpy(labels)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best = {k: v.detach().clone() for k, v in net.state_dict().items()}
    for epoch in range(1, cfg.epochs + 1):
        net.train()
        order = rng.permutation(len(cands))
        losses = []
        for lo in tqdm(range(0, len(order), cfg.batch_size), desc=f"ranker epoch {epoch}", disable=not progress):
            b = torch.from_numpy(order[lo : lo + cfg.batch_size])
            logits = net(ctx_t[b], vecs[torch.from_numpy(cands[b.numpy()])], feats_t[b])
            loss = F.cross_entropy(logits, labels_t[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        value = _valid(epoch)
        stats[f"train_loss_epoch{epoch}"] = float(np.mean(losses))
        stats[f"valid_ndcg10_epoch{epoch}"] = value
        log.info("ranker epoch %d loss %.4f valid NDCG@10 %.4f", epoch, np.mean(losses), value)
        if stopper.step(value, epoch):
            best = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if stopper.should_stop:
            break
    if best is not None:
        net.load_state_dict(best)
    net.eval()
    stats.update(
        train_seconds=time.perf_counter() - t0,
        peak_rss_mb=peak_rss_mb(),
        best_epoch=float(stopper.best_step),
        valid_ndcg10=float(stopper.best or 0.0) if valid_histories is not None else float("nan"),
        n_lists=float(len(cands)),
        n_positions=float(len(hist)),
    )
    ranker.meta.metrics.update({k: v for k, v in stats.items() if not k.startswith(("train_loss", "valid_ndcg10_"))})
    return ranker, stats


def out_of_fold_retrieval(
    split: object, retrieval_cfg: object, n_last: int, path: Path, item_texts: Sequence[str]
) -> object:
    """The retrieval model the ranker learns from: the serving model's config, trained without each
    user's last `n_last` training items, validated on the first of them, on `item_texts` (the texts
    serving encodes). Cached at `path` (reused when it was trained on exactly these sequences,
    texts, config and code)."""
    from recstream.models.two_tower import TwoTowerConfig
    from recstream.training.two_tower import TwoTowerData, cached_two_tower

    cfg = TwoTowerConfig.model_validate(retrieval_cfg.model_dump())  # type: ignore[attr-defined]
    full = split.train_seqs  # type: ignore[attr-defined]
    seqs = truncate_sequences(full, n_last)
    users = [u for u, s in enumerate(full) if len(s) > n_last]
    targets = np.array([full[u][len(seqs[u])] for u in users], dtype=np.int64)
    cats = split.data.items.set_index("item_id").loc[split.item_ids, "category"].astype(str).tolist()  # type: ignore[attr-defined]
    data = TwoTowerData(seqs, list(item_texts), [seqs[u] for u in users], targets, cats, split.item_ids)  # type: ignore[attr-defined]
    return cached_two_tower(cfg, data, path)[0]

"""Training the two-tower retrieval model (offline): next-item windows, the training loop, and
the quality-bench adapter. The model itself (towers, save/load, export) is recstream.models.two_tower.

Training is next-item prediction with a full-catalogue softmax (InfoNCE with temperature). To fit on
two CPU cores: item vectors come from a cache that is refreshed every epoch, and in each step only a
sample of the batch's unique target items is re-encoded with gradients (their fresh vectors replace
the cached rows), so the text transformer sees a few dozen short texts per step instead of the whole
catalogue; item text is pre-tokenised once and truncated to `max_text_len` tokens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from recstream.models.training import CheckpointMeta, EarlyStopping, peak_rss_mb, read_meta, set_seed
from recstream.models.two_tower import FineTune, TwoTowerConfig, TwoTowerModel, ensure_nonempty, pad_histories

log = logging.getLogger(__name__)

#: The code a trained two-tower follows in its cache key (recstream.models.code_hash): this module
#: and what it imports, plus the split that builds its sequences and validation cases.
TWO_TOWER_CODE = ("recstream.training.two_tower", "recstream.data.split")


# --- training ----------------------------------------------------------------------------------


def _sample_windows(
    seqs: Sequence[np.ndarray], max_len: int, per_user: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Training windows of up to max_len+1 items; half end at the newest item (what we predict)."""
    out: list[np.ndarray] = []
    for s in seqs:
        if len(s) < 2:
            continue
        for w in range(per_user):
            if w == 0 or len(s) <= max_len + 1 or rng.random() < 0.5:
                end = len(s)
            else:
                end = int(rng.integers(max_len + 1, len(s) + 1))
            out.append(s[max(0, end - max_len - 1) : end])
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def _all_windows(seqs: Sequence[np.ndarray], max_len: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Non-overlapping windows of max_len+1 items from each sequence's end: every transition once."""
    out: list[np.ndarray] = []
    for s in seqs:
        end = len(s)
        while end >= 2:
            out.append(s[max(0, end - max_len - 1) : end])
            end -= max_len
    order = rng.permutation(len(out))
    return [out[i] for i in order]


def evaluate_retrieval(
    model: TwoTowerModel,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    k: int = 10,
    batch_size: int = 512,
) -> dict[str, float]:
    """Full-ranking NDCG@k / HR@k with the history excluded (same rules as recstream.eval.metrics)."""
    from recstream.eval.metrics import metrics_from_ranks, target_ranks

    ranks = []
    for lo in range(0, len(histories), batch_size):
        h = list(histories[lo : lo + batch_size])
        ranks.append(target_ranks(model.score_index(h), targets[lo : lo + batch_size], h))
    return metrics_from_ranks(np.concatenate(ranks) if ranks else np.zeros(0), ks=(k, 50))


def train_two_tower(
    cfg: TwoTowerConfig,
    train_seqs: Sequence[np.ndarray],
    item_texts: Sequence[str],
    valid_histories: Sequence[np.ndarray] | None = None,
    valid_targets: np.ndarray | None = None,
    item_categories: Sequence[str] | None = None,
    model_dir: Path | None = None,
    progress: bool = True,
    item_ids: Sequence[str] | None = None,
) -> tuple[TwoTowerModel, dict[str, float]]:
    """Fit both towers on next-item prediction; early-stop on validation NDCG@10 when given.

    Returns the best model (by validation) with its item-vector cache filled, and run statistics.
    """
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t_start = time.perf_counter()
    n_items = len(item_texts)
    model = TwoTowerModel(cfg, model_dir, item_ids if item_ids is not None else [str(i) for i in range(n_items)])
    seen = np.concatenate([np.asarray(x, dtype=np.int64) for x in train_seqs if len(x)])
    model.has_id[np.unique(seen)] = True  # only items with training data get an ID residual
    tokens = model.item_tower.tokenize(item_texts)

    cat_vectors: torch.Tensor | None = None
    item_cat: np.ndarray | None = None
    cat_tokens = None
    if item_categories is not None and cfg.query_prob > 0:
        cats = sorted(set(item_categories))
        cat_index = {c: i for i, c in enumerate(cats)}
        item_cat = np.array([cat_index[c] for c in item_categories], dtype=np.int64)
        cat_tokens = model.item_tower.tokenize(cats)

    text_params = model.item_tower.trainable_parameters()
    groups = [{"params": list(model.session_tower.parameters()), "lr": cfg.lr_session}]
    if text_params and cfg.finetune != "frozen":
        groups.append({"params": text_params, "lr": cfg.text_lr()})
    if model.id_residual is not None:
        groups.append({"params": list(model.id_residual.parameters()), "lr": cfg.lr_id, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    stopper = EarlyStopping(patience=cfg.patience)
    best_state: dict[str, dict[str, torch.Tensor]] | None = None
    best_vectors: torch.Tensor | None = None
    stats: dict[str, float] = {"n_trainable_text_params": float(sum(p.numel() for p in text_params))}
    train_text = cfg.finetune != "frozen"

    def _validate(epoch: int) -> float:
        if valid_histories is None or valid_targets is None:
            return float(epoch)  # no validation: every epoch is "better", so the last one is kept
        m = evaluate_retrieval(model, valid_histories, valid_targets)
        log.info("epoch %d valid NDCG@10=%.4f HR@10=%.4f", epoch, m["NDCG@10"], m["HR@10"])
        stats[f"valid_ndcg10_epoch{epoch}"] = m["NDCG@10"]
        return m["NDCG@10"]

    model.refresh_item_vectors(tokens)
    if valid_histories is not None and cfg.eval_untrained:
        stats["valid_ndcg10_untrained"] = _validate(0)
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        cache = model.text_vectors
        assert cache is not None
        if cat_tokens is not None:
            cat_vectors = model.item_tower.encode_tokens(cat_tokens)
        if cfg.windows == "all":
            windows = _all_windows(train_seqs, cfg.max_history, rng)
        else:
            windows = _sample_windows(train_seqs, cfg.max_history, cfg.windows_per_user, rng)
        n_steps = (len(windows) + cfg.batch_size - 1) // cfg.batch_size
        bar = tqdm(range(n_steps), desc=f"two-tower[{cfg.finetune}] epoch {epoch}", disable=not progress)
        losses = []
        for step in bar:
            batch = windows[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            inputs = [w[:-1] for w in batch]
            outputs = [w[1:] for w in batch]
            length = max(len(x) for x in inputs)
            tgt = np.full((len(batch), length), -100, dtype=np.int64)
            for r, o in enumerate(outputs):
                tgt[r, length - len(o) :] = o
            table = cache
            if train_text:
                uniq = np.unique(tgt[tgt >= 0])
                if len(uniq) > cfg.fresh_items_per_step:
                    uniq = rng.choice(uniq, cfg.fresh_items_per_step, replace=False)
                idx = torch.from_numpy(np.sort(uniq))
                fresh = model.item_tower(tokens["input_ids"][idx], tokens["attention_mask"][idx])
                table = cache.index_copy(0, idx, fresh)
                cache[idx] = fresh.detach()
            keep = torch.from_numpy(rng.random(n_items) >= cfg.id_dropout) if cfg.id_dropout > 0 else None
            table = model.combine(table, keep)
            x, valid = pad_histories(inputs, table, length)
            query = None
            if cat_vectors is not None and item_cat is not None:
                use_q = (rng.random(tgt.shape) < cfg.query_prob) & (tgt >= 0)
                qidx = np.where(use_q, item_cat[np.maximum(tgt, 0)], 0)
                query = cat_vectors[torch.from_numpy(qidx)] * torch.from_numpy(use_q)[..., None]
            sess = model.session_tower(x, ensure_nonempty(valid), query)  # [B, L, d]
            mask = torch.from_numpy(tgt >= 0)
            logits = sess[mask] @ table.T / cfg.temperature  # [n_pos, n_items]
            loss = F.cross_entropy(logits, torch.from_numpy(tgt)[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        stats[f"train_loss_epoch{epoch}"] = float(np.mean(losses))
        model.refresh_item_vectors(tokens if train_text else None)
        value = _validate(epoch)
        if stopper.step(value, epoch):
            best_state = {
                k: {n: t.detach().clone() for n, t in v.items()} for k, v in model.state_for_checkpoint().items()
            }
            best_vectors = model.text_vectors.clone() if model.text_vectors is not None else None
        if stopper.should_stop:
            log.info("early stop after epoch %d (best epoch %d)", epoch, stopper.best_step)
            break
        if cfg.time_budget_s is not None and time.perf_counter() - t_start > cfg.time_budget_s:
            log.info(
                "time budget %.0fs used up after epoch %d (best epoch %d)", cfg.time_budget_s, epoch, stopper.best_step
            )
            stats["stopped_by_time_budget"] = 1.0
            break
    if best_state is not None:
        _restore(model, best_state)
        model.text_vectors = best_vectors
        model.refresh_item_vectors()
    model.eval()
    stats.update(
        train_seconds=time.perf_counter() - t_start,
        peak_rss_mb=peak_rss_mb(),
        best_epoch=float(stopper.best_step),
        valid_ndcg10=float(stopper.best) if valid_histories is not None and stopper.best is not None else float("nan"),
        n_items=float(n_items),
    )
    return model, stats


def _restore(model: TwoTowerModel, state: dict[str, dict[str, torch.Tensor]]) -> None:
    model.session_tower.load_state_dict(state["session_tower"])
    if model.id_residual is not None:
        model.id_residual.weight.data.copy_(state["id_residual"]["weight"])
    if model.cfg.finetune == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model.item_tower.encoder, state["item_adapter"])
    elif model.cfg.finetune == "full":
        model.item_tower.encoder.load_state_dict(state["item_encoder"])


def sequences_key(*sequences: Sequence[np.ndarray]) -> str:
    """Content hash of lists of item sequences."""
    h = hashlib.sha256()
    for seqs in sequences:
        arrays = [np.asarray(s, dtype=np.int64) for s in seqs]
        h.update(np.array([len(a) for a in arrays], dtype=np.int64).tobytes())
        h.update(np.concatenate(arrays).tobytes() if arrays else b"")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class TwoTowerData:
    """What a two-tower is fitted on: sequences, the catalogue's texts and categories, and the
    validation cases early stopping reads."""

    seqs: Sequence[np.ndarray]
    texts: Sequence[str]
    valid_histories: Sequence[np.ndarray]
    valid_targets: np.ndarray
    cats: Sequence[str]
    item_ids: Sequence[object]

    def key(self, cfg: TwoTowerConfig) -> str:
        """What decides the trained model: these inputs, its config and its code."""
        from recstream.models.code_hash import code_version

        parts = [cfg.model_dump(), list(self.texts), list(self.cats), [str(i) for i in self.item_ids]]
        blob = json.dumps([*parts, code_version(*TWO_TOWER_CODE)], default=str)
        blob += sequences_key(self.seqs, self.valid_histories, [np.asarray(self.valid_targets)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_two_tower(
    cfg: TwoTowerConfig, data: TwoTowerData, path: Path
) -> tuple[TwoTowerModel, dict[str, float], str]:
    """`train_two_tower`, or the checkpoint at `path` when it was trained on exactly these inputs with
    this config and code; with its stats and that key."""
    key = data.key(cfg)
    meta = read_meta(path)
    if meta is not None and meta.data_hash == key:
        log.info("reusing %s", path)
        return TwoTowerModel.load(path)[0], dict(meta.metrics), key
    model, stats = train_two_tower(
        cfg, data.seqs, data.texts, data.valid_histories, data.valid_targets, data.cats, item_ids=data.item_ids
    )
    model.save(path, CheckpointMeta(kind="two_tower", config=cfg.model_dump(), data_hash=key, metrics=stats))
    return model, stats, key


# --- quality-bench adapter ---------------------------------------------------------------------


class TwoTowerRecommender:
    """`fit(split)` / `score(users, histories)` adapter for bench/bench_quality.py.

    Reuses the checkpoint in artifacts/ when it was trained on exactly this split (fingerprint in
    meta.json), so the bench does not retrain for minutes on every run; otherwise trains and saves.
    """

    def __init__(
        self, finetune: FineTune = "lora", checkpoint: Path | None = None, seed: int = 0, **overrides: object
    ) -> None:
        self.finetune = finetune
        self.checkpoint = checkpoint
        # the baselines' budget rule (recstream.eval.baselines.EarlyStopConfig): epochs until
        # validation stops rising, never a wall-clock budget
        self.cfg = TwoTowerConfig(finetune=finetune, seed=seed, **{"epochs": 40, "patience": 5, **overrides})  # type: ignore[arg-type]
        self.model: TwoTowerModel | None = None
        self.info: dict[str, object] = {}

    def default_checkpoint(self, split: object) -> Path:
        from recstream.models.training import ARTIFACTS_DIR

        cold = hasattr(split, "cold_items")
        return ARTIFACTS_DIR / f"two_tower_{self.finetune}{'_cold' if cold else ''}" / f"seed{self.cfg.seed}"

    def fit(self, split: object) -> TwoTowerRecommender:
        path = self.checkpoint or self.default_checkpoint(split)
        valid = split.cases("valid")  # type: ignore[attr-defined]
        cats = split.data.items.set_index("item_id").loc[split.item_ids, "category"].astype(str).tolist()  # type: ignore[attr-defined]
        data = TwoTowerData(split.train_seqs, split.item_texts, valid.histories, valid.targets, cats, split.item_ids)  # type: ignore[attr-defined]
        reused = (meta := read_meta(path)) is not None and meta.data_hash == data.key(self.cfg)
        self.model, stats, _ = cached_two_tower(self.cfg, data, path)
        self.info = {"checkpoint": str(path), "reused": reused, **stats}
        if self.model.item_ids != [str(i) for i in split.item_ids]:  # type: ignore[attr-defined]
            raise ValueError(f"{path}: item index differs from the split's; delete it to retrain")
        return self

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        assert self.model is not None, "fit() first"
        return self.model.score_index(histories)


def two_tower_lora(seed: int = 0) -> TwoTowerRecommender:
    return TwoTowerRecommender("lora", seed=seed)


def two_tower_full(seed: int = 0) -> TwoTowerRecommender:
    return TwoTowerRecommender("full", seed=seed)


def two_tower_frozen(seed: int = 0) -> TwoTowerRecommender:
    return TwoTowerRecommender("frozen", seed=seed)

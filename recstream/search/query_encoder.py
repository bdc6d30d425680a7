"""The search query encoder: MiniLM with LoRA adapters, fine-tuned so that a query lands near the
items it is answered with, in the space of the SERVED item vectors (the item encoder's output that
the catalog indexer writes to Qdrant). Item vectors stay fixed: only the query side learns, so a new
query encoder never forces a re-index, and the catalogue's item vectors keep serving recommendations.

Objective: full softmax over the catalogue (q . v_i / temperature) against each training query's
soft label (how often each item answered it in training). Batches mix category queries, drawn in
proportion to how often they occur (as search traffic would), with catalogue titles (known-item
search must not be forgotten). Early stopping on validation NDCG@10 only.

Shipped as a LoRA adapter (a few hundred KB) in `model_repo/text_encoder/<version>/adapter/`; the
Triton model and the in-process fallback both load it over the packaged MiniLM via
`recstream.models.encoder.TextEncoder(adapter_dir=...)`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from recstream.atomic import atomic_write_text
from recstream.eval.metrics import target_ranks
from recstream.eval.stats import ndcg_gains
from recstream.models.training import EarlyStopping, peak_rss_mb, set_seed
from recstream.search.protocol import SearchCases, TrainingPairs

log = logging.getLogger(__name__)


class QueryEncoderConfig(BaseModel):
    """Everything that changes the trained query encoder (stored with it)."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = Field(default_factory=lambda: ["query", "value"])
    max_text_len: int = Field(16, description="Token limit for a query (genre lists and titles fit)")
    lr: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = Field(0.05, description="Softmax temperature over cosine scores")
    batch_size: int = 64
    steps_per_epoch: int = 40
    title_share: float = Field(0.4, description="Share of each batch drawn from catalogue titles")
    epochs: int = 25
    patience: int = 3
    seed: int = 0


def _tower(cfg: QueryEncoderConfig):
    from recstream.models.two_tower import ItemTower, TwoTowerConfig

    return ItemTower(
        TwoTowerConfig(
            finetune="lora",
            lora_r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            lora_targets=list(cfg.lora_targets),
            max_text_len=cfg.max_text_len,
        )
    )


def dense_scores(query_vectors: np.ndarray, item_vectors: np.ndarray) -> np.ndarray:
    return np.asarray(query_vectors, np.float32) @ np.asarray(item_vectors, np.float32).T


def encode_cases(encode, cases: SearchCases) -> np.ndarray:
    """Query vectors of every case, each distinct query encoded once."""
    distinct = sorted(set(cases.queries))
    vecs = encode(distinct)
    row = {q: n for n, q in enumerate(distinct)}
    return vecs[[row[q] for q in cases.queries]]


def ndcg10(scores: np.ndarray, cases: SearchCases) -> float:
    return float(ndcg_gains(target_ranks(scores, cases.targets, cases.exclude)).mean())


def train_query_encoder(
    pairs: TrainingPairs,
    item_vectors: np.ndarray,
    valid: Sequence[SearchCases],
    cfg: QueryEncoderConfig | None = None,
):
    """Fit the LoRA query tower; returns (tower with the best validation weights, stats)."""
    cfg = cfg or QueryEncoderConfig()
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tower = _tower(cfg)
    items = torch.from_numpy(np.asarray(item_vectors, np.float32))
    labels = pairs.labels.tocsr()
    counts = np.asarray(labels.sum(axis=1)).ravel()
    titles = np.flatnonzero(pairs.is_title)
    category = np.flatnonzero(~pairs.is_title)
    if not len(category):
        raise ValueError("no category queries to train on")
    draw_p = counts[category] / counts[category].sum()
    n_titles = round(cfg.batch_size * cfg.title_share) if len(titles) else 0
    tokens = tower.tokenize(pairs.queries)
    params = tower.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    def validate() -> float:
        return float(np.mean([ndcg10(dense_scores(encode_cases(tower.encode, v), item_vectors), v) for v in valid]))

    stopper = EarlyStopping(patience=cfg.patience)
    best = {k: v.detach().clone() for k, v in tower.encoder.state_dict().items() if "lora_" in k}
    stopper.step(validate(), 0)
    t0 = time.perf_counter()
    epochs_run = 0
    for epoch in range(1, cfg.epochs + 1):
        tower.train()
        losses = []
        for _ in range(cfg.steps_per_epoch):
            batch = np.concatenate(
                [
                    rng.choice(category, size=cfg.batch_size - n_titles, p=draw_p),
                    rng.choice(titles, size=n_titles) if n_titles else np.zeros(0, np.int64),
                ]
            )
            target = torch.from_numpy(labels[batch].toarray())
            target = target / target.sum(dim=1, keepdim=True)
            q = tower(tokens["input_ids"][batch], tokens["attention_mask"][batch])
            logp = F.log_softmax(q @ items.T / cfg.temperature, dim=1)
            loss = -(target * logp).sum(dim=1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        epochs_run = epoch
        score = validate()
        log.info("query encoder epoch %d: loss %.4f, valid NDCG@10 %.4f", epoch, np.mean(losses), score)
        if stopper.step(score, epoch):
            best = {k: v.detach().clone() for k, v in tower.encoder.state_dict().items() if "lora_" in k}
        if stopper.should_stop:
            break
    tower.encoder.load_state_dict(best, strict=False)
    tower.eval()
    stats = {
        "valid_ndcg10": float(stopper.best or 0.0),
        "valid_ndcg10_untrained": float(stopper.history[0]),
        "best_epoch": float(stopper.best_step),
        "epochs_run": float(epochs_run),
        "train_s": time.perf_counter() - t0,
        "peak_rss_mb": peak_rss_mb(),
    }
    return tower, stats


#: What a shipped adapter names as its base: the model, not the folder of one machine's copy (every
#: loader passes the base model itself; a stale absolute path was copied into each new version).
ADAPTER_BASE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def save_adapter(tower, out_dir: Path) -> Path:
    """The LoRA adapter only (peft format): what a text_encoder version ships in `adapter/`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for config in tower.encoder.peft_config.values():
        config.base_model_name_or_path = str(tower.model_dir)  # this copy: peft reads its vocabulary
    tower.encoder.save_pretrained(str(out_dir), safe_serialization=True)
    config_file = out_dir / "adapter_config.json"
    saved = json.loads(config_file.read_text())
    saved["base_model_name_or_path"] = ADAPTER_BASE_MODEL
    atomic_write_text(config_file, json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return out_dir

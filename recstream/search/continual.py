"""Continual updates of the search query encoder from live search clicks, behind a promotion gate.

A round takes the searches users clicked (query, clicked item; from the training-examples topic,
which keeps each search's query), holds back the newest share, and continues training the LIVE
adapter (not a fresh one) on the rest: the same full-softmax objective as `make bench-search`,
against the item vectors the store holds now, with a small learning rate and few steps so a round
corrects the live encoder instead of replacing it. The gate is the ranker's rule on the held-back
clicks: the candidate goes live only if its mean reciprocal rank of the clicked item (full
catalogue, dense score) is not below live's minus a tolerance, with enough clicks to judge. A
candidate trained on shuffled clicks learns noise and is refused. Both sides are scored as
`text_encoder` serves them (TextEncoder with the adapter folded in, fp32).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field

from recstream.continual.gate import GateDecision
from recstream.eval.metrics import target_ranks
from recstream.models.encoder import TextEncoder
from recstream.models.training import set_seed

log = logging.getLogger(__name__)


class QueryUpdateConfig(BaseModel):
    min_clicks: int = Field(200, ge=2, description="Search clicks before a round runs")
    holdout_share: float = Field(0.2, gt=0, lt=1, description="Newest clicks held back for the gate")
    min_holdout: int = Field(40, ge=1, description="Below this the held-back window is too small to judge")
    steps: int = Field(60, ge=1)
    batch_size: int = 32
    lr: float = Field(3e-4, description="Smaller than from scratch: a round corrects the live adapter")
    temperature: float = 0.05
    tolerance: float = Field(0.005, ge=0, description="Allowed MRR drop versus live")
    seed: int = 0


@dataclass(frozen=True)
class SearchClick:
    query: str
    item_id: str
    ts_ms: int = 0


def trainable_tower(adapter_dir: Path | None, max_text_len: int = 16):
    """A query tower to continue training: the live adapter over MiniLM, or a fresh LoRA one."""
    from peft import PeftModel

    from recstream.models.two_tower import ItemTower, TwoTowerConfig

    if adapter_dir is None:
        return ItemTower(TwoTowerConfig(finetune="lora", max_text_len=max_text_len))
    tower = ItemTower(TwoTowerConfig(finetune="frozen", max_text_len=max_text_len))
    tower.encoder = PeftModel.from_pretrained(tower.encoder, str(adapter_dir), is_trainable=True)
    for config in tower.encoder.peft_config.values():
        # the shipped config names the base model; peft reads this machine's copy of it
        config.base_model_name_or_path = str(tower.model_dir)
    tower.cfg = tower.cfg.model_copy(update={"finetune": "lora"})
    return tower


def reciprocal_ranks(encode, clicks: Sequence[SearchClick], item_row: dict[str, int], items: np.ndarray) -> np.ndarray:
    """1 / (1 + rank) of each clicked item among all items by the dense score of its query."""
    q = encode([c.query for c in clicks])
    ranks = target_ranks(q @ items.T, np.array([item_row[c.item_id] for c in clicks]))
    return 1.0 / (1.0 + ranks)


@dataclass
class QueryUpdate:
    tower: object
    decision: GateDecision
    trained_on: int
    held_out: int


def update_query_encoder(
    live_adapter: Path | None,
    live_encode,
    clicks: Sequence[SearchClick],
    item_ids: Sequence[str],
    item_vectors: np.ndarray,
    cfg: QueryUpdateConfig | None = None,
) -> QueryUpdate | None:
    """One round; None when there are too few usable clicks. `live_encode` is the served encoder's
    encode (texts -> unit vectors), the gate's reference."""
    cfg = cfg or QueryUpdateConfig()
    row = {str(i): n for n, i in enumerate(item_ids)}
    usable = sorted((c for c in clicks if c.item_id in row), key=lambda c: c.ts_ms)
    if len(usable) < cfg.min_clicks:
        return None
    cut = len(usable) - max(1, round(len(usable) * cfg.holdout_share))
    train, holdout = usable[:cut], usable[cut:]
    set_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    tower = trainable_tower(live_adapter)
    items = torch.from_numpy(np.asarray(item_vectors, np.float32))
    tokens = tower.tokenize([c.query for c in train])
    targets = torch.tensor([row[c.item_id] for c in train])
    opt = torch.optim.AdamW(tower.trainable_parameters(), lr=cfg.lr)
    tower.train()
    for _ in range(cfg.steps):
        batch = torch.from_numpy(rng.integers(0, len(train), size=min(cfg.batch_size, len(train))))
        q = tower(tokens["input_ids"][batch], tokens["attention_mask"][batch])
        loss = F.cross_entropy(q @ items.T / cfg.temperature, targets[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    vectors = np.asarray(item_vectors, np.float32)
    with tempfile.TemporaryDirectory() as tmp:  # the gate scores the candidate as it would be served
        tower.encoder.save_pretrained(tmp, safe_serialization=True)
        cand = reciprocal_ranks(TextEncoder(adapter_dir=tmp).encode, holdout, row, vectors)
    live = reciprocal_ranks(live_encode, holdout, row, vectors)
    stats = {"mrr": float(cand.mean()), "n": float(len(holdout))}
    live_stats = {"mrr": float(live.mean()), "n": float(len(holdout))}
    if len(holdout) < cfg.min_holdout:
        decision = GateDecision(False, f"window too small ({len(holdout)} < {cfg.min_holdout})", stats, live_stats)
    elif stats["mrr"] < live_stats["mrr"] - cfg.tolerance:
        reason = f"MRR {stats['mrr']:.4f} < live {live_stats['mrr']:.4f} - {cfg.tolerance}"
        decision = GateDecision(False, reason, stats, live_stats)
    else:
        decision = GateDecision(True, f"MRR {stats['mrr']:.4f} vs live {live_stats['mrr']:.4f}", stats, live_stats)
    log.info("query encoder round on %d clicks (%d held out): %s", len(train), len(holdout), decision.reason)
    return QueryUpdate(tower, decision, len(train), len(holdout))

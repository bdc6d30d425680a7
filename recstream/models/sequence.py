"""The ID sequence model as a second candidate source: SASRec over the session's item ids.

Why it is served beside the two-tower: on ml-100k an ID-only SASRec is as good alone as the whole
text-aware retrieval + ranker pipeline, and its mistakes differ. `make train` fits one on the same
training data, and chooses on validation (`SequenceFusion`) how many of its best items join each
list the ranker reorders and how much its score weighs in the final order (z-scored ranker score
plus `weight` times its z-scored score). The worker does the same with the Triton model
`sequence_scorer` (streams/recommend_retrieval.py, streams/recommend_ranking.py), and offline
evaluation with `recstream.training.ranker.ranked_slates`.

An item the model never saw in training (new to the catalogue, or cold) has no score: it is never a
sequence candidate and is neutral (z = 0) in the fused order.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from safetensors.torch import load_file, save_file
from torch import nn

from recstream.models.sequence_fusion import ITEM_IDS_FILE, SequenceFusion, left_pad
from recstream.models.training import CheckpointMeta


class SASRecNet(nn.Module):
    """Causal transformer over item ids; item 0 is padding, real items are index + 1. `cfg` needs
    dim, layers, heads, max_len and dropout (`SequenceNetConfig`, or the baseline's training config)."""

    def __init__(self, n_items: int, cfg: Any, text_vectors: np.ndarray | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.item = nn.Embedding(n_items + 1, cfg.dim, padding_idx=0)
        self.text_proj: nn.Linear | None = None
        if text_vectors is not None:
            # row 0 (padding) is a zero text vector, so padding stays zero after the projection
            padded = np.vstack([np.zeros((1, text_vectors.shape[1]), np.float32), text_vectors])
            self.register_buffer("text", torch.as_tensor(padded, dtype=torch.float32))
            self.text_proj = nn.Linear(text_vectors.shape[1], cfg.dim, bias=False)
        self.pos = nn.Embedding(cfg.max_len, cfg.dim)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.heads, dim_feedforward=cfg.dim * 4, dropout=cfg.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)
        self.drop = nn.Dropout(cfg.dropout)
        nn.init.normal_(self.item.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[0].zero_()

    def item_table(self) -> torch.Tensor:
        """[n_items + 1, dim]: the ID embeddings, plus the projected text vectors in the text variant."""
        if self.text_proj is None:
            return self.item.weight
        return self.item.weight + self.text_proj(self.text)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """Hidden state per position [B, L, dim] for left-padded sequences [B, L]."""
        length = seq.shape[1]
        x = F.embedding(seq, self.item_table()) * (self.cfg.dim**0.5) + self.pos(
            torch.arange(length, device=seq.device)
        )
        x = self.drop(x)
        causal = torch.ones(length, length, dtype=torch.bool, device=seq.device).tril()
        key_ok = (seq != 0)[:, None, :] | torch.eye(length, dtype=torch.bool, device=seq.device)[None]
        blocked = ~(causal[None] & key_ok)  # pads attend only to themselves, so no row is empty
        blocked = blocked.repeat_interleave(self.cfg.heads, dim=0)
        return self.norm(self.encoder(x, mask=blocked))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return h @ self.item_table()[1:].T


class SequenceNetConfig(BaseModel):
    """The network's shape (what loading a saved model needs)."""

    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2


class SequenceScorer:
    """A trained SASRec and the item ids of its rows: history rows -> a score per catalogue row
    (NaN for items it has no training data for)."""

    WEIGHTS = "sasrec.safetensors"
    IDS = ITEM_IDS_FILE

    def __init__(
        self, net: SASRecNet, item_ids: Sequence[str], trained: np.ndarray, fusion: SequenceFusion | None = None
    ) -> None:
        if len(trained) != len(item_ids) or net.item.num_embeddings != len(item_ids) + 1:
            raise ValueError(f"{net.item.num_embeddings - 1} rows, {len(item_ids)} ids, {len(trained)} flags")
        self.net = net.eval()
        self.item_ids = [str(i) for i in item_ids]
        self.row_of = {i: r for r, i in enumerate(self.item_ids)}
        self.trained = np.asarray(trained, dtype=bool)
        self.fusion = fusion or SequenceFusion()

    @property
    def max_len(self) -> int:
        return int(self.net.cfg.max_len)

    @torch.inference_mode()
    def score_padded(self, padded: np.ndarray) -> np.ndarray:
        """[B, L] left-padded rows + 1 (0 = padding) -> [B, n_items] float32, NaN where untrained.
        A row without any item scores NaN throughout (nothing to go on)."""
        seq = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.int64))
        out = self.net.logits(self.net(seq)[:, -1]).numpy().astype(np.float32)
        out[:, ~self.trained] = np.nan
        out[~(np.asarray(padded) > 0).any(axis=1)] = np.nan
        return out

    def score_index(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Offline: histories of catalogue rows -> [B, n_items] (rows < 0 are dropped, as serving
        drops ids the model does not know)."""
        kept = [np.asarray(h, dtype=np.int64)[np.asarray(h) >= 0] for h in histories]
        out = np.empty((len(kept), len(self.item_ids)), np.float32)
        for lo in range(0, len(kept), 256):
            out[lo : lo + 256] = self.score_padded(left_pad(kept[lo : lo + 256], self.max_len))
        return out

    def save(self, path: Path, meta: CheckpointMeta) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        state["trained"] = torch.from_numpy(self.trained.astype(np.uint8))
        save_file(state, str(path / self.WEIGHTS))
        (path / self.IDS).write_text(json.dumps(self.item_ids))
        meta.config["net"] = SequenceNetConfig.model_validate(self.net.cfg, from_attributes=True).model_dump()
        meta.config["fusion"] = self.fusion.model_dump()
        (path / "meta.json").write_text(meta.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> SequenceScorer:
        path = Path(path)
        meta = CheckpointMeta.model_validate_json((path / "meta.json").read_text())
        state = load_file(str(path / cls.WEIGHTS))
        trained = state.pop("trained").numpy().astype(bool)
        ids = json.loads((path / cls.IDS).read_text())
        net = SASRecNet(len(ids), SequenceNetConfig.model_validate(meta.config["net"]))
        net.load_state_dict(state)
        return cls(net, ids, trained, SequenceFusion.model_validate(meta.config.get("fusion", {})))

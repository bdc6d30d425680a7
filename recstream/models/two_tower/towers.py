"""The two towers: MiniLM over item text (LoRA, full or frozen) and the causal session transformer
over item vectors, with the padding helpers both training and serving use."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from recstream.models.two_tower.config import TwoTowerConfig


def _default_text_model_dir() -> Path:
    from recstream.models.encoder import default_model_dir

    return default_model_dir()


def mean_pool_normalise(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence-transformers pooling: mask-weighted mean of token states, then unit length."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=-1)


class ItemTower(nn.Module):
    """MiniLM over item text; LoRA (peft) or full fine-tuning, or frozen."""

    def __init__(self, cfg: TwoTowerConfig, model_dir: Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.model_dir = Path(model_dir) if model_dir else _default_text_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        encoder = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        if cfg.finetune == "lora":
            from peft import LoraConfig, get_peft_model

            lcfg = LoraConfig(
                r=cfg.lora_r,
                lora_alpha=cfg.lora_alpha,
                lora_dropout=cfg.lora_dropout,
                target_modules=list(cfg.lora_targets),
                bias="none",
            )
            encoder = get_peft_model(encoder, lcfg)
        elif cfg.finetune == "frozen":
            encoder.requires_grad_(False)
        self.encoder = encoder

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Pre-tokenise once (padded to the longest text, capped at max_text_len)."""
        enc = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.cfg.max_text_len, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # trim padding columns shared by the whole batch: most steps see short titles only
        width = int(attention_mask.sum(1).max().item())
        input_ids, attention_mask = input_ids[:, :width], attention_mask[:, :width]
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return mean_pool_normalise(hidden, attention_mask)

    @torch.no_grad()
    def encode_tokens(self, tokens: dict[str, torch.Tensor], batch_size: int = 256) -> torch.Tensor:
        """Vectors for pre-tokenised texts without gradients (cache refresh, serving)."""
        was_training = self.training
        self.eval()
        out = []
        n = tokens["input_ids"].shape[0]
        for lo in range(0, n, batch_size):
            out.append(self(tokens["input_ids"][lo : lo + batch_size], tokens["attention_mask"][lo : lo + batch_size]))
        self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0, self.cfg.dim)

    def encode(self, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
        """Item (or query) text -> float32 [n, dim], unit rows."""
        if not texts:
            return np.zeros((0, self.cfg.dim), dtype=np.float32)
        return self.encode_tokens(self.tokenize(texts), batch_size).numpy().astype(np.float32)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.encoder.parameters() if p.requires_grad]

    def merged_encoder(self) -> nn.Module:
        """A plain transformers model with LoRA folded in (what the text_encoder serving path loads)."""
        if self.cfg.finetune == "lora":
            import copy

            return copy.deepcopy(self.encoder).merge_and_unload()
        return self.encoder


class SessionTower(nn.Module):
    """Causal transformer over item vectors; the output at position t embeds the session after item t."""

    def __init__(self, cfg: TwoTowerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.in_proj = nn.Linear(cfg.dim, d)
        self.pos = nn.Embedding(cfg.max_history, d)  # index 0 = most recent item
        self.in_norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(
            d,
            cfg.n_heads,
            dim_feedforward=cfg.ff_mult * d,
            dropout=cfg.dropout,
            batch_first=True,
            norm_first=True,
            activation="gelu",
        )
        self.encoder = nn.TransformerEncoder(layer, cfg.n_layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(d)
        self.query_proj = nn.Linear(cfg.dim, cfg.dim)
        self.out_proj = nn.Linear(d, cfg.dim)

    def _attention_mask(self, valid: torch.Tensor) -> torch.Tensor:
        """[B*heads, L, L] bool, True = blocked: causal, padding keys blocked, but every row may
        attend to itself so padded rows stay finite (a fully blocked row is NaN, and NaN values
        leak into valid rows through 0 * NaN in the next layer)."""
        _b, length = valid.shape
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool, device=valid.device), 1)
        blocked = causal[None] | ~valid[:, None, :]
        blocked = blocked & ~torch.eye(length, dtype=torch.bool, device=valid.device)[None]
        return blocked.repeat_interleave(self.cfg.n_heads, dim=0)

    def forward(self, items: torch.Tensor, valid: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """items [B, L, d] left-padded, valid [B, L] bool, query [B, L, d] or [B, d] (zeros = none).

        Returns unit vectors [B, L, d]; row b position t summarises items[b, :t+1].
        """
        b, length, _ = items.shape
        # position counted back from the newest item: the last column is 0
        back = torch.arange(length - 1, -1, -1, device=items.device).clamp(max=self.cfg.max_history - 1)
        x = self.in_proj(items) + self.pos(back)[None]
        x = self.drop(self.in_norm(x)) * valid[..., None]
        h = self.encoder(x, mask=self._attention_mask(valid))
        h = self.out_norm(h)
        out = self.out_proj(h) + items  # residual to the latest item keeps "more like this" easy
        if query is not None:
            if query.dim() == 2:
                query = query[:, None, :].expand(b, length, -1)
            out = out + self.query_proj(query) * (query.abs().sum(-1, keepdim=True) > 0)
        return F.normalize(out, p=2, dim=-1)


def pad_histories(
    histories: Sequence[np.ndarray], item_vectors: torch.Tensor, max_history: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad the last `max_history` items of each history into [B, L, d] vectors and a mask."""
    length = max(1, min(max_history, max((len(h) for h in histories), default=1)))
    idx = np.zeros((len(histories), length), dtype=np.int64)
    valid = np.zeros((len(histories), length), dtype=bool)
    for r, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-length:]
        if len(h):
            idx[r, length - len(h) :] = h
            valid[r, length - len(h) :] = True
    vecs = item_vectors[torch.from_numpy(idx)] * torch.from_numpy(valid)[..., None]
    return vecs, torch.from_numpy(valid)


def ensure_nonempty(valid: torch.Tensor) -> torch.Tensor:
    """An empty history still needs one attendable position (it holds a zero vector)."""
    valid = valid.clone()
    valid[~valid.any(1), -1] = True
    return valid

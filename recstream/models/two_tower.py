"""Two-tower retrieval model: a fine-tuned MiniLM item tower and a sequential session tower.

Item tower: the pretrained sentence encoder over item text (mean pooling, L2-normalised), fine-tuned
either with LoRA adapters on the attention query/value projections or fully. Because items are
embedded from their text, an item that never occurred in training still gets a useful vector (cold
start), and the vectors are exactly what the `text_encoder` Triton model produces once the tuned
weights are exported (`export_item_encoder`).

Session tower: a small causal transformer over the session's item vectors (most recent last, with
positions counted back from the newest item so "recent" means the same thing for any length), plus
an optional query vector fused into the output. The output is L2-normalised so retrieval is cosine
similarity against item vectors (Qdrant, cosine distance).

Training (offline) lives in recstream.training.two_tower; this module is what serving, export and
the continual workers load.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn
from transformers import AutoModel, AutoTokenizer

from recstream.models.training import (
    CheckpointMeta,
    load_checkpoint,
    save_checkpoint,
)

log = logging.getLogger(__name__)

FineTune = Literal["lora", "full", "frozen"]


def _default_text_model_dir() -> Path:
    from recstream.models.encoder import default_model_dir

    return default_model_dir()


class TwoTowerConfig(BaseModel):
    """Everything that changes the trained retrieval model (stored in checkpoint metadata)."""

    finetune: FineTune = Field("lora", description="lora: adapters only; full: all encoder weights; frozen")
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = Field(default_factory=lambda: ["query", "value"])
    max_text_len: int = Field(32, description="Token limit for item text (ML titles+genres fit in ~20)")
    dim: int = 384
    d_model: int = Field(128, description="Session transformer width (384 in/out; narrow inside for CPU)")
    n_layers: int = 2
    n_heads: int = 4
    ff_mult: int = 2
    dropout: float = 0.2
    max_history: int = Field(50, description="Most recent items the session tower sees")
    temperature: float = Field(0.1, description="InfoNCE temperature (ml-100k valid NDCG: 0.05 < 0.1 ~ 0.2)")
    lr_session: float = 1e-3
    lr_text: float | None = Field(None, description="None: 1e-3 for LoRA, 5e-5 for full fine-tuning")
    weight_decay: float = 0.01
    batch_size: int = Field(64, description="Sequences per step")
    fresh_items_per_step: int = Field(32, description="Target items re-encoded with gradients per step")
    windows: Literal["sampled", "all"] = Field(
        "all", description="all: non-overlapping windows covering every training transition once per epoch"
    )
    windows_per_user: int = Field(2, description="With windows='sampled': random windows per user and epoch")
    query_prob: float = Field(0.15, description="Share of positions trained with the target's category as query")
    id_residual: bool = Field(
        True, description="Add a learned per-item vector to the text vector of items seen in training"
    )
    id_dropout: float = Field(0.25, description="Share of items scored text-only per step (cold-start practice)")
    lr_id: float = 3e-3
    eval_untrained: bool = Field(False, description="Also validate before training (costs one evaluation)")
    epochs: int = 20
    patience: int = 3
    time_budget_s: float | None = Field(None, description="Stop after the epoch that exceeds this wall time")
    seed: int = 0
    grad_clip: float = 1.0

    def text_lr(self) -> float:
        if self.lr_text is not None:
            return self.lr_text
        return 1e-3 if self.finetune == "lora" else 5e-5


# --- towers ------------------------------------------------------------------------------------


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


# --- the model ---------------------------------------------------------------------------------


class TwoTowerModel(nn.Module):
    """Both towers, the optional per-item ID residual and the vector caches for full ranking.

    An item's vector is normalise(text_vector + id_residual) for items seen in training and the
    plain text vector otherwise (new or cold items): collaborative signal where there is data,
    text where there is none. ID dropout during training keeps text-only vectors competitive.
    """

    def __init__(self, cfg: TwoTowerConfig, model_dir: Path | None = None, item_ids: Sequence[str] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_tower = ItemTower(cfg, model_dir)
        self.session_tower = SessionTower(cfg)
        self.item_ids: list[str] = [str(i) for i in item_ids]
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        n = len(self.item_ids)
        self.id_residual = nn.Embedding(max(n, 1), cfg.dim) if cfg.id_residual else None
        if self.id_residual is not None:
            nn.init.zeros_(self.id_residual.weight)
        self.has_id = torch.zeros(max(n, 1), dtype=torch.bool)
        self.text_vectors: torch.Tensor | None = None  # [n_items, d] text-tower cache, no grad
        self.item_vectors: torch.Tensor | None = None  # [n_items, d] final vectors (text + ID), no grad

    def combine(self, text_vectors: torch.Tensor, keep_id: torch.Tensor | None = None) -> torch.Tensor:
        """Final item vectors from text vectors [n_items, d] (all catalogue rows, in index order)."""
        if self.id_residual is None:
            return text_vectors
        mask = self.has_id if keep_id is None else self.has_id & keep_id
        return F.normalize(text_vectors + self.id_residual.weight * mask[:, None], p=2, dim=-1)

    # serving API --------------------------------------------------------------------------------

    def embed_items(
        self, texts: Sequence[str], item_ids: Sequence[str] | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Item text -> float32 [n, 384] unit vectors (upsert these into Qdrant).

        With `item_ids`, items known from training get their ID residual added; unknown ids
        (new catalogue items) get the pure text vector.
        """
        vecs = self.item_tower.encode(texts, batch_size)
        if item_ids is None or self.id_residual is None:
            return vecs
        with torch.no_grad():
            out = torch.from_numpy(vecs)
            for r, it in enumerate(item_ids):
                i = self.item_index.get(str(it))
                if i is not None and bool(self.has_id[i]):
                    out[r] = F.normalize(out[r] + self.id_residual.weight[i], dim=0)
        return out.numpy()

    def embed_query(self, text: str) -> np.ndarray:
        """Search text -> float32 [384] (same encoder as items)."""
        return self.item_tower.encode([text])[0]

    @torch.no_grad()
    def embed_sessions(self, histories: Sequence[np.ndarray], queries: np.ndarray | None = None) -> np.ndarray:
        """Session vectors [B, 384] from per-session item-vector arrays [L_i, 384] (oldest first).

        `queries` [B, 384] (zeros where a session has no query) adds search intent.
        """
        self.session_tower.eval()
        length = max(1, min(self.cfg.max_history, max((len(h) for h in histories), default=1)))
        x = np.zeros((len(histories), length, self.cfg.dim), dtype=np.float32)
        valid = np.zeros((len(histories), length), dtype=bool)
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.float32).reshape(-1, self.cfg.dim)[-length:]
            if len(h):
                x[r, length - len(h) :] = h
                valid[r, length - len(h) :] = True
        q = torch.from_numpy(np.asarray(queries, dtype=np.float32)) if queries is not None else None
        out = self.session_tower(torch.from_numpy(x), ensure_nonempty(torch.from_numpy(valid)), q)
        return out[:, -1].numpy().astype(np.float32)

    def embed_session(self, history: np.ndarray, query: np.ndarray | None = None) -> np.ndarray:
        """One session: item vectors [L, 384] (oldest first) -> [384]."""
        q = None if query is None else np.asarray(query, dtype=np.float32)[None]
        return self.embed_sessions([history], q)[0]

    # index-based helpers (training / offline evaluation) ---------------------------------------

    @torch.no_grad()
    def session_vectors_from_index(
        self, histories: Sequence[np.ndarray], item_vectors: torch.Tensor | None = None, batch_size: int = 512
    ) -> torch.Tensor:
        """Session vectors [B, d] for histories given as item indices into the cache."""
        vecs = self.item_vectors if item_vectors is None else item_vectors
        assert vecs is not None, "refresh_item_vectors() first"
        self.session_tower.eval()
        out = []
        for lo in range(0, len(histories), batch_size):
            x, valid = pad_histories(histories[lo : lo + batch_size], vecs, self.cfg.max_history)
            out.append(self.session_tower(x, ensure_nonempty(valid))[:, -1])
        return torch.cat(out) if out else torch.zeros(0, self.cfg.dim)

    @torch.no_grad()
    def refresh_item_vectors(self, tokens: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Re-encode the catalogue text (when tokens are given) and rebuild the final vectors."""
        if tokens is not None:
            self.text_vectors = self.item_tower.encode_tokens(tokens)
        assert self.text_vectors is not None
        self.item_vectors = self.combine(self.text_vectors).detach()
        return self.item_vectors

    def score_index(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Full-catalogue scores [B, n_items] (the retrieval stage, offline): cosine to the session
        vector, and for items without training data the cold-start path (`cold_item_scores`)."""
        s = self.session_vectors_from_index(histories)
        assert self.item_vectors is not None
        scores = (s @ self.item_vectors.T).numpy()
        if self.id_residual is not None and self.text_vectors is not None:
            cold = ~self.has_id.numpy()[: scores.shape[1]]
            if cold.any() and (~cold).any():
                scores[:, cold] = self.cold_item_scores(histories, scores, cold)
        return scores

    @torch.no_grad()
    def cold_item_scores(self, histories: Sequence[np.ndarray], scores: np.ndarray, cold: np.ndarray) -> np.ndarray:
        """Scores for items with no ID residual (new / cold items), on the warm items' scale.

        The session tower is trained against text+ID vectors, so a bare text vector is not
        competitive under it (measured: NDCG@10 = 0 on cold targets). Cold items are instead scored
        by content: cosine between their text vector and the mean text vector of the session's
        recent items, then mapped per session onto the mean/std of the warm items' scores, so
        that they compete evenly with warm items without any cold-specific boost.
        """
        assert self.text_vectors is not None
        tv = self.text_vectors
        prof = torch.stack(
            [
                tv[torch.as_tensor(np.asarray(h[-self.cfg.max_history :], dtype=np.int64))].mean(0)
                if len(h)
                else torch.zeros(tv.shape[1])
                for h in histories
            ]
        )
        content = (F.normalize(prof, dim=-1) @ tv.T).numpy()
        warm = ~cold
        mu_c, sd_c = content[:, warm].mean(1, keepdims=True), content[:, warm].std(1, keepdims=True) + 1e-6
        mu_w, sd_w = scores[:, warm].mean(1, keepdims=True), scores[:, warm].std(1, keepdims=True)
        return (content[:, cold] - mu_c) / sd_c * sd_w + mu_w

    # persistence -------------------------------------------------------------------------------

    def state_for_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        """Session tower always; text encoder only what was trained (adapters or all weights)."""
        out = {"session_tower": self.session_tower.state_dict()}
        if self.cfg.finetune == "lora":
            from peft import get_peft_model_state_dict

            out["item_adapter"] = get_peft_model_state_dict(self.item_tower.encoder)
        elif self.cfg.finetune == "full":
            out["item_encoder"] = self.item_tower.encoder.state_dict()
        if self.id_residual is not None:
            out["id_residual"] = {"weight": self.id_residual.weight, "has_id": self.has_id}
        if self.text_vectors is not None:
            out["item_vectors"] = {"text": self.text_vectors}
        return out

    def save(self, path: Path, meta: CheckpointMeta) -> Path:
        out = save_checkpoint(path, self.state_for_checkpoint(), meta)
        (Path(path) / "item_ids.json").write_text(json.dumps(self.item_ids))
        return out

    @classmethod
    def load(cls, path: Path, model_dir: Path | None = None) -> tuple[TwoTowerModel, CheckpointMeta]:
        tensors, meta = load_checkpoint(path)
        cfg = TwoTowerConfig.model_validate(meta.config)
        ids_file = Path(path) / "item_ids.json"
        model = cls(cfg, model_dir, json.loads(ids_file.read_text()) if ids_file.exists() else ())
        model.session_tower.load_state_dict(tensors["session_tower"])
        if cfg.finetune == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.item_tower.encoder, tensors["item_adapter"])
        elif cfg.finetune == "full":
            model.item_tower.encoder.load_state_dict(tensors["item_encoder"])
        if model.id_residual is not None and "id_residual" in tensors:
            model.id_residual.weight.data.copy_(tensors["id_residual"]["weight"])
            model.has_id = tensors["id_residual"]["has_id"].bool()
        if "item_vectors" in tensors:
            model.text_vectors = tensors["item_vectors"]["text"]
            model.refresh_item_vectors()
        model.eval()
        return model, meta

    def export_item_encoder(self, out_dir: Path) -> Path:
        """A sentence-transformers-layout folder that `TextEncoder(out_dir)` serves unchanged."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.item_tower.merged_encoder().save_pretrained(str(out_dir), safe_serialization=True)
        self.item_tower.tokenizer.save_pretrained(str(out_dir))
        (out_dir / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.cfg.max_text_len, "do_lower_case": False})
        )
        (out_dir / "1_Pooling").mkdir(exist_ok=True)
        (out_dir / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": self.cfg.dim, "pooling_mode_mean_tokens": True})
        )
        return out_dir

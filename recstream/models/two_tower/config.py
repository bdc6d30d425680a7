"""Everything that changes a trained two-tower model, in one pydantic object (stored with each
checkpoint, part of every cache key)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FineTune = Literal["lora", "full", "frozen"]


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

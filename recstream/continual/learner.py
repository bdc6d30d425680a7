"""The continual learner's training step: IPW-weighted pointwise fine-tuning of the ranker with LoRA.

Interface with the ranker (recstream.models.ranker.RankerNet): a torch module scoring
(context [B, 768], candidates [B, n, 384], cand_features [B, n, K]) -> logits [B, n]. We score each
logged impression on its own (n = 1) and fit P(click) with a weighted binary cross-entropy.

Why LoRA (peft) on the ranker's Linear layers, not full fine-tuning: a round trains on a few
thousand fresh impressions; updating all ~150k weights on that little data overfits the newest
window and forgets the rest (the replay buffer fights the same problem from the data side). A
rank-4 adapter has ~6k trainable numbers, so each round is a small, low-rank correction of the
live model; it is cheap on CPU (well under a second per round); and after training the adapter is
merged back (`merge_and_unload`), so a candidate is again a plain RankerNet with the same
state-dict keys - the Triton model.py, the export and the in-process scorer stay unchanged.

Why inverse propensity weights (`ipw_weights`): logged clicks are biased twice - by the logging
policy (items it rarely shows are under-represented: weight 1/propensity) and by position (a user
may skip a relevant item in slot 8 because they never looked: a click's weight is 1/exam(slot)).
Weights are clipped (variance) and normalised to mean 1 (learning rate stays meaningful).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One logged impression, as the learner needs it (built from a TrainingExample or the simulator)."""

    user: str
    item: str
    position: int
    propensity: float
    label: float
    model_version: str | None = None
    ts_ms: int = 0
    cand_features: np.ndarray | None = None  # [K], when the logger computed them at serving time
    context_items: tuple[str, ...] = ()
    request_id: str = ""
    context: np.ndarray | None = None  # [768] CONTEXT the ranker was served with, when logged
    query: str | None = None  # a search's query (its vector is the CONTEXT's second half)
    # (the item's click count, the largest count) just before this example's own click was counted:
    # what a rebuild of its features may know; the counts at round time include its label.
    counts_before: tuple[float, float] | None = None


class FeatureSource(Protocol):
    """Turns examples into the ranker's input tensors; the service and the simulator each have one."""

    def build(self, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(context [B, 768], candidate vectors [B, 384], cand_features [B, K]) as float32."""
        ...


class LearnerConfig(BaseModel):
    mode: Literal["lora", "full"] = Field("lora", description="lora = adapter round; full = (pre)training")
    lora_r: int = 4
    lora_alpha: float = 8.0
    lr: float = 3e-3
    steps: int = 80
    batch_size: int = 256
    weight_decay: float = 0.0
    exam_eta: float = Field(1.0, description="Assumed position bias exam(j) = 1/(1+j)**eta for click weights")
    clip_weight: float = Field(10.0, description="Upper bound of an inverse-propensity weight")
    policy_weighting: bool = Field(
        False, description="Also weight by 1/logging propensity (selection bias); off: see ipw_weights"
    )
    seed: int = 0


def exam_probability(positions: np.ndarray, eta: float) -> np.ndarray:
    return 1.0 / (1.0 + np.asarray(positions, dtype=np.float64)) ** eta


def ipw_weights(
    positions: np.ndarray,
    propensities: np.ndarray,
    labels: np.ndarray,
    eta: float,
    clip: float,
    policy_weighting: bool = True,
) -> np.ndarray:
    """Per-example loss weights: 1/exam(slot) for a click (position bias: the label is censored by
    whether the user looked), times 1/propensity when `policy_weighting` (selection bias of the
    logging policy); clipped at `clip`, then normalised to mean 1.

    The learner trains with policy_weighting off by default: a pointwise click model conditioned
    on the item's features is not biased by *which* items were logged (covariate shift), while
    1/propensity weights of an exploring policy reach the clip constantly and mostly add variance.
    The gate and OPE keep the policy propensities (there they estimate a different policy's value).
    """
    p = np.asarray(propensities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = 1.0 / p if policy_weighting else np.ones_like(p)
    w = w * np.where(y > 0, 1.0 / exam_probability(positions, eta), 1.0)
    w = np.minimum(w, clip)
    return w / w.mean() if len(w) else w


def _tensors(
    examples: Sequence[Example], features: FeatureSource, cfg: LearnerConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    ctx, cand, feats = features.build(examples)
    y = np.array([e.label for e in examples], dtype=np.float32)
    w = ipw_weights(
        np.array([e.position for e in examples]),
        np.array([e.propensity for e in examples]),
        y,
        cfg.exam_eta,
        cfg.clip_weight,
        cfg.policy_weighting,
    ).astype(np.float32)
    return (
        torch.from_numpy(np.ascontiguousarray(ctx, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(cand, dtype=np.float32))[:, None, :],
        torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[:, None, :],
        torch.from_numpy(y),
        torch.from_numpy(w),
    )


@torch.inference_mode()
def predict(net: nn.Module, examples: Sequence[Example], features: FeatureSource) -> np.ndarray:
    """Logits [B] for the examples' (context, item) pairs."""
    if not examples:
        return np.zeros(0, dtype=np.float32)
    ctx, cand, feats = features.build(examples)
    net.eval()
    out = net(
        torch.from_numpy(np.ascontiguousarray(ctx, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(cand, dtype=np.float32))[:, None, :],
        torch.from_numpy(np.ascontiguousarray(feats, dtype=np.float32))[:, None, :],
    )
    return out.reshape(-1).numpy()


def lora_targets(net: nn.Module) -> list[str]:
    """Names of every nn.Linear in the ranker (the layers that get an adapter)."""
    return [name for name, mod in net.named_modules() if isinstance(mod, nn.Linear)]


def fine_tune(
    net: nn.Module,
    examples: Sequence[Example],
    features: FeatureSource,
    cfg: LearnerConfig,
    sample: callable | None = None,  # type: ignore[valid-type]
) -> tuple[nn.Module, dict[str, float]]:
    """Train a copy of `net` and return it (the live net is never touched) with training stats.

    `sample(n)` (optional) draws each mini-batch (e.g. ReplayBuffer.sample); otherwise batches are
    drawn uniformly from `examples`.
    """
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    work = copy.deepcopy(net)
    if cfg.mode == "lora":
        from peft import LoraConfig, get_peft_model

        peft_cfg = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules=lora_targets(work),
            lora_dropout=0.0,
            bias="none",
        )
        model: nn.Module = get_peft_model(work, peft_cfg)
    else:
        model = work
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    losses: list[float] = []
    model.train()
    pool = list(examples)
    for _ in range(cfg.steps):
        if sample is not None:
            batch = sample(cfg.batch_size)
        else:
            idx = rng.choice(len(pool), size=min(cfg.batch_size, len(pool)), replace=False)
            batch = [pool[i] for i in idx]
        if not batch:
            break
        ctx, cand, feats, y, w = _tensors(batch, features, cfg)
        logits = model(ctx, cand, feats).reshape(-1)
        loss = (F.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    if cfg.mode == "lora":
        model = model.merge_and_unload()  # type: ignore[operator]
    model.eval()
    stats = {
        "train_loss_first": losses[0] if losses else float("nan"),
        "train_loss_last": float(np.mean(losses[-10:])) if losses else float("nan"),
        "trainable_params": float(sum(p.numel() for p in params)),
        "steps": float(len(losses)),
    }
    return model, stats

"""Continual fine-tuning: replay buffer, IPW LoRA training step, promotion gate, model registry."""

from recstream.continual.gate import GateConfig, GateDecision, decide, weighted_auc
from recstream.continual.learner import Example, FeatureSource, LearnerConfig, fine_tune, ipw_weights, predict
from recstream.continual.registry import ModelRegistry, TritonModelControl, set_version_policy
from recstream.continual.replay import ReplayBuffer, ReplayConfig

__all__ = [
    "Example",
    "FeatureSource",
    "GateConfig",
    "GateDecision",
    "LearnerConfig",
    "ModelRegistry",
    "ReplayBuffer",
    "ReplayConfig",
    "TritonModelControl",
    "decide",
    "fine_tune",
    "ipw_weights",
    "predict",
    "set_version_policy",
    "weighted_auc",
]

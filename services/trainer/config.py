"""The continual trainer's configuration. Its cadence comes from the settings' trainer section
(TRAINER_* environment variables, `from_settings`); the CLI flags override it."""

from __future__ import annotations

from pydantic import BaseModel, Field

from recstream.config import Settings, setting_default
from recstream.continual import GateConfig, LearnerConfig, ReplayConfig
from recstream.continual.monitor import MonitorConfig
from recstream.contracts.models import RANKER
from recstream.search.continual import QueryUpdateConfig


class OffPolicyGateConfig(BaseModel):
    enabled: bool = Field(True, description="Refuse a candidate the ranking logs say is worse than live")
    window: int = Field(5000, ge=1, description="Newest logged answers kept for the check (~22 KB each in memory)")
    min_ess: float = Field(200.0, gt=0, description="Below this effective sample size the check is skipped")
    target: str = Field("greedy", description="The policy both models are compared under")
    confidence: float = Field(0.95, gt=0, lt=1)


class TrainerConfig(BaseModel):
    group_id: str = "continual-trainer"
    model_name: str = RANKER
    train_every_examples: int = Field(
        setting_default("trainer_train_every_examples"), ge=1, description="New examples that trigger a round"
    )
    train_every_s: float = Field(
        setting_default("trainer_train_every_s"), gt=0, description="Seconds after which a round runs anyway"
    )
    min_examples: int = Field(
        setting_default("trainer_min_examples"), ge=1, description="No round before the buffer holds this many"
    )
    holdout: int = Field(setting_default("trainer_holdout"), ge=1, description="Newest examples held back for the gate")
    keep_versions: int = Field(5, ge=2, description="Version folders kept on disk (rollback targets)")
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)
    ope: OffPolicyGateConfig = Field(default_factory=OffPolicyGateConfig)
    served_inputs_ttl_s: float = Field(
        120.0,
        gt=0,
        description="How long an answer's logged ranker inputs wait for its training examples (the feedback "
        "window, 30 s by default, plus consumer lag)",
    )
    served_inputs_capacity: int = Field(
        50_000, ge=1, description="Answers whose inputs are kept at most (~3.3 KB each: 50k = 4 min at 200/s)"
    )
    search: QueryUpdateConfig = Field(default_factory=QueryUpdateConfig)
    search_every_clicks: int = Field(500, ge=1, description="New search clicks that trigger a query-encoder round")
    search_clicks_kept: int = Field(20_000, ge=1, description="Newest search clicks a round learns from")

    @classmethod
    def from_settings(cls, settings: Settings, **overrides: object) -> TrainerConfig:
        """The trainer's cadence from the settings (TRAINER_*), with `overrides` (None = not given)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return cls(
            **{
                "train_every_examples": settings.trainer_train_every_examples,
                "train_every_s": settings.trainer_train_every_s,
                "min_examples": settings.trainer_min_examples,
                "holdout": settings.trainer_holdout,
                **given,
            }
        )

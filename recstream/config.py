"""One settings object, read from the environment once per entry point and passed down.

Every variable is documented in README.md ("Configuration"); defaults are the embedded local stack.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Runtime configuration. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, frozen=True, extra="ignore")

    # --- kafka -------------------------------------------------------------------------------------------
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers (host:port,...)")
    topic_prefix: str = Field("", description="Prefix for every topic name (isolates tests and tenants)")
    max_message_bytes: int = Field(
        65_536, description="Largest accepted event payload in bytes; events are small, 64 KiB is generous"
    )

    # --- triton ------------------------------------------------------------------------------------------
    triton_url: str = Field("127.0.0.1:8000", description="Triton HTTP endpoint host:port")
    triton_grpc_url: str = Field("127.0.0.1:8001", description="Triton gRPC endpoint host:port")
    triton_timeout_s: float = Field(
        0.25, description="Deadline for one Triton call; past it the ranker answers degraded"
    )
    model_repo: Path = Field(REPO_ROOT / "model_repo", description="Triton model repository")

    # --- vector store ------------------------------------------------------------------------------------
    qdrant_url: str | None = Field(None, description="Qdrant server URL; unset = embedded local mode")
    qdrant_path: Path = Field(REPO_ROOT / "run" / "qdrant", description="On-disk path for Qdrant local mode")

    # --- streams -----------------------------------------------------------------------------------------
    session_refresh_s: float = Field(
        0.05,
        ge=0,
        description="How often the worker re-encodes, in one session-encoder call, the changed sessions of users "
        "who asked in the last 5 minutes, so that their next request finds the session vector ready; `0` = encode "
        "at request time only (one more Triton call per request batch)",
    )
    event_dedupe_ids: int = Field(
        100_000,
        ge=0,
        description="Behaviour `event_id`s remembered per partition; a repeat within them (a client's retry) is "
        "folded once (the last N events of each partition: ~13 min at 500 events/s over 4 partitions); `0` = off",
    )
    feedback_window_s: float = Field(
        30.0,
        gt=0,
        description="How long the feedback joiner waits for a click after an impression before the impression "
        "becomes a no-click training example (a learning policy forgets a shown slot 60 s after that). Windows "
        "open at a restart get a full window again, so the backlog with their clicks is read first",
    )
    new_item_slot_factor: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Where the learned ranker's list puts a candidate nobody has interacted with yet: its retrieval "
        "slot times this factor (`1` = its retrieval slot; `0` = ahead of every known item). Unset: as the served "
        "ranker version says, which is `1` unless its data set's validation found the placement too costly "
        "(a sparse catalogue whose never-interacted items are long tail, not new: then the ranker orders them "
        "like the rest). Lower values show new items more often at a measured cost to the rest of the list "
        "(`make bench-exposure`)",
    )
    sequence_model: bool = Field(
        True,
        description="Whether recommendations use Triton's `sequence_scorer` when it serves one (its candidates and "
        "score join each list as its version's validation choice says; a version that chose the ranker alone, as the "
        "committed v1 did, is never called). It costs about 2 CPU-ms per request "
        "(worker + tritonserver, `make bench-stream`); `false` answers from the vector search, the ranker's "
        "statistic and the ranker alone",
    )
    ranking_log: Literal["all", "exploring", "off"] = Field(
        "all",
        description="What goes to `ranking-log`: `exploring` = the candidate pool of every answer a stochastic "
        "policy drew (for `recstream.ops.cli ope`); `all` = also every greedy answer of the learned ranker, each with "
        "the inputs it was scored from (the continual trainer then learns from exactly what serving saw; ~9 KB "
        "per answer, built after the batch's answers are published: about +0.05 worker cores at 200 requests/s, "
        "latency unchanged within noise); `off`. `true`/`false` mean `exploring`/`off`",
    )
    metrics_port: int = Field(
        0,
        description="Prometheus metrics port for a worker; 0 = no HTTP server (the local stack's worker: 9100 "
        "unless set). A worker stopped by a failed consumer thread exits with status 1, so a restart-on-failure "
        "supervisor restarts it",
    )

    # --- explore -----------------------------------------------------------------------------------------
    exploration_policy: str = Field(
        "greedy",
        description="Recommender ranking policy: `greedy`, `pl:T[:HEAD]` (Plackett-Luce at temperature T over the "
        "diversified list, HEAD greedy slots) or `eps:E[:SLOTS]`; every shown item carries its exact propensity. "
        "`ts:PRIOR[:HALF_LIFE[:GROUP_PRIOR]]` (Thompson sampling of per-item click lifts over the ranker's logits, "
        "Monte-Carlo propensities) and `lift:...` (the same lifts, ranked by posterior mean: learns, never explores "
        "on purpose) learn online: the worker remembers each shown slot and the feedback joiner reports every "
        "closed impression window back (`recstream_policy_feedback_total{outcome}`); what a worker's policy "
        "learned is saved under `run/policy/` every 30 s and at shutdown, and loaded at start. A bad spec fails "
        "at start-up",
    )
    exploration_seed: int | None = Field(None, description="Seed of the policy's random draws")
    policy_feedback_slots: int = Field(
        200_000,
        ge=1_000,
        description="Most shown slots a worker remembers for a learning policy until their feedback window "
        "closes. A slot is forgotten once the window plus 60 s (client delay) has passed, counted as "
        '`recstream_policy_feedback_total{outcome="expired"}` (answers the application never showed), so the '
        "memory follows the request rate; this cap only binds above requests/s x k x (window + 60 s) (200k: "
        '222 req/s at k=10 and a 30 s window), and its evictions count as `outcome="evicted"`',
    )

    # --- gateway -----------------------------------------------------------------------------------------
    api_keys: str = Field(
        "",
        validation_alias=AliasChoices("gateway_api_keys", "api_keys"),
        description="Comma-separated API keys for the gateway; it refuses to start without one",
    )
    cors_origins: str = Field(
        "",
        validation_alias=AliasChoices("gateway_cors_origins", "cors_origins"),
        description="Comma-separated browser origins allowed to call the gateway (`*` = any); empty = no CORS "
        "headers, same-origin only",
    )

    # --- trainer ----------------------------------------------------------------------------------------
    trainer_train_every_examples: int = Field(
        2000, ge=1, description="Continual trainer: new training examples that trigger a fine-tuning round"
    )
    trainer_train_every_s: float = Field(
        300.0, gt=0, description="Continual trainer: seconds after which a round runs anyway (given enough examples)"
    )
    trainer_min_examples: int = Field(500, ge=1, description="Continual trainer: no round before it holds this many")
    trainer_holdout: int = Field(
        400, ge=1, description="Continual trainer: newest examples held back for the promotion gate"
    )

    # --- operations --------------------------------------------------------------------------------------
    run_dir: Path = Field(REPO_ROOT / "run", description="Logs, PID files and local state of the stack")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "recstream",
        validation_alias="RECSTREAM_CACHE_DIR",
        description="Downloads kept outside the clone (Kafka jars, venvs)",
    )
    log_level: str = Field("INFO", description="Log level for every entry point")

    @field_validator("ranking_log", mode="before")
    @classmethod
    def _ranking_log_bool(cls, value: object) -> object:
        """RANKING_LOG=true/false, the setting's earlier boolean form, still works."""
        text = str(value).strip().lower()
        return {"true": "exploring", "1": "exploring", "false": "off", "0": "off"}.get(text, text)

    @field_validator("exploration_policy")
    @classmethod
    def _known_policy(cls, spec: str) -> str:
        """A typo in EXPLORATION_POLICY fails at start-up, not at the first request."""
        from recstream.explore.specs import make_policy

        make_policy(spec)
        return spec

    @property
    def cors_origin_list(self) -> list[str]:
        return [o.strip() for o in self.cors_origins.split(",") if o.strip()]

    @property
    def api_key_list(self) -> list[str]:
        """The gateway's API keys, split and stripped; never logged."""
        return [k.strip() for k in self.api_keys.split(",") if k.strip()]


#: The settings by section, in the class's order (tests/contracts/test_config.py keeps the two equal); the
#: README's configuration table is grouped by them.
SECTIONS: dict[str, tuple[str, ...]] = {
    "kafka": ("kafka_bootstrap", "topic_prefix", "max_message_bytes"),
    "triton": ("triton_url", "triton_grpc_url", "triton_timeout_s", "model_repo"),
    "vector store": ("qdrant_url", "qdrant_path"),
    "streams": (
        "session_refresh_s",
        "event_dedupe_ids",
        "feedback_window_s",
        "new_item_slot_factor",
        "sequence_model",
        "ranking_log",
        "metrics_port",
    ),
    "explore": ("exploration_policy", "exploration_seed", "policy_feedback_slots"),
    "gateway": ("api_keys", "cors_origins"),
    "trainer": ("trainer_train_every_examples", "trainer_train_every_s", "trainer_min_examples", "trainer_holdout"),
    "operations": ("run_dir", "cache_dir", "log_level"),
}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def setting_default(field: str) -> Any:
    """A setting's default, for a config model whose field the setting fills (one source for both)."""
    return Settings.model_fields[field].get_default(call_default_factory=True)


def model_option(model: type[BaseModel], field: str, **kwargs: Any) -> Any:
    """A typer option whose default and help are a pydantic model's field: a CLI flag cannot drift
    from the config it fills."""
    import typer

    info = model.model_fields[field]
    return typer.Option(info.get_default(call_default_factory=True), help=info.description, **kwargs)


def env_name(field: str) -> str:
    """The environment variable a Settings field is read from (its first alias, else its name)."""
    alias = Settings.model_fields[field].validation_alias
    if isinstance(alias, AliasChoices):
        alias = alias.choices[0]
    return str(alias or field).upper()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that makes a child process read `settings`: every field, derived from the
    class (so a new setting cannot be forgotten); a field that is None is removed."""
    env = dict(os.environ)
    for field in Settings.model_fields:
        value = getattr(settings, field)
        if value is None:
            env.pop(env_name(field), None)
        else:
            env[env_name(field)] = str(value)
    env.update(PYTHONPATH=str(REPO_ROOT), HF_HUB_OFFLINE="1")
    return env


def _shown_default(value: object) -> str:
    if value is None:
        return "unset"
    if value == "":
        return "(empty)"
    if isinstance(value, Path):
        if value.is_relative_to(REPO_ROOT):
            value = value.relative_to(REPO_ROOT)
        elif value.is_relative_to(Path.home()):
            value = f"~/{value.relative_to(Path.home())}"
    return f"`{value}`"


def configuration_table() -> str:
    """README's configuration table, made from the fields themselves (tests/contracts/test_config.py keeps the
    README equal to it): `python -m recstream.config` prints it."""
    rows = ["| section | variable | default | meaning |", "| --- | --- | --- | --- |"]
    for section, names in SECTIONS.items():
        for name in names:
            field = Settings.model_fields[name]
            rows.append(
                f"| {section} | `{env_name(name)}` | {_shown_default(field.get_default(call_default_factory=True))} | "
                f"{field.description} |"
            )
    return "\n".join(rows)


if __name__ == "__main__":
    print(configuration_table())

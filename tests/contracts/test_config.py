"""The settings object and the environment that hands it to a child process."""

from __future__ import annotations

from pathlib import Path

import pytest

from recstream.config import Settings, env_name, settings_env


def test_a_child_process_reads_back_every_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """settings_env covers every field (none set by hand to forget): each one, changed from its
    default, comes back equal when Settings is read from the environment it produces."""
    changed = {
        "kafka_bootstrap": "kafka-a:9093,kafka-b:9093",
        "topic_prefix": "tenant7.",
        "triton_url": "triton:18000",
        "triton_grpc_url": "triton:18001",
        "triton_timeout_s": 0.75,
        "qdrant_url": "http://qdrant:6333",
        "qdrant_path": tmp_path / "qdrant",
        "model_repo": tmp_path / "model_repo",
        "run_dir": tmp_path / "run",
        "cache_dir": tmp_path / "cache",
        "max_message_bytes": 4096,
        "session_refresh_s": 0.2,
        "metrics_port": 9555,
        "log_level": "DEBUG",
        "exploration_policy": "eps:0.1",
        "exploration_seed": 11,
        "ranking_log": "off",
        "policy_feedback_slots": 5_000,
        "event_dedupe_ids": 10,
        "feedback_window_s": 2.5,
        "new_item_slot_factor": 0.3,
        "sequence_model": False,
        "api_keys": "k1,k2",
        "cors_origins": "https://shop.example",
        "trainer_train_every_examples": 250,
        "trainer_train_every_s": 5.0,
        "trainer_min_examples": 100,
        "trainer_holdout": 50,
    }
    assert set(changed) == set(Settings.model_fields), "give the new setting a non-default value here"
    defaults = Settings()
    assert all(getattr(defaults, k) != v for k, v in changed.items())
    wanted = defaults.model_copy(update=changed)

    for key, value in settings_env(wanted).items():
        monkeypatch.setenv(key, value)
    assert Settings() == wanted


def test_a_setting_left_unset_is_removed_from_the_child_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QDRANT_URL", "http://stale:6333")
    monkeypatch.setenv("EXPLORATION_SEED", "3")
    env = settings_env(Settings(qdrant_url=None, exploration_seed=None))
    assert "QDRANT_URL" not in env and "EXPLORATION_SEED" not in env
    assert env_name("api_keys") == "GATEWAY_API_KEYS" and env_name("cache_dir") == "RECSTREAM_CACHE_DIR"


def test_the_readme_configuration_table_is_the_generated_one() -> None:
    """Every setting is documented, with its real default: the README's table equals the one made
    from the fields (regenerate with `python -m recstream.config`)."""
    from recstream.config import REPO_ROOT, configuration_table

    assert configuration_table() in (REPO_ROOT / "README.md").read_text(), "README's configuration table is stale"


def test_every_setting_is_in_one_section_in_the_class_order() -> None:
    """The sections list every field once, in the order the class declares them (so the class reads
    section by section, as the README's table does)."""
    from recstream.config import SECTIONS

    listed = [name for names in SECTIONS.values() for name in names]
    assert listed == list(Settings.model_fields)


@pytest.mark.parametrize("spec", ["pl:nan", "pl:inf", "pl:1:-2", "eps:nan", "eps:0.1:-1", "ts:nan", "lift:5:inf"])
def test_an_exploration_policy_that_would_fail_every_request_is_refused_at_start(spec: str) -> None:
    """Such specs passed the settings' check (NaN <= 0 is False; negative slots slice the list from
    its end), and then every request batch failed in the policy and went to the dead-letter topic."""
    from pydantic import ValidationError

    from recstream.config import Settings

    with pytest.raises(ValidationError, match="exploration_policy"):
        Settings(exploration_policy=spec)

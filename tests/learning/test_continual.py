"""Continual learning pieces: replay buffer, IPW weights, the promotion gate, the version registry."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from recstream.continual import (
    Example,
    GateConfig,
    LearnerConfig,
    ModelRegistry,
    ReplayBuffer,
    ReplayConfig,
    decide,
    fine_tune,
    ipw_weights,
    set_version_policy,
    weighted_auc,
)
from recstream.models.export import export_ranker
from recstream.models.ranker import CONTEXT_DIM, ITEM_DIM, N_CAND_FEATURES, RankerConfig, new_ranker

# ---- replay buffer ------------------------------------------------------------------------------


def test_replay_buffer_keeps_old_examples() -> None:
    buf: ReplayBuffer[int] = ReplayBuffer(ReplayConfig(recent_capacity=100, reservoir_capacity=500, seed=0))
    buf.extend(range(10_000))
    assert len(buf) == 500 and len(buf.recent) == 100
    assert buf.latest(3) == [9997, 9998, 9999]
    # The reservoir is a uniform sample of the whole stream: the first half is about half of it.
    old = sum(x < 5000 for x in buf.reservoir)
    assert 200 < old < 300
    batch = buf.sample(200)
    assert sum(x >= 9900 for x in batch) >= 100  # recent_fraction 0.5 from the recency window
    assert sum(x < 5000 for x in batch) > 20  # and old examples are replayed too


def test_replay_sample_excludes_the_held_back_window() -> None:
    buf: ReplayBuffer[int] = ReplayBuffer(ReplayConfig(recent_capacity=50, reservoir_capacity=10_000))
    buf.extend(range(1000))
    batch = buf.sample(400, exclude_latest=20)
    assert not set(batch) & set(range(980, 1000))


# ---- IPW ------------------------------------------------------------------------------------------


def test_ipw_weights_correct_position_and_selection_bias() -> None:
    pos = np.array([0, 3, 0, 3, 0])
    prop = np.array([1.0, 1.0, 0.5, 1.0, 0.01])
    y = np.array([1, 1, 1, 0, 0])
    raw = np.array([1.0, 4.0, 2.0, 1.0, 10.0])  # 1/p * (1/exam for clicks), clipped at 10 (1/0.01 = 100)
    np.testing.assert_allclose(ipw_weights(pos, prop, y, eta=1.0, clip=10.0), raw / raw.mean())
    w = ipw_weights(pos, prop, y, eta=1.0, clip=10.0)
    assert w.mean() == pytest.approx(1.0)
    pos_only = np.array([1.0, 4.0, 1.0, 1.0, 1.0])  # the learner's default: position bias only
    np.testing.assert_allclose(ipw_weights(pos, prop, y, 1.0, 10.0, policy_weighting=False), pos_only / pos_only.mean())


def test_weighted_auc_matches_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    s = rng.integers(0, 5, 60).astype(float)  # many ties
    y = rng.random(60) < 0.4
    w = rng.random(60) + 0.1
    num = den = 0.0
    for i in np.where(y)[0]:
        for j in np.where(~y)[0]:
            num += w[i] * w[j] * (1.0 if s[i] > s[j] else 0.5 if s[i] == s[j] else 0.0)
            den += w[i] * w[j]
    assert weighted_auc(s, y, w) == pytest.approx(num / den)


# ---- learner + gate on synthetic data with a known signal -----------------------------------------


class _Synthetic:
    """Items in 12 clusters of random vectors; P(click) = exam(slot) * sigmoid(cluster appeal)."""

    def __init__(self, n_items: int = 300, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        cluster = rng.integers(0, 12, n_items)
        centers = rng.normal(size=(12, ITEM_DIM))
        v = centers[cluster] + 0.5 * rng.normal(size=(n_items, ITEM_DIM))
        self.vec = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)
        self.rel = 1 / (1 + np.exp(-rng.normal(0, 2.0, 12)[cluster]))
        self.ctx = rng.normal(size=CONTEXT_DIM).astype(np.float32) * 0.05
        self.rng = rng

    def build(self, examples: Sequence[Example]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx = np.array([int(e.item) for e in examples])
        ctx = np.broadcast_to(self.ctx, (len(idx), CONTEXT_DIM))
        return ctx, self.vec[idx], np.zeros((len(idx), N_CAND_FEATURES), np.float32)

    def log(self, n: int) -> list[Example]:
        items = self.rng.integers(0, len(self.vec), n)
        pos = self.rng.integers(0, 5, n)
        clicks = self.rng.random(n) < self.rel[items] / (1 + pos)
        return [Example("u", str(i), int(p), 1.0, float(c)) for i, p, c in zip(items, pos, clicks, strict=True)]


@pytest.fixture(scope="module")
def trained() -> tuple[_Synthetic, torch.nn.Module, list[Example], list[Example]]:
    src = _Synthetic()
    base = new_ranker(RankerConfig(seed=0)).net
    warm = src.log(3000)
    live, _ = fine_tune(base, warm, src, LearnerConfig(mode="full", steps=150, lr=2e-3))
    return src, live, src.log(6000), src.log(3000)


def test_gate_accepts_a_genuinely_trained_candidate(trained) -> None:
    src, live, fresh, window = trained
    cand, stats = fine_tune(live, fresh, src, LearnerConfig(mode="lora", steps=120))
    assert stats["trainable_params"] < 0.1 * sum(p.numel() for p in live.parameters())
    assert set(cand.state_dict()) == set(live.state_dict())  # merged back: same serving format
    d = decide(cand, live, window, src, GateConfig())
    assert d.accepted, d


def test_gate_refuses_a_shuffled_labels_candidate(trained) -> None:
    src, live, fresh, window = trained
    rng = np.random.default_rng(1)
    labels = rng.permutation([e.label for e in fresh])
    corrupted = [
        Example(e.user, e.item, e.position, e.propensity, float(y)) for e, y in zip(fresh, labels, strict=True)
    ]
    bad, _ = fine_tune(live, corrupted, src, LearnerConfig(mode="full", steps=300, lr=3e-3))
    d = decide(bad, live, window, src, GateConfig())
    assert not d.accepted, d
    assert d.candidate["auc"] < d.live["auc"]


def test_gate_refuses_a_candidate_that_scores_nan(trained) -> None:
    """A diverged fine-tune scores NaN everywhere: all ties, AUC exactly 0.5, which passes any gate
    whose live AUC is near chance (a tolerance of 1 stands in for that here)."""
    import copy

    src, live, _, window = trained
    diverged = copy.deepcopy(live)
    with torch.no_grad():
        for p in diverged.parameters():
            p.fill_(float("nan"))
    d = decide(diverged, live, window, src, GateConfig(tolerance=1.0))
    assert not d.accepted and "not finite" in d.reason, d


def test_gate_refuses_a_too_small_window(trained) -> None:
    src, live, _, window = trained
    assert not decide(live, live, window[:50], src, GateConfig(min_examples=200)).accepted


# ---- registry ------------------------------------------------------------------------------------


def _config(tmp_path: Path) -> str:
    export_ranker(new_ranker(RankerConfig(seed=0)), tmp_path / "scratch", version=1, serve_versions=2)
    return (tmp_path / "scratch" / "ranker" / "config.pbtxt").read_text()


def test_set_version_policy_replaces_an_existing_policy(tmp_path: Path) -> None:
    text = _config(tmp_path) + "\nversion_policy: { latest { num_versions: 1 } }\n"
    out = set_version_policy(text, [3, 2])
    assert out.count("version_policy") == 1
    assert "version_policy: { specific { versions: [ 2, 3 ] } }" in out
    assert set_version_policy(out, [4]).count("version_policy") == 1


def test_registry_publish_promote_rollback(tmp_path: Path) -> None:
    (tmp_path / "ranker").mkdir()
    (tmp_path / "ranker" / "config.pbtxt").write_text(_config(tmp_path))
    reg = ModelRegistry(tmp_path)
    v1 = reg.publish(new_ranker(RankerConfig(seed=1)))
    assert reg.init_live() == v1 == 1
    v2 = reg.publish(new_ranker(RankerConfig(seed=2)), metrics={"gate_auc": 0.7})
    assert reg.live == 1  # publishing alone never changes what is served
    reg.promote(v2, "gate passed")
    assert (reg.live, reg.previous, reg.served()) == (2, 1, [1, 2])
    assert "versions: [ 1, 2 ]" in (reg.model_dir / "config.pbtxt").read_text()
    meta = json.loads((reg.model_dir / "2" / "meta.json").read_text())
    assert meta["extra"]["version"] == 2 and meta["metrics"]["gate_auc"] == 0.7
    for name in ("ranker.safetensors", "meta.json", "model.py"):
        assert (reg.model_dir / "2" / name).is_file()
    assert not list(reg.model_dir.glob(".staging-*"))
    assert reg.rollback("ctr dropped") == 1
    assert (reg.live, reg.previous, reg.served()) == (1, None, [1])
    assert "versions: [ 1 ]" in (reg.model_dir / "config.pbtxt").read_text()
    with pytest.raises(RuntimeError):
        reg.rollback()
    assert [h["event"] for h in reg.state()["history"]] == ["init", "promote", "rollback"]


class _BrokenRanker:
    """A ranker whose save fails half-way (a full disk)."""

    meta = new_ranker().meta

    def save(self, path: Path) -> None:
        (Path(path) / "half").write_text("x")
        raise OSError("disk full")


def test_an_export_into_a_registry_managed_model_publishes_without_serving(tmp_path: Path) -> None:
    """`make train` exports a bundle's ranker into a repository whose ranker the continual trainer
    manages: the new version is published, and what Triton serves stays the registry's choice
    (the export reset it to `latest 1`, so a restart served the ungated version and unloaded the
    rollback target). A failed export leaves no version folder."""
    export_ranker(new_ranker(RankerConfig(seed=0)), tmp_path, version=1)
    reg = ModelRegistry(tmp_path)
    reg.init_live()
    reg.promote(reg.publish(new_ranker(RankerConfig(seed=1))), "gate passed")
    assert reg.served() == [1, 2]
    vdir = export_ranker(new_ranker(RankerConfig(seed=2)), tmp_path)
    assert vdir.name == "3" and (vdir / "model.py").is_file()
    config = (reg.model_dir / "config.pbtxt").read_text()
    assert "version_policy: { specific { versions: [ 1, 2 ] } }" in config and "latest" not in config
    assert config.count("version_policy") == 1 and 'name: "ranker"' in config
    assert reg.served() == [1, 2] and reg.live == 2
    reg.promote(3, "operator")
    assert "versions: [ 2, 3 ]" in (reg.model_dir / "config.pbtxt").read_text()

    with pytest.raises(OSError):
        export_ranker(_BrokenRanker(), tmp_path)  # type: ignore[arg-type]
    assert reg.versions() == [1, 2, 3] and not list(reg.model_dir.glob(".staging-*"))
    fresh = tmp_path / "fresh"
    export_ranker(new_ranker(RankerConfig(seed=0)), fresh, version=1)
    assert "latest { num_versions: 1 }" in (fresh / "ranker" / "config.pbtxt").read_text()  # no registry


def test_failed_publish_leaves_no_version(tmp_path: Path) -> None:
    reg = ModelRegistry(tmp_path)

    with pytest.raises(OSError):
        reg.publish(_BrokenRanker())
    assert reg.versions() == [] and not list(reg.model_dir.iterdir())


# ---- online monitor --------------------------------------------------------------------------------


def test_monitor_rolls_back_only_on_a_significant_ctr_drop() -> None:
    from recstream.continual.monitor import CtrMonitor, MonitorConfig, parse_version

    assert parse_version("ranker-v12") == 12 and parse_version("3") == 3 and parse_version("retrieval") is None
    mon = CtrMonitor(MonitorConfig(min_impressions=500))
    rng = np.random.default_rng(0)
    for _ in range(2000):
        mon.observe("ranker-v1", bool(rng.random() < 0.20))
    for _ in range(300):
        mon.observe("ranker-v2", bool(rng.random() < 0.10))
    assert not mon.should_rollback(2, 1)[0]  # not enough data yet
    for _ in range(700):
        mon.observe("ranker-v2", bool(rng.random() < 0.10))
    assert mon.should_rollback(2, 1)[0]
    same = CtrMonitor(MonitorConfig(min_impressions=500))
    for _ in range(2000):
        same.observe("v1", bool(rng.random() < 0.2))
        same.observe("v2", bool(rng.random() < 0.2))
    assert not same.should_rollback(2, 1)[0]


def test_a_query_encoder_version_that_fails_mid_write_leaves_nothing(tmp_path: Path) -> None:
    """The trainer writes text_encoder versions into the folder Triton serves: one that fails
    half-way (here its adapter cannot be copied) must leave no numbered folder for Triton's next
    start to load as the newest version, and no staging folder behind."""
    import shutil

    from recstream.config import REPO_ROOT
    from recstream.contracts.models import TEXT_ENCODER
    from recstream.models.export import export_query_encoder
    from recstream.models.repository import versions
    from recstream.models.training import read_meta
    from recstream.search.served import SearchWeights

    repo = tmp_path / "model_repo"
    shutil.copytree(REPO_ROOT / "model_repo" / TEXT_ENCODER, repo / TEXT_ENCODER)
    before = versions(repo, TEXT_ENCODER)
    meta = read_meta(repo / TEXT_ENCODER / str(max(before)))
    weights = SearchWeights.from_bench(meta.extra["search_weights"])
    with pytest.raises(FileNotFoundError):
        export_query_encoder(tmp_path / "no-adapter", meta, repo, weights)
    assert versions(repo, TEXT_ENCODER) == before
    assert not [p.name for p in (repo / TEXT_ENCODER).iterdir() if p.name.startswith(".staging")]


def test_a_first_start_keeps_the_version_before_the_newest_as_the_rollback_target(tmp_path: Path) -> None:
    """`make train` added v2 while Triton served v1, then the trainer started for the first time:
    init_live made v2 live with no rollback target and unloaded v1. Without a registry the served
    set is what the config's policy serves (this one: the newest two)."""
    (tmp_path / "ranker").mkdir()
    (tmp_path / "ranker" / "config.pbtxt").write_text(_config(tmp_path))
    reg = ModelRegistry(tmp_path)
    reg.publish(new_ranker(RankerConfig(seed=1)))
    reg.publish(new_ranker(RankerConfig(seed=2)))
    assert (reg.live, reg.previous, reg.served()) == (2, 1, [1, 2])
    assert reg.init_live() == 2
    assert (reg.live, reg.previous, reg.served()) == (2, 1, [1, 2])
    assert reg.rollback("the new one is worse") == 1


def test_without_a_registry_the_served_set_is_what_the_config_policy_serves(tmp_path: Path) -> None:
    """The encoders ship `latest { num_versions: 2 }`: `models list` reported only the newest."""
    from recstream.models.export.common import policy_serves

    model_dir = tmp_path / "item_encoder"
    for v in (1, 2, 3):
        (model_dir / str(v)).mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text('name: "item_encoder"\nversion_policy: { latest { num_versions: 2 } }\n')
    assert ModelRegistry(tmp_path, "item_encoder").served() == [2, 3]
    assert policy_serves('name: "x"\n', [1, 2, 3]) == [3]  # Triton's default: the newest
    assert policy_serves("version_policy: { specific { versions: [ 1, 3 ] } }", [1, 2, 3]) == [1, 3]
    assert policy_serves("version_policy: { all { } }", [1, 2]) == [1, 2]

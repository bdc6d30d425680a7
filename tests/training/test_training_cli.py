"""The step-by-step training CLI (python -m recstream.training.cli): a wrong --stage costs nothing,
and a ranker trains on top of any retrieval checkpoint it made, a cold split's other draws and a
catalogue smaller than the list depth included."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recstream.training.cli import app

pytestmark = pytest.mark.slow


def test_a_stage_the_split_lacks_is_refused_before_any_training(tmp_path: Path) -> None:
    """`--stage cold_valid` on a leave-last-out split used to fail after the whole training, with a
    traceback and no checkpoint saved."""
    out = tmp_path / "two_tower"
    result = CliRunner().invoke(
        app, ["train-retrieval", "--dataset", "tiny-synthetic", "--stage", "cold_valid", "--out", str(out)]
    )
    assert result.exit_code == 2, result.output
    assert "cold_valid" in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_a_ranker_trains_on_a_cold_split_of_another_draw_and_a_small_catalogue(tmp_path: Path) -> None:
    """train-ranker reloaded every split with draw 0 (a seed-1 cold checkpoint was refused as 'trained
    on other data'), and lists deeper than the catalogue failed to reshape after all the training."""
    runner = CliRunner()
    retrieval = tmp_path / "two_tower"
    args = ["train-retrieval", "--dataset", "tiny-synthetic", "--split", "cold", "--seed", "1"]
    args += ["--finetune", "frozen", "--epochs", "1", "--threads", "1", "--out", str(retrieval)]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert json.loads((retrieval / "meta.json").read_text())["extra"]["split_seed"] == 1

    ranker = tmp_path / "ranker"
    args = ["train-ranker", "--retrieval", str(retrieval), "--epochs", "1", "--depth", "100", "--threads", "1"]
    second = runner.invoke(app, [*args, "--no-out-of-fold", "--out", str(ranker)])
    assert second.exit_code == 0, second.output
    meta = json.loads((ranker / "meta.json").read_text())
    assert meta["config"]["rerank_depth"] == 39  # 40 items: each list leaves the target's history out
    assert "valid_NDCG@10" in json.loads((ranker / "train_stats.json").read_text())["metrics"]

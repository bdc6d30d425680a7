"""The statistics the closed-loop bench reports next to its paired differences."""

from __future__ import annotations

import pytest

from bench.loop_stats import add_holm, holm_adjusted


def test_holm_adjustment_steps_down_and_stays_monotone() -> None:
    adj = holm_adjusted({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})  # b: max(0.04 * 1, 0.06)
    assert holm_adjusted({"x": 0.6, "y": 0.5}) == pytest.approx({"y": 1.0, "x": 1.0})


def test_paired_p_values_come_from_the_per_seed_differences() -> None:
    per_seed = [{"ctr_a": 0.2 + d, "ctr_b": 0.2} for d in (0.010, 0.012, 0.011, 0.009, 0.013)]
    per_seed = [
        {**r, "ctr_c": r["ctr_b"] + e} for r, e in zip(per_seed, (0.01, -0.01, 0.0, 0.005, -0.004), strict=True)
    ]
    diffs = {"a_minus_b": {}, "c_minus_b": {}}
    add_holm(diffs, per_seed)
    assert diffs["a_minus_b"]["p"] < 0.001 < 0.5 < diffs["c_minus_b"]["p"]
    assert diffs["a_minus_b"]["p_holm"] == pytest.approx(2 * diffs["a_minus_b"]["p"])


def tiny_loop(tmp_path, monkeypatch, **settings) -> dict:
    """bench_loop.main on a loop of 3 rounds x 10 users (seconds), writing its results under tmp_path."""
    import bench.bench_loop as bl
    import bench.common as common

    monkeypatch.setattr(common, "RESULTS_DIR", tmp_path)
    monkeypatch.setattr(bl, "RESULTS_DIR", tmp_path)
    size = {"rounds": 3, "drift_round": 1, "users_per_round": 10, "warmup_requests": 100, "pretrain_steps": 5}
    return bl.main(bl.LoopConfig(**{**size, "jobs": 1, **settings}))


def test_a_tiny_loop_without_checks_writes_its_named_report(tmp_path, monkeypatch) -> None:
    """The bench's whole path on a tiny loop: a retrieval-only scenario (no random candidates, live
    sessions) runs, leaves the OPE and click-to-live sections out, and writes NAME.{json,md,png}."""
    result = tiny_loop(
        tmp_path,
        monkeypatch,
        seeds=[0, 1],
        checks=False,
        random_candidates=0,
        live_sessions=True,
        name="tiny",
        scenario="a test scenario",
    )
    assert {p.name for p in tmp_path.iterdir()} == {"tiny.json", "tiny.md", "tiny.png"}
    assert "ope_estimate" not in result and "click_to_live" not in result
    assert len(result["per_seed"]) == 2 and result["config"]["random_candidates"] == 0
    report = (tmp_path / "tiny.md").read_text()
    assert "a test scenario" in report and "retrieval only" in report and "Click to live" not in report
    assert "Sessions are live" in report


def test_pooling_two_runs_of_a_scenario_pairs_every_seed_and_refuses_overlaps(tmp_path, monkeypatch) -> None:
    import json

    import typer

    import bench.pool_seeds as pool_seeds

    monkeypatch.setattr(pool_seeds, "RESULTS_DIR", tmp_path)

    def run(name: str, seeds: list[int], scenario: str = "s") -> None:
        rows = [
            {"seed": s, "ctr_frozen": 0.1, "ctr_continual": 0.2, "ctr_exploit_lift": 0.2, "ctr_explore": 0.21 + s / 1e3}
            for s in seeds
        ]
        (tmp_path / f"{name}.json").write_text(json.dumps({"config": {"scenario": scenario}, "per_seed": rows}))

    run("a", [0, 1, 2])
    run("b", [3, 4])
    result = pool_seeds.pool(["a", "b"])
    d = result["paired_differences"]["explore_minus_continual"]
    assert result["seeds"] == [0, 1, 2, 3, 4] and d["n"] == 5 and d["seeds_positive"] == 5
    assert d["mean"] == pytest.approx(0.012) and d["ci"][0] > 0 and 0 < d["p"] <= d["p_holm"]
    run("c", [4, 5])
    with pytest.raises(typer.BadParameter, match="share seeds"):
        pool_seeds.pool(["a", "b", "c"])
    run("d", [7], scenario="other")
    with pytest.raises(typer.BadParameter, match="different scenarios"):
        pool_seeds.pool(["a", "d"])


def test_a_tiny_loop_with_checks_reports_the_keys_the_issue_names(tmp_path, monkeypatch) -> None:
    """bench-loop's own path: the OPE checks run after the loop and loop.json carries every key the
    issue names (click-to-live needs tritonserver: here it is disabled and says so)."""
    result = tiny_loop(
        tmp_path, monkeypatch, seeds=[0], ope_requests=60, ope_mc_samples=100, triton=False, name="tiny_checks"
    )
    keys = ("ctr_frozen", "ctr_continual", "ctr_explore", "ndcg10_frozen", "ndcg10_continual", "ope_estimate")
    assert all(isinstance(result[k], float) for k in keys)
    low, high = result["ope_ci"]
    assert low <= result["ope_estimate"] <= high and 0 < result["simulated_online_value"] < 1
    assert result["click_to_live_s"] is None and result["click_to_live"]["reason"] == "disabled"
    report = (tmp_path / "tiny_checks.md").read_text()
    assert "Off-policy estimate vs simulated online value" in report and "Not measured: disabled" in report


def test_a_scenario_command_runs_the_loop_with_its_settings_seeds_and_name(monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    import bench.bench_loop as bl
    import bench.bench_loop_sessions as sessions

    runs: list = []
    monkeypatch.setattr(bl, "main", lambda cfg: runs.append(cfg) or {})
    app = typer.Typer()
    app.command()(sessions.run)
    assert CliRunner().invoke(app, ["--seeds", "5", "--seeds", "6", "--name", "again"]).exit_code == 0
    assert CliRunner().invoke(app, []).exit_code == 0
    again, default = runs
    assert (again.seeds, again.seed, again.name) == ([5, 6], None, "again")
    assert (default.seeds, default.name) == ([0, 1, 2, 3, 4], "loop_sessions")
    for cfg in runs:
        assert cfg.random_candidates == 0 and cfg.live_sessions and not cfg.checks and cfg.scenario == sessions.SCENARIO


def test_seeds_in_worker_processes_give_the_figures_of_one_process(tmp_path, monkeypatch) -> None:
    """--jobs only changes the wall time: seeds run in a spawned worker (the front of the queue) or
    taken back by this process (the back) report exactly what they report when all run here."""
    one = tiny_loop(tmp_path, monkeypatch, seeds=[0, 1, 2, 3], checks=False, name="one")
    two = tiny_loop(tmp_path, monkeypatch, seeds=[0, 1, 2, 3], checks=False, name="two", jobs=2)
    strip = [{k: v for k, v in r.items() if k != "wall_s"} for r in one["per_seed"]]
    assert strip == [{k: v for k, v in r.items() if k != "wall_s"} for r in two["per_seed"]]
    assert one["curves"] == two["curves"]


def test_the_default_loop_is_the_preregistered_confirmatory_run() -> None:
    """bench-loop's defaults are what its module doc registered before the run: the worker's
    candidate generation, live sessions, 20 fresh seeds, and the checks."""
    import bench.bench_loop as bl

    cfg = bl.LoopConfig()
    assert (cfg.random_candidates, cfg.live_sessions, cfg.checks) == (0, True, True)
    assert cfg.seeds == list(range(10, 30)) and cfg.seed is None
    assert (cfg.rounds, cfg.drift_round, cfg.users_per_round) == (36, 12, 200)


def test_click_to_live_rounds_keep_refused_bursts_and_time_the_round_that_goes_live(monkeypatch) -> None:
    """A refused round does not end the measurement: its burst stays in the buffer, the next burst
    brings another round, and the accepted round's time starts at its own burst."""
    import dataclasses

    import numpy as np

    import bench.loop_checks as checks
    import bench.loop_sim as loop
    from bench.simulator import SimConfig, load_simulator
    from recstream.explore import Greedy

    cfg = loop.LoopConfig(warmup_requests=100, pretrain_steps=5, seeds=[0], seed=0)
    sim = load_simulator(SimConfig(seed=0, n_random_candidates=0))
    features = loop.SimFeatures(sim)
    base, _, popularity = loop.pretrain(sim, cfg, features)
    arm = loop.Arm("burst", base, Greedy(), learn=False, cfg=cfg, popularity=popularity)
    rng = np.random.default_rng(1)

    def next_burst():
        seen = arm.buffer.seen
        arm.serve(sim, [sim.request(int(u), rng) for u in rng.integers(0, sim.n_users, 30)], rng)
        return arm.buffer.latest(arm.buffer.seen - seen)

    real_decide, calls = checks.decide, []

    def refuse_first(cand, live, window, feats, gate):
        d = real_decide(cand, live, window, feats, gate)
        calls.append(len(window))
        return d if len(calls) > 1 else dataclasses.replace(d, accepted=False, reason="refused by the test")

    monkeypatch.setattr(checks, "decide", lambda *a: refuse_first(*a))
    accept_all = cfg.model_copy(update={"gate": cfg.gate.model_copy(update={"tolerance": 1.0})})
    out = checks.rounds_until_promoted(accept_all, base, next_burst, features, max_bursts=3)
    assert out["decision"].accepted and len(calls) == 2
    assert [r["reason"] for r in out["refused_rounds"]] == ["refused by the test"]
    assert out["burst_examples"] == 300 and out["buffer_examples"] == 600 and calls == [300, 600]

    monkeypatch.setattr(checks, "decide", lambda *a: dataclasses.replace(real_decide(*a), accepted=False))
    never = checks.rounds_until_promoted(accept_all, base, next_burst, features, max_bursts=2)
    assert never["decision"] is None and len(never["refused_rounds"]) == 2

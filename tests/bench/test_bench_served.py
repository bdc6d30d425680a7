"""bench-served's cold-start comparison: seeds that share a draw are one set of cases, not three."""

from __future__ import annotations

import numpy as np

from bench.bench_served import paired_by_draw


def _draw(rng: np.random.Generator, n: int = 90) -> dict:
    return {"served": rng.integers(0, 30, n), "zero_shot": rng.integers(0, 30, n)}


def test_seeds_on_one_draw_are_averaged_per_case_not_counted_as_more_cases() -> None:
    rng = np.random.default_rng(0)
    one = _draw(rng)
    same_draw = [one, {**one, "served": rng.integers(0, 30, 90)}, {**one, "served": rng.integers(0, 30, 90)}]
    pooled = paired_by_draw(same_draw, [0, 0, 0], "served", "zero_shot")
    assert pooled["n_cases"] == 90
    apart = paired_by_draw([_draw(rng), _draw(rng)], [0, 1], "served", "zero_shot")
    assert apart["n_cases"] == 180

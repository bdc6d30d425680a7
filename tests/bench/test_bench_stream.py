"""bench-stream's accounting: a request never answered is in the latency tail, and a capacity step
counts only at the rate the load generator really offered."""

from __future__ import annotations

from bench.bench_stream import ANSWER_GRACE_S, latency_percentiles, step_within_target


def test_unanswered_requests_are_in_the_tail_not_left_out() -> None:
    answered = [10.0] * 97
    assert latency_percentiles(answered, 0)["latency_ms_p99"] == 10.0
    # 3 % never answered: the p99 is theirs (at least the grace period they were waited for)
    assert latency_percentiles(answered, 3)["latency_ms_p99"] == ANSWER_GRACE_S * 1000


def test_a_capacity_step_the_load_generator_fell_short_of_does_not_count() -> None:
    step = {
        "latency_ms_p99": 20.0,
        "degraded_share": 0.0,
        "requests_unanswered": 0,
        "empty_answers": 0,
        "sent_per_s": 398.0,
    }
    assert step_within_target(step, 400.0)
    assert not step_within_target({**step, "sent_per_s": 300.0}, 400.0)
    assert not step_within_target({**step, "requests_unanswered": 1}, 400.0)
    assert not step_within_target({**step, "latency_ms_p99": 51.0}, 400.0)

"""The operators' CLI on plausible mistakes: a clear message and exit status 2, never a traceback
(through the real broker where the command talks to it)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from recstream.config import Settings, get_settings
from recstream.ops import cli

pytestmark = pytest.mark.kafka


@pytest.fixture
def run(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    monkeypatch.setenv("KAFKA_BOOTSTRAP", settings.kafka_bootstrap)
    monkeypatch.setenv("TOPIC_PREFIX", settings.topic_prefix)
    get_settings.cache_clear()
    runner = CliRunner()

    def invoke(*args: str, stdin: str | None = None):
        result = runner.invoke(cli.app, list(args), input=stdin)
        assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), (
            f"traceback instead of a message: {result.exception!r}"
        )
        return result

    try:
        yield invoke
    finally:
        get_settings.cache_clear()


def test_produce_refuses_what_is_not_an_event(run) -> None:
    r = run("produce", "behaviour", "{bad")
    assert r.exit_code == 2 and "EVENT is not a valid behaviour event" in r.output, r.output
    good = json.dumps({"type": "click", "user_id": "u1", "item_id": "i1"})
    r = run("produce", "behaviour", "-", stdin=f"{good}\n{json.dumps({'type': 'click'})}\n")
    assert r.exit_code == 2 and "line 2" in r.output and "1 sent before it" in r.output and "user_id" in r.output
    r = run("produce", "behavior", good)
    assert r.exit_code == 2 and "unknown topic 'behavior'" in r.output


def test_dead_letters_tail_and_replay_name_what_is_wrong(run, tmp_path: Path) -> None:
    r = run("dead-letters", "nosuch")
    assert r.exit_code == 2 and "unknown topic 'nosuch'" in r.output, r.output
    r = run("tail", "no.such.topic", "--timeout-s", "20")
    assert r.exit_code == 2 and "no topic no.such.topic" in r.output, r.output
    r = run("replay", str(tmp_path / "missing.jsonl"))
    assert r.exit_code == 2 and "no file" in r.output, r.output
    recorded = tmp_path / "recorded.jsonl"
    event = {"type": "click", "user_id": "u1", "item_id": "i1"}
    recorded.write_text(json.dumps({"topic": "behaviour", "event": event}) + "\n{oops\n")
    r = run("replay", str(recorded), "--rate", "0")
    assert r.exit_code == 2 and "recorded.jsonl:2: not a JSON line" in r.output and "1 events sent" in r.output


def test_replay_of_a_recording_keeps_to_its_limit(run, settings: Settings, tmp_path: Path) -> None:
    """--limit was applied to data sets only: a smoke test with --limit 2 sent a whole recording to
    the live topics; --no-catalog was ignored the same way."""
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient

    recorded = tmp_path / "recorded.jsonl"
    lines = [{"topic": "behaviour", "event": {"type": "view", "user_id": f"u{i}", "item_id": "i1"}} for i in range(5)]
    recorded.write_text("".join(json.dumps(line) + "\n" for line in lines))
    r = run("replay", str(recorded), "--rate", "0", "--limit", "2")
    assert r.exit_code == 0, r.output
    topic = f"{settings.topic_prefix}behaviour"
    from confluent_kafka import Consumer

    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "replay-limit"})
    try:
        parts = AdminClient({"bootstrap.servers": settings.kafka_bootstrap}).list_topics(topic, timeout=10)
        ends = [
            consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts.topics[topic].partitions
        ]
    finally:
        consumer.close()
    assert sum(ends) == 2
    r = run("replay", str(recorded), "--no-catalog")
    assert r.exit_code == 2 and "--no-catalog" in r.output, r.output


def test_a_replayed_data_set_resends_the_same_event_ids() -> None:
    """Ids were random per run: a replay rerun after Ctrl-C folded every resent interaction into
    the features twice, past the worker's dedupe by event_id."""
    import pandas as pd

    from recstream.data.events import behaviour_events

    rows = pd.DataFrame(
        {"user_id": ["u1", "u1", "u2"], "item_id": ["a", "a", "b"], "ts": [5, 5, 7], "rating": [5, 5, 1]}
    )
    first, again = list(behaviour_events(rows)), list(behaviour_events(rows))
    assert [e.event_id for e in first] == [e.event_id for e in again]
    assert len({e.event_id for e in first}) == len(first)  # a repeated row is still its own event

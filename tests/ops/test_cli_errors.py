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

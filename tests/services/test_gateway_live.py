"""The gateway in front of the REAL stack: Kafka broker, tritonserver and `python -m streams.worker`
as a child process, the gateway served by uvicorn on a free port. Also provides `live_stack` to
the Prometheus and browser tests (one stack per test session, see `_stack`).

- a search and a click through the gateway move the session's recommendations;
- schemathesis, positive and negative cases generated from the OpenAPI spec, finds no 5xx. With
  the worker up, a 504 would be a real failure (a request the worker did not answer), so it is not
  excluded.
"""

from __future__ import annotations

import logging
import time
import uuid

import hypothesis
import pytest
from hypothesis import HealthCheck
from live_stack import HEADERS, LiveStack

from recstream.config import Settings

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]
log = logging.getLogger(__name__)


def _user() -> str:
    return f"u{uuid.uuid4().hex[:8]}"


def test_search_click_and_session_recommendations(live_stack: LiveStack) -> None:
    user, session = _user(), f"s{uuid.uuid4().hex[:6]}"
    with live_stack.http() as http:
        r = http.post("/v1/search", json={"user_id": user, "session_id": session, "query": "space rockets", "k": 5})
        assert r.status_code == 200, r.text
        res = r.json()
        assert res["kind"] == "search" and res["model_version"] and len(res["items"]) == 5
        assert [i["position"] for i in res["items"]] == list(range(5))
        assert all(res["titles"].get(i["item_id"]) for i in res["items"]), res["titles"]
        # RankedItem.reasons is what the playground shows as "why it was shown".
        assert all(i["reasons"] for i in res["items"]), (res["model_version"], res["items"])
        # Ranking quality is the stream tests' business; here only a sanity check (the re-ranker
        # diversifies categories, so not every top slot is on topic).
        assert "Sci-Fi" in [i["category"] for i in res["items"][:3]], res["titles"]

        before = http.post("/v1/recommend", json={"user_id": user, "session_id": session, "k": 10}).json()
        horror_before = sum(i["category"] == "Horror" for i in before["items"])
        events = [
            {
                "type": "click",
                "user_id": user,
                "session_id": session,
                "item_id": f"hor{i}",
                "request_id": res["request_id"],
                "position": i,
                "model_version": res["model_version"],
            }
            for i in range(4)
        ]
        r = http.post("/v1/events", json={"events": events})
        assert r.status_code == 202 and r.json()["accepted"] == 4
        deadline, horror_after = time.monotonic() + 10, horror_before
        while time.monotonic() < deadline:
            after = http.post("/v1/recommend", json={"user_id": user, "session_id": session, "k": 10}).json()
            horror_after = sum(
                i["category"] == "Horror" for i in after["items"] if i["item_id"] not in {e["item_id"] for e in events}
            )
            if horror_after > horror_before:
                break
            time.sleep(0.3)
        assert horror_after > horror_before, (before, after)


def test_filters_that_match_nothing_answer_an_empty_list(live_stack: LiveStack) -> None:
    """Found by schemathesis: a filter that rules out every item must answer 200 with no items, not
    leave the request unanswered (the worker dead-lettered it and the gateway could only say 504)."""
    with live_stack.http() as http:
        for filters in ({"categories": []}, {"max_price": 0}, {"categories": ["no-such-category"]}):
            for kind, body in (("recommend", {}), ("search", {"query": "space"})):
                r = http.post(f"/v1/{kind}", json={"user_id": _user(), "filters": filters, **body})
                assert r.status_code == 200, (kind, filters, r.status_code, r.text)
                assert r.json()["items"] == [], (kind, filters)


def test_schemathesis_finds_no_server_errors(live_stack: LiveStack) -> None:
    import schemathesis
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{live_stack.base_url}/openapi.json", timeout=10)
    tested: list[str] = []
    failures: list[str] = []
    written: set[str] = set()  # generated catalog items, deleted afterwards: the stack is shared
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @hypothesis.settings(
                max_examples=25,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
                phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate],
            )
            @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
            def check(case) -> None:
                # 30 s per call: search/recommend wait up to 15 s for the worker; anything slower is a bug.
                response = case.call_and_validate(
                    base_url=live_stack.base_url, headers=HEADERS, timeout=30, checks=[not_a_server_error]
                )
                if case.method.upper() in ("POST", "PUT") and "/v1/items" in case.path and response.status_code == 202:
                    written.update(response.json()["ids"])

            try:
                check()
            except hypothesis.errors.Unsatisfiable:
                # No input to break (GET /healthz, /readyz): nothing negative can be generated.
                assert mode == GenerationMode.NEGATIVE, operation.label
                continue
            except Exception as exc:  # keep going: report every failing operation at once
                failures.append(f"{operation.label} ({mode.value}): {exc}")
            tested.append(f"{operation.label} {mode.value}")
    with live_stack.http() as http:
        for item_id in written:
            assert http.delete(f"/v1/items/{item_id}").status_code == 202
    print("\n".join(tested))
    assert len(tested) >= 12, tested  # every operation positive, every one with inputs negative too
    assert not failures, "\n\n".join(failures)


def test_ops_monitor_releases_its_admin_client_when_stopped(kafka_bootstrap: str) -> None:
    """A stopped monitor holds no librdkafka handle: the app object that owns it may outlive the
    broker, and a live handle would keep reconnecting to it (seen after test sessions)."""
    from services.gateway.background import OpsMonitor

    monitor = OpsMonitor(Settings(kafka_bootstrap=kafka_bootstrap), interval_s=0.1).start()
    time.sleep(0.3)
    monitor.stop()
    assert monitor._admin is None and not monitor._thread.is_alive()
    monitor.refresh()  # after stop: a no-op, not an error


def test_ops_monitor_reports_live_groups_and_forgets_what_it_cannot_read(make_settings) -> None:
    """Real Kafka. The lag gauge covers groups with members: a group whose consumer left (an old
    APP_VERSION's, a trainer run's catalog reader) kept its lag, growing with traffic, and fired
    the lag alert for days. Gauges that cannot be refreshed are emptied, not left at their last
    value (a Triton that cannot be asked showed its last live version, so "no live model" never fired)."""
    from prometheus_client import REGISTRY

    from recstream.client import EventConsumer, EventProducer
    from recstream.contracts.events import BehaviourEvent
    from recstream.contracts.topics import TOPICS
    from recstream.telemetry import MODEL_VERSION_LIVE
    from services.gateway.background import OpsMonitor

    settings = make_settings(triton_url="127.0.0.1:9")
    with EventProducer(settings) as producer:
        for i in range(10):
            producer.send("behaviour", BehaviourEvent(type="view", user_id="u1", item_id=f"i{i}"))
    gone = EventConsumer(settings, ["behaviour"], group_id=f"{settings.topic_prefix}gone")
    while len(gone.poll(1, 0.5)) == 0:
        pass
    gone.commit()
    gone.close()  # committed 1 of 10, then left: lag 9, forever
    live = EventConsumer(settings, ["behaviour"], group_id=f"{settings.topic_prefix}live")
    while len(live.poll(1, 0.5)) == 0:
        pass
    live.commit()
    MODEL_VERSION_LIVE.labels(model="ranker", version="3").set(1)  # from an earlier refresh
    monitor = OpsMonitor(settings, interval_s=3600)
    topic = TOPICS["behaviour"].name(settings.topic_prefix)

    def lag(group: str) -> list[float | None]:
        labels = ({"topic": topic, "partition": str(p), "group": group} for p in range(TOPICS["behaviour"].partitions))
        return [REGISTRY.get_sample_value("recstream_consumer_lag", x) for x in labels]

    try:
        monitor.refresh()
        assert sum(x or 0.0 for x in lag(f"{settings.topic_prefix}live")) == 9
        assert lag(f"{settings.topic_prefix}gone") == [None] * TOPICS["behaviour"].partitions
        assert REGISTRY.get_sample_value("recstream_model_version_live", {"model": "ranker", "version": "3"}) is None
    finally:
        monitor.stop()
        live.close()

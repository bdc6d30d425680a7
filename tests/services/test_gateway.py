"""The HTTP gateway through the REAL broker: auth, validation and size limits refuse a request
before anything reaches Kafka (checked with the topics' log-end offsets), and good requests land
on the same topics a Kafka-native application would use.

No stream worker runs here, so search/recommend must answer 504 with a clear message.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from fastapi.testclient import TestClient

from recstream.config import Settings
from recstream.contracts.models import SERVED_MODELS
from recstream.contracts.topics import TOPICS
from services.gateway import GatewayLimits, create_app

pytestmark = pytest.mark.kafka

KEY = "test-key-1"
HEADERS = {"X-API-Key": KEY}
LIMITS = GatewayLimits(max_batch=5, max_body_bytes=4096, request_timeout_s=1.0, publish_timeout_s=10.0)


def published(settings: Settings, logical: str) -> int:
    """Messages ever written to a topic: the sum of its partitions' log-end offsets (exact, no polling)."""
    topic = TOPICS[logical].name(settings.topic_prefix)
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "gateway-test-offsets"})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        for attempt in range(50):  # a just-created topic may still be electing partition leaders
            try:
                return sum(consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts)
            except KafkaException:
                if attempt == 49:
                    raise
                time.sleep(0.2)
        raise AssertionError("unreachable")
    finally:
        consumer.close()


def read_all(settings: Settings, logical: str, n: int, timeout_s: float = 15.0) -> list[dict]:
    topic = TOPICS[logical].name(settings.topic_prefix)
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"gateway-test-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    out: list[dict] = []
    try:
        for _ in range(int(timeout_s / 0.5)):
            for msg in consumer.consume(num_messages=100, timeout=0.5):
                if not msg.error():
                    out.append({"key": msg.key().decode(), **json.loads(msg.value())})
            if len(out) >= n:
                break
    finally:
        consumer.close()
    return out


@pytest.fixture
def gw_settings(make_settings: Callable[..., Settings]) -> Settings:
    # Triton is not needed here; point at a closed port so readiness reports it down.
    return make_settings(api_keys=f"{KEY}, second-key", triton_url="127.0.0.1:9")


@pytest.fixture
def client(gw_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(gw_settings, LIMITS, monitor=False)) as c:
        yield c


def click(i: int = 0, **over: object) -> dict:
    event = {"type": "click", "user_id": f"u{i}", "item_id": f"item{i}", "request_id": "r1", "position": i}
    event.update(over)
    return event


def nothing_published(settings: Settings) -> None:
    for logical in ("behaviour", "catalog", "requests"):
        assert published(settings, logical) == 0, logical


def test_missing_key_is_401_and_wrong_key_is_403(client: TestClient, gw_settings: Settings) -> None:
    body = {"events": [click()]}
    r = client.post("/v1/events", json=body)
    assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
    assert r.headers["www-authenticate"] == "APIKey"
    r = client.post("/v1/events", json=body, headers={"X-API-Key": ""})
    assert r.status_code == 401
    for wrong in ("nope", KEY + "x", KEY[:-1], "second-key "):
        r = client.post("/v1/events", json=body, headers={"X-API-Key": wrong})
        assert r.status_code == 403, wrong
        assert r.json() == {"detail": "invalid API key"}
    # auth comes before parsing: garbage without a key is still a 401, not a 422
    assert client.post("/v1/events", content=b"{not json").status_code == 401
    for method, path in (
        ("post", "/v1/search"),
        ("post", "/v1/recommend"),
        ("post", "/v1/items"),
        ("put", "/v1/items/a"),
        ("delete", "/v1/items/a"),
    ):
        assert client.request(method, path, json={}).status_code == 401, path
        assert client.request(method, path, json={}, headers={"X-API-Key": "bad"}).status_code == 403, path
    nothing_published(gw_settings)
    # the second configured key works, and the valid request is the only thing on the topic
    r = client.post("/v1/events", json=body, headers={"X-API-Key": "second-key"})
    assert r.status_code == 202, r.text
    assert published(gw_settings, "behaviour") == 1


def _locs(response) -> list[list]:
    assert response.status_code == 422, response.text
    return [e["loc"] for e in response.json()["detail"]]


def test_invalid_payloads_are_422_naming_the_field(client: TestClient, gw_settings: Settings) -> None:
    post = lambda path, body: client.post(path, json=body, headers=HEADERS)  # noqa: E731
    bad_user = click()
    del bad_user["user_id"]
    assert ["body", "events", 0, "user_id"] in _locs(post("/v1/events", {"events": [bad_user]}))
    assert ["body", "events", 1, "type"] in _locs(post("/v1/events", {"events": [click(), click(type="stare")]}))
    assert ["body", "events", 0, "position"] in _locs(post("/v1/events", {"events": [click(position=-1)]}))
    assert ["body", "events", 0, "propensity"] in _locs(post("/v1/events", {"events": [click(propensity=0)]}))
    assert ["body", "events", 0, "colour"] in _locs(post("/v1/events", {"events": [click(colour="red")]}))
    assert ["body", "events", 0, "item_id"] in _locs(post("/v1/events", {"events": [click(item_id="a b")]}))
    assert ["body", "events"] in _locs(post("/v1/events", {"events": []}))
    assert _locs(client.post("/v1/events", content=b"{not json", headers=HEADERS))[0][0] == "body"
    assert ["body", "query"] in _locs(post("/v1/search", {"user_id": "u1"}))
    assert ["body", "query"] in _locs(post("/v1/search", {"user_id": "u1", "query": ""}))
    assert ["body", "query"] in _locs(post("/v1/search", {"user_id": "u1", "query": " \t\n "}))  # blank is empty
    assert ["body", "k"] in _locs(post("/v1/recommend", {"user_id": "u1", "k": 0}))
    bad_filter = {"user_id": "u1", "filters": {"max_price": -1}}
    assert ["body", "filters", "max_price"] in _locs(post("/v1/recommend", bad_filter))
    assert ["body", "title"] in _locs(post("/v1/items", {"item_id": "i1"}))
    assert ["body", "price"] in _locs(client.put("/v1/items/i1", json={"title": "t", "price": -3}, headers=HEADERS))
    assert ["path", "item_id"] in _locs(client.put("/v1/items/bad%20id", json={"title": "t"}, headers=HEADERS))
    assert ["path", "item_id"] in _locs(client.delete("/v1/items/" + "x" * 129, headers=HEADERS))
    nothing_published(gw_settings)


def test_nan_infinity_and_lone_surrogates_are_422_not_500(client: TestClient, gw_settings: Settings) -> None:
    """JSON that Python parses (NaN, Infinity, "\\ud800") but no contract allows: a 422 naming the
    field, with the bad input echoed as text; nothing is published."""
    raw = lambda path, text: client.post(  # noqa: E731
        path, content=text.encode(), headers={**HEADERS, "content-type": "application/json"}
    )
    click_json = '{"type": "click", "user_id": "u1", "item_id": "i1", "position": 1'
    r = raw("/v1/events", '{"events": [' + click_json + ', "propensity": NaN}]}')
    assert ["body", "events", 0, "propensity"] in _locs(r) and r.json()["detail"][0]["input"] == "nan"
    assert ["body", "k"] in _locs(raw("/v1/recommend", '{"user_id": "u1", "k": Infinity}'))
    assert ["body", "price"] in _locs(raw("/v1/items", '{"item_id": "i1", "title": "t", "price": -Infinity}'))
    r = raw("/v1/search", '{"user_id": "u1", "query": "caf\\ud800"}')
    assert _locs(r) == [["body"]] and "query: text is not valid Unicode" in r.text
    r = raw("/v1/events", '{"events": [' + click_json + ', "model_version": "v\\udfff"}]}')
    assert ["body", "events", 0] in _locs(r) and "model_version: text is not valid Unicode" in r.text
    r = raw("/v1/items", '{"item_id": "i1", "title": "t", "attributes": {"\\ud800": 1}}')
    assert r.status_code == 422 and "not valid Unicode" in r.text
    nothing_published(gw_settings)


def test_raw_and_deeply_nested_bodies_are_refused_not_500(client: TestClient, gw_settings: Settings) -> None:
    """A non-UTF-8 body sent as text/plain (curl --data-binary's form) and a 1 kB body nested 600
    levels deep crashed the 422 handler itself: a 500 and a traceback per request."""
    binary = {**HEADERS, "content-type": "text/plain"}
    for r in (
        client.post("/v1/events", content=b"\xff\xfe\x00", headers=binary),
        client.put("/v1/items/abc", content=b"\xff\xfe\x00", headers=binary),
    ):
        assert r.status_code == 422 and "\\xff" in r.text, r.text
    deep = '{"events": ' + "[" * 600 + "]" * 600 + "}"
    r = client.post("/v1/events", content=deep.encode(), headers={**HEADERS, "content-type": "application/json"})
    assert r.status_code == 422 and '"..."' in r.text
    nothing_published(gw_settings)


def test_readiness_needs_every_topic_the_gateway_uses(gw_settings: Settings) -> None:
    """Readiness looked at the requests topic only: without the recommendations topic every query
    failed while /readyz said ready."""
    from confluent_kafka.admin import AdminClient, NewTopic

    settings = gw_settings.model_copy(update={"topic_prefix": f"{gw_settings.topic_prefix}partial."})
    requests_topic = TOPICS["requests"].name(settings.topic_prefix)
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    admin.create_topics([NewTopic(requests_topic, 1, 1)])[requests_topic].result(30)
    with TestClient(create_app(settings, LIMITS, monitor=False, catalog_view=False)) as c:
        r = c.get("/readyz")
    assert r.status_code == 503 and "does not exist" in r.json()["kafka"]


def test_cors_is_off_by_default_and_answers_preflight_when_configured(
    client: TestClient, make_settings: Callable[..., Settings]
) -> None:
    preflight = {
        "Origin": "https://shop.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key, content-type",
    }
    r = client.options("/v1/search", headers=preflight)
    assert "access-control-allow-origin" not in r.headers
    settings = make_settings(api_keys=KEY, cors_origins="https://shop.example", triton_url="127.0.0.1:9")
    with TestClient(create_app(settings, LIMITS, monitor=False, catalog_view=False)) as c:
        r = c.options("/v1/search", headers=preflight)  # no key: the preflight must not be a 401
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == "https://shop.example"
        assert "x-api-key" in r.headers["access-control-allow-headers"].lower()
        r = c.options("/v1/search", headers={**preflight, "Origin": "https://evil.example"})
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        # the actual call still needs its key, and carries the CORS header either way
        r = c.post("/v1/search", json={"user_id": "u1", "query": "x"}, headers={"Origin": "https://shop.example"})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "https://shop.example"


def test_api_keys_in_a_query_string_never_reach_the_access_log(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from services.gateway.middleware import RedactKeysFilter, redact_url

    assert redact_url("/?apiKey=s3cret&user=u1") == "/?apiKey=***&user=u1"
    assert redact_url("/x?user=u&api_key=s3cret#frag") == "/x?user=u&api_key=***#frag"
    assert redact_url("/?X-API-KEY=s3cret") == "/?X-API-KEY=***"
    assert redact_url("/?keyboard=1") == "/?keyboard=1"
    access = logging.getLogger("uvicorn.access.test")
    access.addFilter(RedactKeysFilter())
    with caplog.at_level(logging.INFO, logger="uvicorn.access.test"):
        access.info('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5", "GET", "/?apiKey=s3cret&user=u1", "1.1", 200)
    assert "s3cret" not in caplog.text and "apiKey=***" in caplog.text


def test_oversize_batches_and_bodies_are_413(client: TestClient, gw_settings: Settings) -> None:
    r = client.post("/v1/events", json={"events": [click(i) for i in range(6)]}, headers=HEADERS)
    assert r.status_code == 413 and "at most 5 events" in r.json()["detail"]
    big = {"events": [click(description="x" * 5000)]}  # over max_body_bytes before it is even parsed
    r = client.post("/v1/events", json=big, headers=HEADERS)
    assert r.status_code == 413 and "limit 4096 bytes" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit is enforced on what arrives
        yield b'{"events": ['
        for _ in range(100):
            yield json.dumps(click()).encode() + b","
        yield json.dumps(click()).encode() + b"]}"

    r = client.post("/v1/events", content=chunks(), headers={**HEADERS, "content-type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/items", json={"item_id": "i1", "title": "t", "description": "d" * 5000}, headers=HEADERS)
    assert r.status_code == 413
    assert client.post("/v1/events", json={"events": [click(i) for i in range(5)]}, headers=HEADERS).status_code == 202
    assert published(gw_settings, "behaviour") == 5
    # under the body limit but over what the worker takes per message: refused here, not dead-lettered there
    small = gw_settings.model_copy(update={"max_message_bytes": 1024})
    with TestClient(create_app(small, LIMITS, monitor=False, catalog_view=False)) as c:
        attributes = {f"a{i}": "v" * 20 for i in range(60)}  # ~2 KB: fits the 4 KiB body, not 1 KiB
        r = c.post("/v1/items", json={"item_id": "i1", "title": "t", "attributes": attributes}, headers=HEADERS)
        assert r.status_code == 413 and "the item is" in r.json()["detail"] and "at most 1024" in r.json()["detail"]
        assert published(small, "catalog") == 0
        events = {"events": [click(0), click(1, model_version="m" * 100), click(2, session_id="s" * 100)]}
        assert c.post("/v1/events", json=events, headers=HEADERS).status_code == 202  # each fits
        # a search whose filters outgrow a message: 413 (was a 500), nothing sent, nothing left waiting
        excluded = [f"item-{i:015d}" for i in range(60)]
        search = {"user_id": "u1", "query": "space", "filters": {"exclude_items": excluded}}
        r = c.post("/v1/search", json=search, headers=HEADERS)
        assert r.status_code == 413 and "the request is" in r.json()["detail"], r.text
        assert published(small, "requests") == 0
        assert c.app.state.gateway._client._pending == {}
    assert published(small, "behaviour") == 5 + 3  # same topics as above


def test_events_and_items_land_on_their_topics(client: TestClient, gw_settings: Settings) -> None:
    events = [
        click(1),
        {
            "type": "impression",
            "user_id": "u2",
            "item_id": "i9",
            "request_id": "r2",
            "position": 3,
            "propensity": 0.5,
            "model_version": "ranker-7",
        },
    ]
    r = client.post("/v1/events", json={"events": events}, headers=HEADERS)
    assert r.status_code == 202 and r.json()["accepted"] == 2
    got = sorted(read_all(gw_settings, "behaviour", 2), key=lambda e: e["user_id"])
    assert [(e["key"], e["type"], e["request_id"], e["position"]) for e in got] == [
        ("u1", "click", "r1", 1),
        ("u2", "impression", "r2", 3),
    ]
    assert [e["event_id"] for e in got] == r.json()["ids"]

    assert (
        client.post(
            "/v1/items", json={"item_id": "i1", "title": "Alien", "category": "Horror"}, headers=HEADERS
        ).status_code
        == 202
    )
    assert (
        client.put("/v1/items/i2", json={"title": "Heat", "tags": ["crime"], "price": 9.5}, headers=HEADERS).status_code
        == 202
    )
    assert client.delete("/v1/items/i1", headers=HEADERS).status_code == 202
    catalog = read_all(gw_settings, "catalog", 3)
    assert sorted((e["key"], e["op"]) for e in catalog) == [("i1", "delete"), ("i1", "upsert"), ("i2", "upsert")]
    assert next(e for e in catalog if e["key"] == "i2")["tags"] == ["crime"]


def test_search_without_a_worker_is_a_clear_504(client: TestClient, gw_settings: Settings) -> None:
    r = client.post("/v1/search", json={"user_id": "u1", "query": "space"}, headers=HEADERS)
    assert r.status_code == 504
    assert "within 1.0s" in r.json()["detail"] and "streams.worker" in r.json()["detail"]
    r = client.post("/v1/recommend", json={"user_id": "u1", "session_id": "s1", "k": 3}, headers=HEADERS)
    assert r.status_code == 504
    requests = read_all(gw_settings, "requests", 2)
    assert sorted(e["kind"] for e in requests) == ["recommend", "search"]


def test_waiting_queries_hold_no_threads_and_health_is_never_queued(gw_settings: Settings) -> None:
    """150 searches wait on Kafka at once (no worker: each ends in a 504 at its deadline). They wait
    on the event loop, not in the 40-thread pool, so all end about one timeout after they arrived,
    and /healthz answers at once meanwhile."""
    import asyncio

    app = create_app(gw_settings, LIMITS, monitor=False, catalog_view=False)

    async def run() -> tuple[list[httpx.Response], float, float, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            await c.post("/v1/search", json={"user_id": "warm", "query": "x"}, headers=HEADERS)  # connects
            t0 = time.monotonic()
            body = {"user_id": "u1", "query": "space"}
            waits = [asyncio.create_task(c.post("/v1/search", json=body, headers=HEADERS)) for _ in range(150)]
            await asyncio.sleep(0.3)
            h0 = time.monotonic()
            health = await c.get("/healthz")
            health_s = time.monotonic() - h0
            answers = await asyncio.gather(*waits)
            return answers, time.monotonic() - t0, health_s, health

    try:
        answers, wall_s, health_s, health = asyncio.run(run())
    finally:
        app.state.gateway.close()
    assert {r.status_code for r in answers} == {504}
    assert health.status_code == 200 and health_s < 0.5, health_s
    # 150 waits through 40 threads would take 4 timeouts; on the loop they overlap
    assert wall_s < 2.5 * LIMITS.request_timeout_s, wall_s


def test_health_readiness_metrics_and_openapi(
    client: TestClient, make_settings: Callable[..., Settings], triton_server
) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")  # Kafka up, Triton on a closed port: answers come, degraded
    assert r.status_code == 200
    assert r.json()["ready"] is True and r.json()["degraded"] is True and r.json()["triton"].startswith("down:")
    r = client.get("/modelz")
    assert r.status_code == 503 and r.json()["triton"].startswith("down:")

    ok = make_settings(api_keys=KEY, triton_url=triton_server.url)
    with TestClient(create_app(ok, LIMITS, monitor=False, catalog_view=False)) as c:
        state = c.get("/readyz").json()
        assert state["ready"] is True and state["kafka"] == "ok" and state["triton"] == "ok"
        assert set(state["models"]) == set(SERVED_MODELS)
        assert state["degraded"] is False and c.get("/modelz").status_code == 200  # every model loaded
        # a model unloaded: still ready (answers come, in retrieval order), and /modelz names it
        assert httpx.post(f"http://{triton_server.url}/v2/repository/models/ranker/unload", timeout=30).is_success
        try:
            r = c.get("/readyz")
            assert r.status_code == 200 and r.json()["degraded"] is True
            r = c.get("/modelz")
            assert r.status_code == 503 and r.json()["models"]["ranker"].startswith("missing")
            assert r.json()["models"]["text_encoder"] == "ok"
        finally:
            assert httpx.post(f"http://{triton_server.url}/v2/repository/models/ranker/load", timeout=120).is_success
    no_kafka = Settings(api_keys=KEY, kafka_bootstrap="127.0.0.1:9", triton_url=triton_server.url)
    with TestClient(create_app(no_kafka, LIMITS, monitor=False, catalog_view=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["kafka"].startswith("down:") and r.json()["triton"] == "ok"

    client.post("/v1/events", json={"events": [click()]})  # a 401, counted
    text = client.get("/metrics").text
    assert 'recstream_http_requests_total{method="POST",route="/v1/events",status="401"}' in text
    for n in range(3):  # made-up methods, unauthenticated: counted as one "other", not one series each
        client.request(f"M{n}", "/v1/events")
    text = client.get("/metrics").text
    assert 'method="M0"' not in text and 'method="other"' in text
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
    }
    assert spec["components"]["schemas"]["EventBatch"]["properties"]["events"]["maxItems"] == 5
    assert {"401", "403", "413", "504"} <= set(spec["paths"]["/v1/search"]["post"]["responses"])


def test_refuses_to_start_without_keys(make_settings: Callable[..., Settings]) -> None:
    with pytest.raises(ValueError, match="GATEWAY_API_KEYS"):
        create_app(make_settings(api_keys=" , "))


def test_feedback_labels_are_bounded_to_versions_the_worker_served(gw_settings: Settings) -> None:
    """A client's free-text model_version never becomes a label value: 200 made-up versions add one
    series ("other"), and a result served here labels its clicks with the worker's version."""
    from prometheus_client import REGISTRY

    from recstream.contracts.events import BehaviourEvent, RankedItem, RecommendationResult
    from services.gateway.app import Gateway

    gw = Gateway(gw_settings, LIMITS)
    result = RecommendationResult(
        request_id="served1",
        user_id="u1",
        items=[RankedItem(item_id="i1", score=1.0, position=0, propensity=1.0)],
        model_version="ranker-v7-labeltest",
        policy="greedy",
    )
    gw.remember(result)
    junk = [
        BehaviourEvent(type="click", user_id="u1", item_id="i1", position=0, model_version=f"made-up-{i}")
        for i in range(200)
    ]
    gw.count_feedback([*junk, result.feedback(result.items[0], "click")])

    def versions() -> set[str]:
        return {
            s.labels["model_version"]
            for metric in REGISTRY.collect()
            if metric.name == "recstream_clicks"
            for s in metric.samples
            if s.name.endswith("_total")
        }

    seen = versions()
    assert not any(v.startswith("made-up-") for v in seen), seen
    assert {"other", "ranker-v7-labeltest"} <= seen
    clicks = REGISTRY.get_sample_value(
        "recstream_clicks_total", {"model_version": "ranker-v7-labeltest", "arm": "greedy"}
    )
    assert clicks is not None and clicks >= 1


def test_a_write_dropped_by_another_requests_timeout_is_not_202(free_port: int, tmp_path) -> None:
    """Two requests share the gateway's producer while the broker does not answer. The first one's
    timeout drops everything still queued (so a late write cannot prove its 503 wrong), the second
    request's event included; the second must then hear 503 too, not 202 for an event never
    written (its own wait used to see an empty queue and no error, the purge reports cleared)."""
    from fastapi import HTTPException

    from recstream.contracts.events import BehaviourEvent
    from services.gateway.app import Gateway

    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port}", run_dir=tmp_path)
    gateway = Gateway(settings, GatewayLimits(publish_timeout_s=1.5))
    outcomes: dict[str, int] = {}

    def write(user: str, after_s: float) -> None:
        time.sleep(after_s)
        try:
            gateway.publish("behaviour", [BehaviourEvent(type="click", user_id=user, item_id="i1")], time.monotonic())
            outcomes[user] = 202
        except HTTPException as exc:
            outcomes[user] = exc.status_code

    threads = [
        threading.Thread(target=write, args=("first", 0.0)),
        threading.Thread(target=write, args=("second", 0.5)),
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert outcomes == {"first": 503, "second": 503}
    finally:
        gateway.close()


def test_a_write_that_queued_past_its_budget_is_refused_at_once(free_port: int, tmp_path) -> None:
    """With the broker down, writes queue for the 40 worker threads: each then waited its whole
    publish timeout again, so callers heard 503 after up to three times the configured budget.
    And a nearly expired write must not send: its timeout would drop a fresher write's message."""
    from fastapi import HTTPException

    from recstream.contracts.events import BehaviourEvent
    from services.gateway.app import Gateway

    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port}", run_dir=tmp_path)
    gateway = Gateway(settings, GatewayLimits(publish_timeout_s=2.0))
    event = BehaviourEvent(type="click", user_id="u", item_id="i1")
    failed_after: dict[str, float] = {}

    def write(name: str, waited_s: float) -> None:
        t0 = time.monotonic()
        try:
            gateway.publish("behaviour", [event], received=t0 - waited_s)
        except HTTPException as exc:
            assert exc.status_code == 503
            failed_after[name] = time.monotonic() - t0

    try:
        write("spent", 2.5)
        assert failed_after["spent"] < 0.2  # refused before sending: no wait at all
        fresh = threading.Thread(target=write, args=("fresh", 0.0))
        fresh.start()
        time.sleep(0.2)
        write("nearly expired", 1.7)  # 0.3 s left, under a fifth of 2 s: refused, sends nothing
        fresh.join(10)
        assert failed_after["nearly expired"] < 0.2
        assert failed_after["fresh"] > 1.5  # its own budget, not cut short by another write's purge
    finally:
        gateway.close()


def answer_requests(settings: Settings, stop: threading.Event) -> None:
    """Stands in for the stream worker's reply path (tested on its own elsewhere): every request on
    the requests topic gets a one-item result on the recommendations topic."""
    from recstream.client import EventProducer
    from recstream.contracts.events import RankedItem, RecommendationResult

    topic = TOPICS["requests"].name(settings.topic_prefix)
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"answer-{topic}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    producer = EventProducer(settings, worker="test-answers")
    try:
        while not stop.is_set():
            for msg in consumer.consume(num_messages=10, timeout=0.2):
                if msg.error():
                    continue
                request = json.loads(msg.value())
                item = RankedItem(item_id="i1", score=1.0, position=0, propensity=1.0)
                result = RecommendationResult(
                    request_id=request["request_id"], user_id=request["user_id"], items=[item], model_version="v1"
                )
                producer.send("recommendations", result)
            producer.flush(5)
    finally:
        consumer.close()
        producer.close(5)


def test_recommend_before_the_results_topic_exists_is_503_and_answers_once_it_does(
    kafka_bootstrap: str, tmp_path
) -> None:
    """Asked before anything created the topics (the broker does not auto-create them), the
    gateway says so at once (503) and keeps no client that listens to nothing: once the topics
    exist, the next request gets its answer (a client cached with zero partitions answered 504
    to every request for the life of the process)."""
    import uuid

    from recstream.kafka.admin import ensure_topics

    settings = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{uuid.uuid4().hex[:10]}.", run_dir=tmp_path)
    app = create_app(settings.model_copy(update={"api_keys": KEY}), LIMITS, monitor=False, catalog_view=False)
    body = {"user_id": "u1", "session_id": "s1", "k": 3}
    with TestClient(app) as c:
        r = c.post("/v1/recommend", json=body, headers=HEADERS)
        assert r.status_code == 503, r.text
        assert "cannot be read" in r.json()["detail"] and "stream worker" in r.json()["detail"]

        ensure_topics(settings)
        stop = threading.Event()
        responder = threading.Thread(target=answer_requests, args=(settings, stop), daemon=True)
        responder.start()
        try:
            codes = []
            for _ in range(10):  # the responder's group may still be joining: a 504 or two first
                r = c.post("/v1/recommend", json=body, headers=HEADERS)
                codes.append(r.status_code)
                if r.status_code == 200:
                    break
            assert codes[-1] == 200, codes
            assert [i["item_id"] for i in r.json()["items"]] == ["i1"]
        finally:
            stop.set()
            responder.join(10)


def test_connecting_to_a_dead_broker_keeps_the_deadline_and_blocks_nothing(free_port: int, tmp_path) -> None:
    """The results client connects once, in its own thread: a request waits for it only until its
    own deadline (the connection attempt runs ~10 s against a dead broker), and feedback counting,
    which takes the gateway's lock on the event loop, is not held up meanwhile."""
    import asyncio

    from fastapi import HTTPException

    from recstream.contracts.events import RankedItem, RecommendationRequest, RecommendationResult
    from services.gateway.app import Gateway

    settings = Settings(kafka_bootstrap=f"127.0.0.1:{free_port}", run_dir=tmp_path)
    gateway = Gateway(settings, LIMITS)
    outcome: dict[str, object] = {}

    def ask() -> None:
        t0 = time.monotonic()
        try:
            asyncio.run(gateway.ask(RecommendationRequest(user_id="u1", k=3), arrival=t0))
        except HTTPException as exc:
            outcome["status"], outcome["detail"] = exc.status_code, exc.detail
        outcome["seconds"] = time.monotonic() - t0

    asker = threading.Thread(target=ask)
    try:
        asker.start()
        time.sleep(0.3)  # the connection is under way
        t0 = time.monotonic()
        served = RecommendationResult(
            request_id="r1",
            user_id="u1",
            items=[RankedItem(item_id="i1", score=1.0, position=0, propensity=1.0)],
            model_version="v1",
        )
        gateway.remember(served)
        assert time.monotonic() - t0 < 0.5, "remember waited for the connection"
        asker.join(30)
        assert outcome["status"] == 503, outcome
        assert "within 1.0s" in str(outcome["detail"]), outcome
        assert outcome["seconds"] < LIMITS.request_timeout_s + 1.0, outcome
    finally:
        gateway.close()

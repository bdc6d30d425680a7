"""The gateway's ASGI middleware on its own (no broker): what a request that never got an answer is
counted as."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from services.gateway.middleware import BodyLimitMiddleware, MetricsMiddleware


def _count(status: str) -> float:
    labels = {"route": "unmatched", "method": "POST", "status": status}
    return REGISTRY.get_sample_value("recstream_http_requests_total", labels) or 0.0


def test_a_client_that_hangs_up_mid_upload_is_counted_as_gone_not_as_a_server_error() -> None:
    """An aborted upload (a phone losing signal) was counted as a 500 and fed the 5xx alert."""

    async def app(scope, receive, send) -> None:
        raise AssertionError("the body never completed: the app must not be called")

    stack = MetricsMiddleware(BodyLimitMiddleware(app, max_bytes=1000), routes=lambda: [])
    messages = iter([{"type": "http.request", "body": b'{"ev', "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    gone, errors = _count("499"), _count("500")
    scope = {"type": "http", "method": "POST", "path": "/v1/events", "headers": []}
    asyncio.run(stack(scope, receive, send))
    assert sent == []
    assert _count("499") == gone + 1 and _count("500") == errors


def test_an_app_that_raises_is_still_a_server_error() -> None:
    async def app(scope, receive, send) -> None:
        raise RuntimeError("bug")

    stack = MetricsMiddleware(app, routes=lambda: [])
    errors = _count("500")
    scope = {"type": "http", "method": "POST", "path": "/v1/events", "headers": []}

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        pass

    with pytest.raises(RuntimeError, match="bug"):
        asyncio.run(stack(scope, receive, send))
    assert _count("500") == errors + 1


def test_a_writes_budget_starts_when_its_body_is_in_not_when_it_arrived() -> None:
    """The publish budget counted from arrival: a slow client's upload used it up, and an idle
    gateway answered its writes 503 'saturated'."""
    from starlette.requests import Request

    from services.gateway.middleware import arrival_of, body_received_of

    seen: dict[str, float] = {}

    async def app(scope, receive, send) -> None:
        request = Request(scope)
        seen["arrival"], seen["received"] = arrival_of(request), body_received_of(request)

    stack = MetricsMiddleware(BodyLimitMiddleware(app, max_bytes=1000), routes=lambda: [])
    chunks = iter([b'{"events": ', b"[]}"])

    async def slow_upload() -> dict:
        await asyncio.sleep(0.3)
        chunk = next(chunks)
        return {"type": "http.request", "body": chunk, "more_body": chunk != b"[]}"}

    async def send(message: dict) -> None:
        pass

    scope = {"type": "http", "method": "POST", "path": "/v1/events", "headers": []}
    asyncio.run(stack(scope, slow_upload, send))
    assert seen["received"] - seen["arrival"] >= 0.5

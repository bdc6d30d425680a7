"""Pure-ASGI middleware: metrics, API-key auth and body-size limits, in that order (outermost first).

They run before FastAPI reads or parses the body, so a request without a valid key or with an
oversized body is refused before any JSON is decoded, validated or published.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Sequence

from starlette.requests import Request
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from recstream.telemetry import HTTP_LATENCY, HTTP_REQUESTS

log = logging.getLogger(__name__)

#: Methods counted by name; any other (a client may send "M0", "M1", ... before authentication)
#: is counted as "other", so the metric's label set cannot grow without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})

API_KEY_HEADER = "x-api-key"
# ?apiKey=... (the playground's deep link), ?api_key=, ?x-api-key=: redacted wherever a URL is logged
_KEY_IN_QUERY = re.compile(r"(?i)([?&](?:x[-_]?)?api[-_]?key=)[^&#\s]*")


def redact_url(url: str) -> str:
    """`url` with the value of any API-key query parameter replaced by ***."""
    return _KEY_IN_QUERY.sub(r"\1***", url)


class RedactKeysFilter(logging.Filter):
    """For uvicorn's access log (args: client, method, path with query, version, status): a key
    passed in a query string never reaches a log line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_url(a) if isinstance(a, str) else a for a in record.args)
        if isinstance(record.msg, str):
            record.msg = redact_url(record.msg)
        return True


async def _send_json(send: Send, status: int, body: dict, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    payload = json.dumps(body).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def key_status(presented: str | None, keys: Sequence[str]) -> int | None:
    """None if `presented` is a valid key, else 401 (missing) or 403 (wrong).

    Every configured key is compared with hmac.compare_digest and the loop never exits early, so
    the time taken does not reveal how much of a key matched or which key it was.
    """
    if not presented:
        return 401
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(presented.encode(), key.encode())
    return None if ok else 403


ARRIVAL = "arrival_monotonic"


#: The status a request is counted under when its client went away before any response was sent.
CLIENT_CLOSED = 499


#: Scope state key: when the whole body had been read (time.monotonic()).
BODY_RECEIVED = "recstream_body_received"


def body_received_of(request: Request) -> float:
    """When the request's body was in (time.monotonic()): a write's publish budget counts from here,
    so a slow client's upload is not charged to the broker's wait."""
    state = request.scope.get("state", {})
    return float(state.get(BODY_RECEIVED, state.get(ARRIVAL, time.monotonic())))


def arrival_of(request: Request) -> float:
    """When the request reached the gateway (time.monotonic()): deadlines count from here, so time
    spent waiting for a worker thread or the event loop is part of the budget."""
    return float(request.scope.get("state", {}).get(ARRIVAL, time.monotonic()))


class MetricsMiddleware:
    """Stamp each request's arrival; count and time every request by route template (not the raw
    path: item ids would explode cardinality)."""

    def __init__(self, app: ASGIApp, routes: Callable[[], Sequence[BaseRoute]]) -> None:
        self.app = app
        self.routes = routes

    def _route(self, scope: Scope) -> str:
        for route in self.routes():
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return getattr(route, "path", "other")
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[ARRIVAL] = time.monotonic()
        # a request that ends without a response was abandoned by its client (nginx's 499), unless
        # the app raised: that is ours (500)
        route, status, t0 = self._route(scope), CLIENT_CLOSED, time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except BaseException:
            if status == CLIENT_CLOSED:
                status = 500
            raise
        finally:
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
            HTTP_LATENCY.labels(route=route).observe(time.perf_counter() - t0)


class ApiKeyMiddleware:
    """401 without an X-API-Key header, 403 with a wrong one, for every path under `protected_prefix`."""

    def __init__(self, app: ASGIApp, keys: Sequence[str], protected_prefix: str = "/v1/") -> None:
        self.app = app
        self.keys = list(keys)
        self.prefix = protected_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        presented = next((v.decode("latin-1") for k, v in scope["headers"] if k == API_KEY_HEADER.encode()), None)
        status = key_status(presented, self.keys)
        if status == 401:
            await _send_json(
                send,
                401,
                {"detail": "missing API key: send it in the X-API-Key header"},
                [(b"www-authenticate", b"APIKey")],
            )
        elif status == 403:
            log.info("rejected a request to %s with an invalid API key", scope["path"])
            await _send_json(send, 403, {"detail": "invalid API key"})
        else:
            await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a body over `max_bytes`, judged by Content-Length or, when chunked, by what arrives.

    The body is buffered up to the limit (so memory per request is bounded by it) and replayed
    to the app; nothing past the limit is ever read.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _too_large(self, send: Send, size: int | None) -> None:
        got = f"{size} bytes" if size is not None else "a larger body"
        await _send_json(send, 413, {"detail": f"request body too large: {got}, limit {self.max_bytes} bytes"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(send, int(length))
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large(send, None)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        scope.setdefault("state", {})[BODY_RECEIVED] = time.monotonic()
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

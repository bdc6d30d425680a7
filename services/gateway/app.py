"""The HTTP gateway: ingest, search, recommend and catalog writes over HTTP, on the same Kafka topics.

There is no second ranking path: search and recommend publish a RecommendationRequest on the
requests topic and wait for the stream worker's RecommendationResult (RecommendationClient), so an
HTTP caller gets exactly what a Kafka-native application would. Writes are acknowledged (202)
only after the broker has them (acks=all), so a 202 means durable, not just queued.

No `from __future__ import annotations` here: FastAPI must resolve the batch model built inside
`create_app` from the live annotation.
"""

import asyncio
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator
from concurrent.futures import Future
from contextlib import asynccontextmanager
from pathlib import Path as FsPath
from typing import Annotated, Any

import httpx
from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from fastapi import Body, FastAPI, HTTPException, Request, Security
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, create_model

from recstream.client import DeliveryError, EventProducer, RecommendationClient, TopicUnavailable
from recstream.client.producer import MessageTooLarge
from recstream.config import Settings
from recstream.contracts.events import (
    BehaviourEvent,
    BehaviourType,
    ItemDelete,
    ItemUpsert,
    RecommendationRequest,
    RecommendationResult,
)
from recstream.contracts.models import SERVED_MODELS
from recstream.contracts.topics import BEHAVIOUR, CATALOG, RECOMMENDATIONS, REQUESTS
from recstream.telemetry import CLICKS, IMPRESSIONS
from services.gateway.background import CatalogView, OpsMonitor
from services.gateway.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    arrival_of,
    body_received_of,
    key_status,
)
from services.gateway.schemas import (
    ERRORS,
    WAIT_ERRORS,
    Accepted,
    GatewayLimits,
    GatewayResult,
    ItemFields,
    ItemIdPath,
    Readiness,
    RecommendBody,
    SearchBody,
)

log = logging.getLogger(__name__)

STATIC_DIR = FsPath(__file__).parent / "static"
#: Distinct model versions kept as metric label values (older ones fall out; unknown ones are "other").
MAX_VERSION_LABELS = 32


#: The share of the publish budget a write must have left to be sent at all (Gateway.publish).
PUBLISH_FLOOR_SHARE = 0.2
#: How deep an invalid input is echoed back in a 422; deeper parts read "...". A 1 kB body nested
#: 500 levels deep recursed past Python's limit and turned the 422 into a 500.
ECHO_DEPTH = 8


def _json_safe(value: Any, depth: int = ECHO_DEPTH) -> Any:
    """`value` with non-finite floats as text, unencodable strings and raw (non-UTF-8) bodies
    backslash-escaped, and nesting cut at `depth`."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", "backslashreplace")
    if isinstance(value, dict | list | tuple) and depth <= 0:
        return "..."
    if isinstance(value, dict):
        return {_json_safe(k, depth - 1): _json_safe(v, depth - 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v, depth - 1) for v in value]
    return value


class GatewayClosing(RuntimeError):
    """A connection finished after close(): the request waiting on it is answered 503."""


class Gateway:
    """Process-wide Kafka handles, created lazily so the app starts (and /readyz reports) without Kafka."""

    def __init__(self, settings: Settings, limits: GatewayLimits) -> None:
        self.settings = settings
        self.limits = limits
        self._lock = threading.Lock()
        self._producer: EventProducer | None = None
        self._client: RecommendationClient | None = None
        # The client connects in a thread of its own (seconds when Kafka is slow, up to a minute
        # when it is down), once for all requests waiting on it, and never under self._lock:
        # feedback counting takes that lock on the event loop.
        self._connecting: Future[RecommendationClient] | None = None
        self._closes = 0  # a connection that outlives a close() is closed, not kept
        self._admin: AdminClient | None = None
        # request_id -> (model_version, arm) of results served here, so clicks get the arm label.
        self._served: OrderedDict[str, tuple[str, str]] = OrderedDict()
        # model versions the worker has answered with (label values), most recent last
        self._versions: OrderedDict[str, None] = OrderedDict()
        self.catalog: CatalogView | None = None
        self.monitor: OpsMonitor | None = None

    @property
    def producer(self) -> EventProducer:
        with self._lock:
            if self._producer is None:
                self._producer = EventProducer(self.settings, worker="gateway")
            return self._producer

    def _connect(self) -> Future[RecommendationClient]:
        """The client's construction, started by the first request that needs it; a failed one
        (Kafka down, topic missing) is retried by the next request, never cached."""
        with self._lock:
            failed = self._connecting is not None and self._connecting.done() and self._connecting.exception()
            if self._connecting is None or failed:
                self._connecting = Future()
                # a daemon thread: a connection hanging on a dead broker must not hold up exit
                threading.Thread(
                    target=self._build_client,
                    args=(self._connecting, self._closes),
                    name="rec-client-connect",
                    daemon=True,
                ).start()
            return self._connecting

    def _build_client(self, done: Future[RecommendationClient], closes: int) -> None:
        done.set_running_or_notify_cancel()
        try:
            client = RecommendationClient(self.settings)
        except BaseException as exc:
            done.set_exception(exc)
            return
        with self._lock:
            current = closes == self._closes
            if current:
                self._client = client
        if current:
            done.set_result(client)
        else:  # the gateway closed while this one connected: nobody else would close it
            client.close()
            done.set_exception(GatewayClosing("the gateway is shutting down"))

    @property
    def admin(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                self._admin = AdminClient({"bootstrap.servers": self.settings.kafka_bootstrap})
            return self._admin

    def publish(self, topic: str, events: list[BaseModel], received: float) -> None:
        """Send and wait for the broker's ack; 503 if it does not come within publish_timeout_s of
        the body's receipt (time spent queued for a worker thread counts: while the broker is down,
        writes queue behind each other and waited up to three times the timeout).

        A write left with under a fifth of its budget is refused before it sends anything: a wait
        that times out drops every unsent message of the shared producer, so a nearly expired write
        would fail fresher ones with it.

        Each message must fit the limit the stream worker applies (MAX_MESSAGE_BYTES), checked
        before anything is sent: a 202 for a message the worker would dead-letter is a lie."""
        waited = time.monotonic() - received
        remaining = self.limits.publish_timeout_s - waited
        if remaining < PUBLISH_FLOOR_SHARE * self.limits.publish_timeout_s:
            raise HTTPException(503, f"the gateway is saturated: the write waited {waited:.1f} s for a thread; retry")
        producer = self.producer
        outgoing = []
        for i, event in enumerate(events):
            try:
                outgoing.append(producer.prepare(topic, event))
            except MessageTooLarge as exc:
                where = f"event {i}" if len(events) > 1 else "the item" if topic == "catalog" else "the event"
                raise HTTPException(413, f"{where} is {exc}") from exc
        try:
            # acknowledged one by one for this request: concurrent requests share the producer
            producer.deliver(outgoing, remaining)
        except DeliveryError as exc:
            # what was never sent is dropped, so it is not written after this 503; what was in
            # flight may still land, which is why behaviour events carry an event_id the worker
            # deduplicates: a client's retry with the same body never doubles an event
            log.error("publish to %s failed: %s", topic, exc)
            raise HTTPException(
                503, f"the broker did not acknowledge the write: {exc}; retry with the same event_id(s)"
            ) from exc

    def remember(self, result: RecommendationResult) -> None:
        with self._lock:
            self._served[result.request_id] = (result.model_version, result.policy)
            while len(self._served) > 100_000:
                self._served.popitem(last=False)
            self._versions[result.model_version] = None
            self._versions.move_to_end(result.model_version)
            while len(self._versions) > MAX_VERSION_LABELS:
                self._versions.popitem(last=False)

    def count_feedback(self, events: list[BehaviourEvent]) -> None:
        """Impressions/clicks by model version and arm, for online CTR (ratio computed in PromQL)."""
        for e in events:
            if e.type not in (BehaviourType.impression, BehaviourType.click):
                continue
            with self._lock:
                version, arm = self._served.get(e.request_id or "", (None, "unknown"))
                claimed = e.model_version
                # a label value must come from the worker (a result served here), never from the
                # client's free text: 10,000 made-up versions were 10,000 series on /metrics
                if claimed is not None and claimed not in self._versions:
                    claimed = "other"
            counter = IMPRESSIONS if e.type == BehaviourType.impression else CLICKS
            counter.labels(model_version=version or claimed or "unknown", arm=arm).inc()

    async def ask(self, request: RecommendationRequest, arrival: float) -> GatewayResult:
        """Publish the request and await its answer on the event loop (no thread waits on Kafka),
        until request_timeout_s after the request *arrived*: time spent queued counts."""
        timeout = self.limits.request_timeout_s
        client = self._client or await self._connected_client(arrival + timeout)
        try:
            result = await client.ask(request, deadline=arrival + timeout)
        except MessageTooLarge as exc:  # e.g. thousands of exclude_items: the worker would refuse it
            raise HTTPException(413, f"the request is {exc}") from exc
        except DeliveryError as exc:  # never reached the broker: say so now, not at the deadline
            raise HTTPException(503, f"{exc}; retry") from exc
        except TimeoutError as exc:
            log.warning("no result for %s within %ss of its arrival", request.request_id, timeout)
            raise HTTPException(
                504,
                f"no recommendation for request {request.request_id} within {timeout}s: "
                "is the stream worker (python -m streams.worker) running and caught up?",
            ) from exc
        self.remember(result)
        titles = {}
        if self.catalog is not None:
            titles = {i.item_id: meta["title"] for i in result.items if (meta := self.catalog.get(i.item_id))}
        return GatewayResult(**result.model_dump(), titles=titles)

    async def _connected_client(self, deadline: float) -> RecommendationClient:
        """Wait for the client's connection, at most until the request's deadline (the connection
        goes on for the requests after this one)."""
        connecting = asyncio.wrap_future(self._connect())
        # a request that stopped waiting never reads the outcome: read it here, or asyncio logs
        # "exception was never retrieved" for every such request while Kafka is down
        connecting.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.wait_for(asyncio.shield(connecting), max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise HTTPException(
                503, f"not connected to Kafka within {self.limits.request_timeout_s}s of the request's arrival"
            ) from exc
        except TopicUnavailable as exc:
            raise HTTPException(503, str(exc)) from exc
        except KafkaException as exc:
            raise HTTPException(503, f"Kafka is unreachable: {exc}") from exc
        except GatewayClosing as exc:
            raise HTTPException(503, str(exc)) from exc

    def _kafka_state(self) -> str:
        """'ok' when every topic the gateway writes or reads exists and answers (a missing
        recommendations topic failed every query while readiness said ready)."""
        prefix = self.settings.topic_prefix
        needed = [t.name(prefix) for t in (BEHAVIOUR, CATALOG, REQUESTS, RECOMMENDATIONS)]
        try:  # 2 s: a probe must answer well inside an orchestrator's probe timeout
            meta = self.admin.list_topics(timeout=2.0)
        except KafkaException as exc:
            return f"down: {exc}"
        for topic in needed:
            info = meta.topics.get(topic)
            if info is None:
                return f"down: topic {topic} does not exist"
            if info.error is not None:
                return f"down: topic {topic}: {info.error}"
        return "ok"

    async def _triton_state(self) -> tuple[str, dict[str, str]]:
        """The server's and each served model's readiness, asked at once (one after another they
        took up to 12 s when Triton was slow)."""
        base = f"http://{self.settings.triton_url}/v2"
        paths = ["/health/ready", *(f"/models/{name}/ready" for name in SERVED_MODELS)]
        try:
            # plain http: verify=False skips loading the CA bundle, ~25 ms on the event loop per probe
            async with httpx.AsyncClient(timeout=2.0, verify=False) as client:
                codes = [r.status_code for r in await asyncio.gather(*(client.get(base + p) for p in paths))]
        except httpx.HTTPError as exc:
            return f"down: {type(exc).__name__}: {exc}", {}
        # tritonserver says not ready while any model is unavailable
        triton = "ok" if codes[0] == 200 else f"not ready: /v2/health/ready answered {codes[0]}"
        models = {
            name: "ok" if code == 200 else f"missing: /v2/models/{name}/ready answered {code}"
            for name, code in zip(SERVED_MODELS, codes[1:], strict=True)
        }
        return triton, models

    async def readiness(self) -> Readiness:
        """Kafka and Triton asked side by side, Kafka off the request thread pool, so a probe is
        answered in about 2 s at worst and never waits behind queued writes."""
        kafka, (triton, models) = await asyncio.gather(asyncio.to_thread(self._kafka_state), self._triton_state())
        degraded = triton != "ok" or any(v != "ok" for v in models.values())
        return Readiness(ready=kafka == "ok", degraded=degraded, kafka=kafka, triton=triton, models=models)

    def start_background(self, catalog_view: bool, monitor: bool) -> None:
        if catalog_view and self.catalog is None:
            self.catalog = CatalogView(self.settings).start()
        if monitor and self.monitor is None:
            self.monitor = OpsMonitor(self.settings).start()

    def close(self) -> None:
        for part in (self.monitor, self.catalog):
            if part is not None:
                part.stop()
        with self._lock:
            self._closes += 1
            client, self._client, self._connecting = self._client, None, None
        if client is not None:
            try:
                client.close()
            except DeliveryError as exc:  # the gateway's own producer below still gets closed
                log.error("undelivered requests at shutdown: %s", exc)
        if self._producer is not None:
            try:
                self._producer.close(self.limits.publish_timeout_s)
            except DeliveryError as exc:
                log.error("undelivered events at shutdown: %s", exc)
            self._producer = None
        self._admin = None  # AdminClient has no close(): dropping the last reference stops its threads


def create_app(
    settings: Settings,
    limits: GatewayLimits | None = None,
    *,
    catalog_view: bool = True,
    monitor: bool = True,
) -> FastAPI:
    """Build the gateway app for `settings` (API keys from settings.api_keys; refuses to start without)."""
    limits = limits or GatewayLimits()
    keys = settings.api_key_list
    if not keys:
        raise ValueError("no API keys configured: set GATEWAY_API_KEYS (comma-separated)")
    gw = Gateway(settings, limits)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        gw.start_background(catalog_view, monitor)
        try:
            yield
        finally:
            gw.close()

    app = FastAPI(
        title="recstream gateway",
        version="1",
        description="HTTP access to recstream's Kafka topics for applications that don't speak Kafka. "
        "Every /v1 call needs an X-API-Key header.",
        lifespan=lifespan,
    )
    app.state.gateway = gw

    def require_key(key: Annotated[str | None, Security(APIKeyHeader(name="X-API-Key", auto_error=False))]) -> None:
        """Documents the scheme in OpenAPI; ApiKeyMiddleware enforces it before the body is read."""
        status = key_status(key, keys)
        if status is not None:
            raise HTTPException(status, "missing API key" if status == 401 else "invalid API key")

    EventBatch = create_model(  # a class, built here because max_batch is per app
        "EventBatch",
        __config__=ConfigDict(extra="forbid"),  # each event is Inbound itself: no second walk
        events=(Annotated[list[BehaviourEvent], Field(min_length=1, max_length=limits.max_batch)], ...),
    )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> Response:
        # A batch over max_batch is a size problem (413), not a malformed field (422).
        for err in exc.errors():
            if err.get("type") == "too_long" and tuple(err.get("loc", ())) == ("body", "events"):
                return JSONResponse(
                    {"detail": f"batch too large: at most {limits.max_batch} events per request"}, status_code=413
                )
        # FastAPI's handler echoes each bad input; NaN or a lone surrogate cannot be rendered as
        # JSON, which turned a 422 into a 500. Echo them as escaped text instead.
        return JSONResponse({"detail": jsonable_encoder(_json_safe(exc.errors()))}, status_code=422)

    deps = [Security(require_key)]
    # Writes are accepted (202) once on Kafka; queries wait for the stream worker's answer.
    write = {"status_code": 202, "response_model": Accepted, "responses": ERRORS, "dependencies": deps}
    query = {"response_model": GatewayResult, "responses": WAIT_ERRORS, "dependencies": deps, "tags": ["query"]}
    catalog_write = {**write, "tags": ["catalog"]}

    @app.post("/v1/events", **write, tags=["ingest"])
    def ingest(batch: EventBatch, request: Request) -> Accepted:  # type: ignore[valid-type]
        """Publish a batch of behaviour events (impressions, clicks, ...) to the behaviour topic."""
        events: list[BehaviourEvent] = batch.events
        gw.publish("behaviour", events, body_received_of(request))
        gw.count_feedback(events)
        return Accepted(accepted=len(events), ids=[e.event_id for e in events])

    @app.post("/v1/search", **query)
    async def search(body: SearchBody, request: Request) -> GatewayResult:  # type: ignore[valid-type]
        """Text search, ranked by the stream worker for this user/session."""
        return await gw.ask(RecommendationRequest(kind="search", **body.model_dump()), arrival_of(request))

    @app.post("/v1/recommend", **query)
    async def recommend(body: RecommendBody, request: Request) -> GatewayResult:  # type: ignore[valid-type]
        """Recommendations for the user's current session."""
        return await gw.ask(RecommendationRequest(kind="recommend", **body.model_dump()), arrival_of(request))

    @app.post("/v1/items", **catalog_write)
    def create_item(item: ItemUpsert, request: Request) -> Accepted:
        """Create or replace an item (idempotent by item_id)."""
        gw.publish("catalog", [item], body_received_of(request))
        return Accepted(accepted=1, ids=[item.item_id])

    @app.put("/v1/items/{item_id}", **catalog_write)
    def put_item(item_id: ItemIdPath, fields: Annotated[ItemFields, Body()], request: Request) -> Accepted:  # type: ignore[valid-type]
        """Create or replace the item at this id."""
        gw.publish("catalog", [ItemUpsert(item_id=item_id, **fields.model_dump())], body_received_of(request))
        return Accepted(accepted=1, ids=[item_id])

    @app.delete("/v1/items/{item_id}", **catalog_write)
    def delete_item(item_id: ItemIdPath, request: Request) -> Accepted:
        """Delete an item (the indexer removes it from retrieval)."""
        gw.publish("catalog", [ItemDelete(item_id=item_id)], body_received_of(request))
        return Accepted(accepted=1, ids=[item_id])

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:  # on the event loop: never queued behind threaded work
        """Liveness: the process is up and serving HTTP (checks nothing else, so it never flaps)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["ops"])
    async def readyz() -> Response:
        """Readiness for a load balancer: 200 while answers can be served (Kafka reachable), degraded
        ones included (Triton down: the worker answers in retrieval order, `degraded: true`);
        503 only when Kafka is unreachable or a topic the gateway uses is missing. A model missing
        is /modelz's signal, not this one's."""
        state = await gw.readiness()
        return JSONResponse(state.model_dump(), status_code=200 if state.ready else 503)

    @app.get("/modelz", response_model=Readiness, responses={503: {"model": Readiness}}, tags=["ops"])
    async def modelz() -> Response:
        """For alerting and deploy checks: 200 only when Triton is up and serves every model of
        model_repo/ (text_encoder, item_encoder, session_encoder, ranker); 503 names what is missing."""
        state = await gw.readiness()
        return JSONResponse(state.model_dump(), status_code=503 if state.degraded else 200)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def playground() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # Added innermost first: requests pass metrics -> auth -> body limit -> FastAPI.
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=keys)
    app.add_middleware(MetricsMiddleware, routes=lambda: app.routes)
    if settings.cors_origin_list:
        # outermost, so a browser's preflight (OPTIONS, no key) is answered before auth refuses it
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "PUT", "DELETE"],
            allow_headers=["x-api-key", "content-type"],
            max_age=600,
        )
    return app

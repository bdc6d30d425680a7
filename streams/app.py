"""The one faust App of the stream processors, built by a factory (no module-global app, faust #439).

faust runs the catalog indexer. The behaviour topic (session features and the feedback joiner) is
consumed outside faust, in batches on its own thread (streams.behaviour), and so are requests
(streams.requests, assigned the same partitions as behaviour, so a user's session is local).

State contract: the app id names the consumer groups (`<app id>-behaviour`, `<app id>-requests`;
faust's group, the catalog indexer's, see catalog_group) and every table's changelog topic
(`<app id>-<table>-changelog`). Tables
recover from those changelogs after a restart, so the id and APP_VERSION are part of the state
contract: changing either starts from empty tables and re-consumes the source topics from the
beginning; changing a table's value encoding without bumping APP_VERSION would make a restarted
worker read old bytes with new code.
"""

from __future__ import annotations

from collections.abc import Iterable

import faust

from recstream.config import Settings
from recstream.contracts.topics import BEHAVIOUR, CATALOG, REQUESTS
from streams import registry
from streams.behaviour import BehaviourLoop
from streams.context import StreamContext
from streams.naming import app_id, catalog_group
from streams.registry import ALL_AGENTS
from streams.requests import RequestLoop


def create_app(
    settings: Settings,
    agents: Iterable[str] = ALL_AGENTS,
    *,
    worker: str = "streams",
    ranker: str = "auto",
) -> faust.App:
    """Build the app and register the chosen agents on it. `app.ctx` is the StreamContext."""
    specs = registry.specs_for(agents)
    agents = tuple(spec.name for spec in specs)
    datadir = settings.run_dir / "faust" / catalog_group(settings)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        catalog_group(settings),
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",  # rocksdb is not installed; tables recover from their changelog topics
        # Every key and value is our own bytes. Tables must also say key_type/value_type=bytes:
        # their changelog serializer comes from those, not from the schema, and with faust's json
        # default user b"23" was recovered as int 23, so recovered state was never found after a
        # restart (caught by the kill -9 test).
        key_serializer="raw",
        value_serializer="raw",
        datadir=str(datadir),
        topic_replication_factor=1,
        topic_partitions=4,  # = behaviour/requests partitions: tables co-partition with them
        table_standby_replicas=0,  # one worker on the embedded stack; standbys would double the work
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        stream_wait_empty=False,
        stream_buffer_maxsize=16384,
        broker_commit_interval=1.0,
        producer_linger=0.005,  # changelog writes: 5 ms lets many table updates share a request
        producer_max_batch_size=1_000_000,
        # A worker restarted after kill -9 must not wait for the dead member's session to expire
        # for long; 10 s is faust's floor that still tolerates a busy 2-core box.
        broker_session_timeout=10.0,
        broker_heartbeat_interval=1.0,
    )
    ctx = StreamContext(
        settings=settings,
        worker=worker,
        app=app,
        agents=agents,
        ranker_mode=ranker,
    )
    app.ctx = ctx  # type: ignore[attr-defined]

    for table, declare in registry.SHARED_TABLES.items():
        if any(table in spec.writes + spec.reads for spec in specs):
            declare(ctx)
    behaviour = []
    for spec in specs:
        built = spec.build(ctx)
        if spec.source == BEHAVIOUR.logical:
            behaviour.append(built)
        elif spec.source == REQUESTS.logical:
            ctx.requests = RequestLoop(ctx, built, group_id=f"{app_id(settings)}-requests")
    if behaviour:
        ctx.behaviour = BehaviourLoop(ctx, behaviour, group_id=f"{app_id(settings)}-behaviour")
        if ctx.requests is not None:  # answer exactly the partitions whose tables are here
            ctx.behaviour.requests = ctx.requests.follow()

    @app.task
    async def _start_consumers() -> None:
        # Handles are opened here, on one thread, before the consumer threads need them.
        registry.open_handles(ctx, specs)
        if ctx.requests is not None:
            ctx.requests.start()
        if ctx.behaviour is not None:
            ctx.behaviour.start()

    return app


def uses_faust(agents: Iterable[str]) -> bool:
    """Whether any of the agents runs on faust's consumer (the catalog's runtime; behaviour and
    requests run on streams.behaviour and streams.requests)."""
    return any(spec.source == CATALOG.logical for spec in registry.specs_for(agents))

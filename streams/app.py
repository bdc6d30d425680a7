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
from typing import Any

import faust

from recstream.config import Settings
from streams.context import ALL_AGENTS, StreamContext
from streams.naming import app_id, catalog_group


def create_app(
    settings: Settings,
    agents: Iterable[str] = ALL_AGENTS,
    *,
    worker: str = "streams",
    feedback_window_s: float = 30.0,
    ranker: str = "auto",
) -> faust.App:
    """Build the app and register the chosen agents on it. `app.ctx` is the StreamContext."""
    agents = tuple(agents)
    unknown = set(agents) - set(ALL_AGENTS)
    if unknown:
        raise ValueError(f"unknown agents {sorted(unknown)}; choose from {ALL_AGENTS}")
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
        feedback_window_s=feedback_window_s,
        ranker_mode=ranker,
    )
    app.ctx = ctx  # type: ignore[attr-defined]

    from streams import catalog_indexer, feedback_joiner, session_features
    from streams.behaviour import BehaviourLoop
    from streams.requests import RequestLoop

    # Features own the sessions table; the recommender and the joiner read it, so it is declared
    # whenever any of them runs (co-partitioned with behaviour and requests by user_id).
    if {"features", "recommender", "feedback"} & set(agents):
        session_features.declare_table(ctx)
    if "catalog" in agents:
        catalog_indexer.register(ctx)
    processors: list[Any] = []
    if "feedback" in agents:  # first: an example's context is the session before its own batch
        processors.append(feedback_joiner.FeedbackJoiner(ctx))
    if "features" in agents:
        processors.append(session_features.SessionFeatures(ctx))
    if processors:
        ctx.behaviour = BehaviourLoop(ctx, processors, group_id=f"{app_id(settings)}-behaviour")
    if "recommender" in agents:
        ctx.requests = RequestLoop(ctx, group_id=f"{app_id(settings)}-requests")
        if ctx.behaviour is not None:  # answer exactly the partitions whose tables are here
            ctx.behaviour.requests = ctx.requests.follow()

    @app.task
    async def _start_consumers() -> None:
        # Handles are opened here, on one thread, before the consumer threads need them.
        if {"catalog", "recommender", "features"} & set(agents):
            ctx.store  # noqa: B018
        if ctx.requests is not None:
            # the ranker import and its metadata probe take seconds on a busy box: not on a request
            ctx.embedder  # noqa: B018
            ctx.ranker  # noqa: B018
            ctx.policy  # noqa: B018
            ctx.producer  # noqa: B018
            ctx.requests.start()
        if ctx.behaviour is not None:
            ctx.behaviour.start()

    return app


def uses_faust(agents: Iterable[str]) -> bool:
    """Whether any of the agents runs on faust's consumer (the others run on streams.behaviour and
    streams.requests)."""
    return "catalog" in set(agents)

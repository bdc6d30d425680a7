"""The stream app: the context, the chosen processors (streams.registry) and the consumer threads
that feed them, built by a factory and run by streams.worker.

One runtime for every processor: a librdkafka consumer on its own thread per source topic
(streams.catalog, streams.behaviour, streams.requests), batches handed to the processors, offsets
committed only after what a batch produced is done. Requests are assigned the partitions the
behaviour consumer holds, so a user's session is local.

State contract: the app id names the consumer groups (`<app id>-behaviour`, `<app id>-requests`;
the catalog's group, see streams.naming.catalog_group) and every table's changelog topic
(`<app id>-<table>-changelog`). Tables recover from those changelogs after a restart, so the id and
APP_VERSION are part of the state contract: changing either starts from empty tables and
re-consumes the source topics from the beginning; changing a table's value encoding without
bumping APP_VERSION would make a restarted worker read old bytes with new code.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from recstream.config import Settings
from recstream.contracts.topics import BEHAVIOUR, CATALOG, REQUESTS
from streams import registry
from streams.behaviour import BehaviourLoop
from streams.catalog import CatalogLoop
from streams.context import StreamContext
from streams.naming import app_id, catalog_group
from streams.registry import ALL_AGENTS, ProcessorSpec
from streams.requests import RequestLoop


@dataclass
class StreamApp:
    ctx: StreamContext
    specs: list[ProcessorSpec]

    @property
    def loops(self) -> list:
        return [loop for loop in (self.ctx.catalog, self.ctx.behaviour, self.ctx.requests) if loop is not None]

    def start(self) -> StreamApp:
        """Open the handles the processors need (here, on one thread, before any consumer thread
        needs them), then start the consumers."""
        registry.open_handles(self.ctx, (h for spec in self.specs for h in spec.opens))
        for loop in self.loops:
            loop.start()
        return self

    def open_when_ready(self) -> None:
        """The handles the processors open once the worker is ready (after table recovery)."""
        registry.open_handles(self.ctx, (h for spec in self.specs for h in spec.opens_when_ready))

    def ready(self) -> bool:
        """Every consumer has its partitions (the behaviour consumer: and their tables recovered)."""
        return all(loop.ready.is_set() for loop in self.loops)

    def close(self) -> None:
        self.ctx.close()


def create_app(
    settings: Settings,
    agents: Iterable[str] = ALL_AGENTS,
    *,
    worker: str = "streams",
    ranker: str = "auto",
) -> StreamApp:
    """Build the context and wire the chosen processors to their consumers (nothing runs yet)."""
    specs = registry.specs_for(agents)
    ctx = StreamContext(
        settings=settings,
        worker=worker,
        agents=tuple(spec.name for spec in specs),
        ranker_mode=ranker,
    )
    for table, declare in registry.SHARED_TABLES.items():
        if any(table in spec.writes + spec.reads for spec in specs):
            declare(ctx)
    behaviour = []
    for spec in specs:
        built = spec.build(ctx)
        if spec.source == CATALOG.logical:
            ctx.catalog = CatalogLoop(ctx, built, group_id=catalog_group(settings))
        elif spec.source == BEHAVIOUR.logical:
            behaviour.append(built)
        elif spec.source == REQUESTS.logical:
            ctx.requests = RequestLoop(ctx, built, group_id=f"{app_id(settings)}-requests")
        else:  # a processor nothing would feed must not pass silently
            raise ValueError(f"no consumer feeds topic {spec.source!r} of processor {spec.name!r}: add one here")
    if behaviour:
        ctx.behaviour = BehaviourLoop(ctx, behaviour, group_id=f"{app_id(settings)}-behaviour")
        if ctx.requests is not None:  # answer exactly the partitions whose tables are here
            ctx.behaviour.requests = ctx.requests.follow()
    return StreamApp(ctx, specs)

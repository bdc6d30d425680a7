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

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

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


def _catalog_consumer(ctx: StreamContext, processors: list[Any]) -> None:
    (indexer,) = processors
    ctx.catalog = CatalogLoop(ctx, indexer, group_id=catalog_group(ctx.settings))


def _behaviour_consumer(ctx: StreamContext, processors: list[Any]) -> None:
    ctx.behaviour = BehaviourLoop(ctx, processors, group_id=f"{app_id(ctx.settings)}-behaviour")


def _request_consumer(ctx: StreamContext, processors: list[Any]) -> None:
    (answer,) = processors
    ctx.requests = RequestLoop(ctx, answer, group_id=f"{app_id(ctx.settings)}-requests")


#: The consumer that feeds each source topic (logical name), given the processors built for it in
#: registry order. The catalog and request consumers hand each batch to one processor; the
#: behaviour consumer folds every batch through all of its processors.
CONSUMERS: dict[str, Callable[[StreamContext, list[Any]], None]] = {
    CATALOG.logical: _catalog_consumer,
    BEHAVIOUR.logical: _behaviour_consumer,
    REQUESTS.logical: _request_consumer,
}
#: Consumers that take exactly one processor.
SINGLE_PROCESSOR = {CATALOG.logical, REQUESTS.logical}


def create_app(
    settings: Settings,
    agents: Iterable[str] = ALL_AGENTS,
    *,
    worker: str = "streams",
    ranker: str = "auto",
) -> StreamApp:
    """Build the context and wire the chosen processors to their consumers (nothing runs yet)."""
    specs = registry.specs_for(agents)
    for spec in specs:  # a processor nothing would feed must not pass silently
        if spec.source not in CONSUMERS:
            raise ValueError(
                f"no consumer feeds topic {spec.source!r} of processor {spec.name!r}: add one to streams.app.CONSUMERS"
            )
    for source in SINGLE_PROCESSOR:
        names = [spec.name for spec in specs if spec.source == source]
        if len(names) > 1:
            raise ValueError(f"the {source} consumer feeds one processor, not {names}")
    ctx = StreamContext(
        settings=settings,
        worker=worker,
        agents=tuple(spec.name for spec in specs),
        ranker_mode=ranker,
    )
    for table, declare in registry.SHARED_TABLES.items():
        if any(table in spec.writes + spec.reads for spec in specs):
            declare(ctx)
    built: dict[str, list[Any]] = {}
    for spec in specs:
        built.setdefault(spec.source, []).append(spec.build(ctx))
    for source, processors in built.items():
        CONSUMERS[source](ctx, processors)
    if ctx.behaviour is not None and ctx.requests is not None:
        ctx.behaviour.requests = ctx.requests.follow()  # answer exactly the partitions whose tables are here
    return StreamApp(ctx, specs)

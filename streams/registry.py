"""The stream processors by name: the topic each reads, the tables it keeps, and how it joins a worker.

Adding a processor is one entry here plus its module and tests: the worker's `--agents` choices, the
app's wiring (streams.app) and the README's processor table all come from this list. Its source topic
picks the consumer that feeds it (streams.app.CONSUMERS):

- `catalog`: the catalog consumer (streams.catalog) awaits `process(decoded)` of the object `build`
  returns on every batch, and its `idle()` while the topic is quiet;
- `behaviour`: the behaviour consumer (streams.behaviour) calls the object `build` returns on every
  batch, in this list's order, and checkpoints only what all of them have written;
- `requests`: the request consumer (streams.requests) awaits the coroutine function `build` returns
  on every batch, on the partitions whose tables the behaviour consumer has recovered.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from recstream.contracts.topics import BEHAVIOUR, CATALOG, REQUESTS
from streams import catalog_indexer, feedback_joiner, recommender, session_features, state

if TYPE_CHECKING:
    from streams.context import StreamContext


@dataclass(frozen=True)
class ProcessorSpec:
    name: str
    source: str  # logical topic (recstream.contracts.topics)
    writes: tuple[str, ...]  # tables it owns (changelog-backed, except search-queries: memory)
    reads: tuple[str, ...]  # tables of other processors it reads (declared before any processor is built)
    build: Callable[[StreamContext], Any]
    does: str
    #: StreamContext handles opened before its consumer starts (not on the first message) ...
    opens: tuple[str, ...] = ()
    #: ... and once the worker is ready (after table recovery).
    opens_when_ready: tuple[str, ...] = ()


def _recommender(ctx: StreamContext) -> Callable[..., Any]:
    return recommender.answer_batch


#: In behaviour-fold order: the joiner first, so an example's context is the session before its batch.
PROCESSORS: tuple[ProcessorSpec, ...] = (
    ProcessorSpec(
        "catalog",
        CATALOG.logical,
        (),
        (),
        catalog_indexer.CatalogIndexer,
        "item upserts and deletes -> item vectors (Triton item_encoder) in the vector store",
        opens=("store",),
        opens_when_ready=("embedder", "item_embedder"),
    ),
    ProcessorSpec(
        "feedback",
        BEHAVIOUR.logical,
        (feedback_joiner.TABLE,),
        (state.TABLE, state.SEARCH_QUERIES),
        feedback_joiner.FeedbackJoiner,
        "impressions joined with their clicks within the feedback window -> training-examples; "
        "outcomes of shown slots -> the exploration policy",
    ),
    ProcessorSpec(
        "features",
        BEHAVIOUR.logical,
        (state.TABLE, state.POPULARITY_TABLE),
        (),
        session_features.SessionFeatures,
        "behaviour -> per-user session state, item popularity and trend",
        opens=("store",),
    ),
    ProcessorSpec(
        "recommender",
        REQUESTS.logical,
        (state.SEARCH_QUERIES,),
        (state.TABLE,),
        _recommender,
        "requests -> retrieval, ranking and exploration -> recommendations (and ranking-log)",
        # the ranker import and its metadata probe take seconds on a busy box: not on a request
        opens=("store", "embedder", "ranker", "policy", "producer"),
        opens_when_ready=("session_vectors", "sequence_scorer"),
    ),
)
BY_NAME = {spec.name: spec for spec in PROCESSORS}
ALL_AGENTS = tuple(BY_NAME)
#: Tables another processor reads, declared up front whenever a processor that writes or reads them
#: runs (both are keyed by user or request, co-partitioned with behaviour and requests by user_id).
SHARED_TABLES: dict[str, Callable[[StreamContext], Any]] = {
    state.TABLE: state.declare_table,
    state.SEARCH_QUERIES: state.declare_search_queries,
}


def specs_for(agents: Iterable[str]) -> list[ProcessorSpec]:
    """The specs of `agents`, in registry order; an unknown name is an error naming the choices."""
    names = set(agents)
    unknown = names - set(BY_NAME)
    if unknown:
        raise ValueError(f"unknown agents {sorted(unknown)}; choose from {','.join(ALL_AGENTS)}")
    return [spec for spec in PROCESSORS if spec.name in names]


def open_handles(ctx: StreamContext, names: Iterable[str]) -> None:
    """Open these StreamContext handles (each once; the context caches them)."""
    for name in dict.fromkeys(names):
        getattr(ctx, name)


def processor_table() -> str:
    """README's processor table (tests keep the README equal to it)."""
    rows = ["| processor | topic | writes tables | reads tables | does |", "| --- | --- | --- | --- | --- |"]
    for s in PROCESSORS:
        writes, reads = ", ".join(s.writes) or "-", ", ".join(s.reads) or "-"
        rows.append(f"| `{s.name}` | `{s.source}` | {writes} | {reads} | {s.does} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(processor_table())

"""Run the stream processors: `python -m streams.worker [--agents all|catalog,features,...]`.

On the embedded default (Qdrant local mode) every agent must run in this one process, because only
one process may open the Qdrant directory. With QDRANT_URL set, agents may be split across
processes; the recommender and the feedback joiner read the sessions table, so run them in the
same process as `features`.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
from collections import deque

import typer

from recstream.config import get_settings
from recstream.kafka.admin import ensure_topics
from recstream.telemetry import STAGE_LATENCY, serve_metrics
from streams.app import create_app
from streams.consumer_threads import THREAD_FAILED
from streams.rankers import RANKERS
from streams.registry import ALL_AGENTS, specs_for

log = logging.getLogger("streams.worker")
READY_LINE = "recstream worker ready"
#: How often the main thread checks readiness and reports collection pauses.
READY_CHECK_S = 0.5

cli = typer.Typer(add_completion=False, help=__doc__)


def parse_agents(spec: str) -> tuple[str, ...]:
    """`all` or a comma list of registered processors (streams.registry), in registry order."""
    if spec.strip() == "all":
        return ALL_AGENTS
    try:
        specs = specs_for(a.strip() for a in spec.split(",") if a.strip())
    except ValueError as exc:
        raise typer.BadParameter(f"{exc} (or all)") from None
    if not specs:
        raise typer.BadParameter(f"no agents given; choose from all or {','.join(ALL_AGENTS)}")
    return tuple(s.name for s in specs)


def _quiet_gc() -> None:
    """Move everything loaded at start-up (torch, qdrant, pydantic schemas: a big heap) out of
    the cyclic collector's reach, and time every collection (stage gc_gen0/1/2).

    Measured in bench_stream (200 req/s + 500 events/s): a full (gen2) collection, triggered now and
    then by request and event garbage, took 183 ms on average with the start-up heap in reach, all
    threads stopped; 1.7 ms after freezing it. Frozen objects are never collected, which is right
    for what lives as long as the process."""
    gc.collect()
    gc.freeze()
    started: list[float] = []

    def timing(phase: str, info: dict) -> None:
        # No metric call here: a collection can start inside prometheus_client while that thread
        # holds the metric's (non-reentrant) lock; observing from here deadlocked that thread.
        # The pauses are queued (deque.append is atomic) and observed by _report_gc.
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            GC_PAUSES.append((info.get("generation", 0), time.perf_counter() - started.pop()))

    gc.callbacks.append(timing)


#: (generation, seconds) of collections not yet observed in STAGE_LATENCY.
GC_PAUSES: deque[tuple[int, float]] = deque(maxlen=100_000)


def _report_gc() -> None:
    while GC_PAUSES:
        generation, seconds = GC_PAUSES.popleft()
        STAGE_LATENCY.labels(stage=f"gc_gen{generation}").observe(seconds)


def _one_blas_thread() -> None:
    """numpy's OpenBLAS defaults to one thread per core. Its products here are small (a catalogue
    x a few queries); on a shared 2-core box a second BLAS thread waits for a core and the call
    takes milliseconds instead of ~0.1 ms. The event loop and the behaviour thread are the parallelism."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # without it, OpenBLAS keeps its default
        return
    threadpool_limits(1, user_api="blas")


@cli.command()
def main(
    agents: str = typer.Option("all", help="all, or a comma list of " + ",".join(ALL_AGENTS)),
    metrics_port: int = typer.Option(None, help="Prometheus /metrics port (default: settings.metrics_port)"),
    feedback_window_s: float = typer.Option(None, help="Seconds an impression waits for a click (default: settings)"),
    ranker: str = typer.Option("auto", help="auto (Triton's ranker if loaded), " + ", ".join(RANKERS)),
) -> None:
    if ranker != "auto" and ranker not in RANKERS:
        raise typer.BadParameter(f"unknown ranker {ranker!r}; choose auto or one of {', '.join(RANKERS)}")
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if feedback_window_s is not None:
        settings = settings.model_copy(update={"feedback_window_s": feedback_window_s})
    chosen = parse_agents(agents)
    _one_blas_thread()
    if settings.qdrant_url is None and chosen != ALL_AGENTS:
        log.warning("Qdrant local mode: another worker process cannot open %s at the same time", settings.qdrant_path)
    created = ensure_topics(settings)
    if created:
        log.info("created %d topics", len(created))
    serve_metrics(metrics_port if metrics_port is not None else settings.metrics_port)

    app = create_app(settings, chosen, ranker=ranker).start()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # a consumer thread that fails sends SIGTERM too (streams.consumer_threads.run_or_stop_worker)
        signal.signal(sig, lambda signum, frame: stop.set())
    announced = False
    try:
        while not stop.wait(READY_CHECK_S):
            _report_gc()
            if not announced and app.ready():
                # Once: after table recovery finished and partitions are assigned (tests wait for
                # this line). Open Qdrant, the Triton clients and the ranker now, not on the first
                # request (the ranker import and its metadata probe take seconds on a busy box).
                announced = True
                app.open_when_ready()
                _quiet_gc()
                log.warning("%s (pid %d, agents %s)", READY_LINE, os.getpid(), ",".join(chosen))
    finally:
        log.info("stopping: committing what was processed")
        app.close()
    if THREAD_FAILED.is_set():
        log.critical("stopped because a consumer thread failed (see above): exit status 1")
        raise typer.Exit(1)


if __name__ == "__main__":
    cli()

"""`make demo`: the live system on the embedded default, replaying MovieLens-100k.

Starts the local stack (Kafka, Triton, the stream worker with Qdrant local mode), replays the
real catalog and a slice of real behaviour through Kafka, then acts as an application would:
searches, clicks, and watches the session's recommendations change.
"""

from __future__ import annotations

import logging
import time
import urllib.request
from itertools import islice

from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

from recstream.client import EventProducer, RecommendationClient
from recstream.config import Settings
from recstream.contracts.events import BehaviourEvent, RecommendationRequest, RecommendationResult
from recstream.data.datasets import load_dataset
from recstream.data.events import behaviour_events, catalog_events
from recstream.ops.stack import LocalStack
from streams.process import WorkerProcess

log = logging.getLogger("demo")

#: The demo's Triton runs on this machine's CPU, where one query encode takes 100-300 ms while the
#: worker is busy: past the 250 ms production budget (sized for a GPU), so about one search in three
#: would answer degraded. The demo gives the models 2 s unless TRITON_TIMEOUT_S is set explicitly.
DEMO_TRITON_TIMEOUT_S = 2.0


def show(title: str, result: RecommendationResult, titles: dict[str, str]) -> None:
    flag = " (degraded)" if result.degraded else ""
    print(f"\n{title}  [model {result.model_version}{flag}, {len(result.items)} items]")
    for item in result.items:
        print(f"  {item.position + 1:2d}. {titles.get(item.item_id, item.item_id)[:60]:60s} score={item.score:+.3f}")


def worker_metric(metrics_port: int, family_name: str) -> float:
    """Sum of one metric family on the worker's own /metrics (0 while it is starting)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as resp:
            text = resp.read().decode()
    except OSError:
        return 0.0
    for family in text_string_to_metric_families(text):
        if family.name == family_name:
            return sum(s.value for s in family.samples if not s.name.endswith("_created"))
    return 0.0


def wait_for_worker(worker: WorkerProcess, family_name: str, want: int, desc: str, timeout_s: float = 600.0) -> None:
    """Asking before the worker caught up would only show the degraded path; wait for it, and stop
    waiting the moment it exits (a port in use, a locked Qdrant folder: its log says why)."""
    deadline = time.monotonic() + timeout_s
    with tqdm(total=want, desc=desc, unit="ev") as bar:
        while time.monotonic() < deadline:
            if worker.pid() is None:
                raise RuntimeError(f"the stream worker exited; the end of {worker.log_path}:\n{worker.tail(2000)}")
            bar.n = min(want, int(worker_metric(worker.metrics_port, family_name)))
            bar.refresh()
            if bar.n >= want:
                return
            time.sleep(1.0)
    raise TimeoutError(f"{desc}: worker not caught up within {timeout_s:.0f}s; see {worker.log_path}")


def run(settings: Settings, events: int = 20_000, keep_running: bool = False) -> None:
    if "triton_timeout_s" not in settings.model_fields_set:
        settings = settings.model_copy(update={"triton_timeout_s": DEMO_TRITON_TIMEOUT_S})
    stack = LocalStack(settings)
    if stack.worker.pid() is not None:
        print("a stream worker is already running (`make up`): the demo uses it with the settings it was started with")
    print("starting Kafka, Triton and the stream worker ...")
    t0 = time.perf_counter()
    started = stack.up()
    print(f"stack up in {time.perf_counter() - t0:.1f}s: {stack.status()}")
    finished = False
    try:
        play(settings, stack, events)
        finished = True
    finally:
        # Only what this run started: a stack brought up by `make up` before it stays up. A demo
        # that failed or was interrupted leaves nothing behind, --keep-running or not.
        if finished and keep_running:
            print("\nstack keeps running; `make down` stops it")
        elif started:
            print(f"stopping what the demo started: {', '.join(started)}")
            stack.down(started)


def play(settings: Settings, stack: LocalStack, events: int) -> None:
    """Replay the data set into the running stack, then search, click and recommend as an app would."""
    data = load_dataset("ml-100k")
    titles = dict(zip(data.items.item_id, data.items.title, strict=True))
    with EventProducer(settings, worker="demo") as producer:
        catalog = catalog_events(data.items)
        producer.send_many("catalog", tqdm(catalog, desc="catalog", unit="item"))
        sent = 0
        for event in tqdm(islice(behaviour_events(data.interactions), events), desc="behaviour", unit="ev"):
            producer.send("behaviour", event)
            sent += 1
    wait_for_worker(stack.worker, "recstream_indexed_items", len(catalog), "items embedded (Triton) into Qdrant")
    wait_for_worker(stack.worker, "recstream_feature_events", sent, "behaviour folded into session features")
    with RecommendationClient(settings) as client:
        # The worker's first request opens its model and store clients (seconds): not the one shown.
        client.request(RecommendationRequest(kind="search", user_id="warm-up", query="warm up"), timeout_s=60)
        search = client.request(
            RecommendationRequest(kind="search", user_id="demo", session_id="demo-1", query="space war in the stars"),
            timeout_s=30,
        )
        show('search "space war in the stars"', search, titles)
        horror = [i for i, c in zip(data.items.item_id, data.items.category, strict=True) if c == "Horror"][:5]
        with EventProducer(settings, worker="demo") as producer:
            for pos, item in enumerate(horror):
                producer.send(
                    "behaviour",
                    BehaviourEvent(type="click", user_id="demo", session_id="demo-1", item_id=item, position=pos),
                )
        print(f"\nclicked {len(horror)} horror films: {[titles[i] for i in horror]}")
        time.sleep(1)
        rec = client.request(RecommendationRequest(user_id="demo", session_id="demo-1"), timeout_s=30)
        show("recommendations for the session after the clicks", rec, titles)

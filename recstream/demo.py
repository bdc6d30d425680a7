"""`make demo`: the live system on the embedded default, replaying MovieLens-100k.

Starts the local stack (Kafka, Triton, the stream worker with Qdrant local mode), replays the
real catalog and a slice of real behaviour through Kafka, then acts as an application would:
searches, clicks, and watches the session's recommendations change.
"""

from __future__ import annotations

import logging
import time
from itertools import islice

from tqdm import tqdm

from recstream.client import EventProducer, RecommendationClient
from recstream.config import Settings
from recstream.contracts.events import BehaviourEvent, RecommendationRequest, RecommendationResult
from recstream.data.datasets import load_dataset
from recstream.replay import behaviour_events, catalog_events
from recstream.stack import LocalStack

log = logging.getLogger("demo")


def show(title: str, result: RecommendationResult, titles: dict[str, str]) -> None:
    flag = " (degraded)" if result.degraded else ""
    print(f"\n{title}  [model {result.model_version}{flag}, {len(result.items)} items]")
    for item in result.items:
        print(f"  {item.position + 1:2d}. {titles.get(item.item_id, item.item_id)[:60]:60s} score={item.score:+.3f}")


def run(settings: Settings, events: int = 20_000, keep_running: bool = False) -> None:
    stack = LocalStack(settings)
    print("starting Kafka, Triton and the stream worker ...")
    t0 = time.perf_counter()
    stack.up()
    print(f"stack up in {time.perf_counter() - t0:.1f}s: {stack.status()}")
    data = load_dataset("ml-100k")
    titles = dict(zip(data.items.item_id, data.items.title, strict=True))
    with EventProducer(settings, worker="demo") as producer:
        catalog = catalog_events(data.items)
        producer.send_many("catalog", tqdm(catalog, desc="catalog", unit="item"))
        for event in tqdm(islice(behaviour_events(data.interactions), events), total=events, desc="behaviour"):
            producer.send("behaviour", event)
    time.sleep(5)  # let the indexer embed the catalog through Triton
    with RecommendationClient(settings) as client:
        search = client.request(
            RecommendationRequest(kind="search", user_id="demo", session_id="demo-1", query="space war in the stars"),
            timeout_s=30,
        )
        show('search "space war in the stars"', search, titles)
        horror = [i for i, c in zip(data.items.item_id, data.items.category, strict=True) if c == "Horror"][:5]
        with EventProducer(settings, worker="demo") as producer:
            for pos, item in enumerate(horror):
                producer.send("behaviour", BehaviourEvent(type="click", user_id="demo", session_id="demo-1",
                                                          item_id=item, position=pos))
        print(f"\nclicked {len(horror)} horror films: {[titles[i] for i in horror]}")
        time.sleep(1)
        rec = client.request(RecommendationRequest(user_id="demo", session_id="demo-1"), timeout_s=30)
        show("recommendations for the session after the clicks", rec, titles)
    if keep_running:
        print("\nstack keeps running; `make down` stops it")
    else:
        stack.down()

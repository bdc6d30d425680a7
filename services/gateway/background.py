"""Background threads of the gateway: a catalog view (titles for display) and an operations monitor.

The monitor exports what no single stream worker can see about itself: consumer-group lag
measured from the broker (committed offset vs log end, so a stuck or dead worker still shows up)
and the model versions Triton is actually serving.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, ConsumerGroupState, ConsumerGroupTopicPartitions, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec
from prometheus_client import Gauge

from recstream.config import Settings
from recstream.contracts.events import ItemUpsert
from recstream.contracts.topics import CATALOG, TOPICS
from recstream.kafka.serde import InvalidEvent, decode
from recstream.telemetry import CONSUMER_LAG, MODEL_VERSION_LIVE

log = logging.getLogger(__name__)

# Broker admin calls are cheap metadata reads; 5 s is generous and keeps one slow broker from
# stalling the loop for longer than a couple of scrape intervals.
ADMIN_TIMEOUT_S = 5.0
# Triton's repository index is a local HTTP call; 2 s covers a busy CPU-only server.
TRITON_TIMEOUT_S = 2.0


class CatalogView:
    """Latest title/category per item, read from the compacted catalog topic, for the playground.

    Bounded (oldest entries evicted past `max_items`) so a huge catalog cannot exhaust memory;
    titles are a display nicety, never used for ranking.
    """

    def __init__(self, settings: Settings, max_items: int = 200_000) -> None:
        self.settings = settings
        self.max_items = max_items
        self._items: OrderedDict[str, dict[str, str]] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalog-view", daemon=True)

    def start(self) -> CatalogView:
        self._thread.start()
        return self

    def get(self, item_id: str) -> dict[str, str] | None:
        with self._lock:
            return self._items.get(item_id)

    def _run(self) -> None:
        topic = CATALOG.name(self.settings.topic_prefix)
        consumer = Consumer(
            {
                "bootstrap.servers": self.settings.kafka_bootstrap,
                "group.id": "recstream-gateway-catalog-view",  # required; offsets never committed
                "enable.auto.commit": False,
            }
        )
        try:
            while not self._stop.is_set():
                try:  # the topic may not exist yet, or the broker may be down: retry, never die
                    meta = consumer.list_topics(topic, timeout=ADMIN_TIMEOUT_S).topics[topic]
                    if meta.error is None and meta.partitions:
                        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
                        break
                except Exception as exc:  # logged and retried
                    log.info("catalog view waiting for %s: %s", topic, exc)
                self._stop.wait(1.0)
            while not self._stop.is_set():
                for msg in consumer.consume(num_messages=500, timeout=0.2):
                    if msg.error():
                        continue
                    self._apply(msg.key(), msg.value())
        finally:
            consumer.close()

    def _apply(self, key: bytes | None, value: bytes | None) -> None:
        with self._lock:
            try:
                event = decode(CATALOG, value, self.settings.max_message_bytes, key)
            except InvalidEvent:
                return  # the catalog indexer dead-letters it; the view just skips it
            if isinstance(event, ItemUpsert):
                self._items[event.item_id] = {"title": event.title, "category": event.category}
                self._items.move_to_end(event.item_id)
                while len(self._items) > self.max_items:
                    self._items.popitem(last=False)
            else:
                self._items.pop(event.item_id, None)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _replace(gauge: Gauge, values: dict[tuple[str, ...], float]) -> None:
    """Make `values` (label values in the gauge's order -> value) the gauge's only series: set them
    first, then remove the others, so a scrape in between never finds the gauge empty (absent()
    true for a moment, an alert's `for:` timer reset)."""
    names = gauge._labelnames
    current = {tuple(s.labels[n] for n in names) for metric in gauge.collect() for s in metric.samples}
    for labels, value in values.items():
        gauge.labels(*labels).set(value)
    for labels in current - values.keys():
        gauge.remove(*labels)


def consumer_lag(admin: AdminClient, prefix: str) -> dict[tuple[str, str, int], int]:
    """(group, topic, partition) -> messages behind the log end, for registry topics under `prefix`,
    of the groups with members. A group without any (EMPTY: an APP_VERSION bump's old groups, a
    trainer run's catalog reader) keeps its committed offsets until retention, and its lag grows
    with traffic forever; a stopped process is the `up` alert's to report."""
    topics = {spec.name(prefix) for spec in TOPICS.values()}
    listing = admin.list_consumer_groups(request_timeout=ADMIN_TIMEOUT_S).result(timeout=ADMIN_TIMEOUT_S)
    idle = {ConsumerGroupState.EMPTY, ConsumerGroupState.DEAD}
    groups = [g.group_id for g in listing.valid if g.group_id.startswith(prefix) and g.state not in idle]
    committed: dict[tuple[str, str, int], int] = {}
    for group in groups:
        futures = admin.list_consumer_group_offsets(
            [ConsumerGroupTopicPartitions(group)], request_timeout=ADMIN_TIMEOUT_S
        )
        result = futures[group].result(timeout=ADMIN_TIMEOUT_S)
        for tp in result.topic_partitions or []:
            if tp.topic in topics and tp.offset >= 0:
                committed[(group, tp.topic, tp.partition)] = tp.offset
    if not committed:
        return {}
    wanted = {TopicPartition(t, p): OffsetSpec.latest() for (_, t, p) in committed}
    ends = {
        (tp.topic, tp.partition): fut.result(timeout=ADMIN_TIMEOUT_S).offset
        for tp, fut in admin.list_offsets(wanted, request_timeout=ADMIN_TIMEOUT_S).items()
    }
    return {k: max(0, ends[(k[1], k[2])] - off) for k, off in committed.items() if (k[1], k[2]) in ends}


def live_model_versions(triton_url: str) -> dict[str, str]:
    """model -> highest READY version, from Triton's repository index (what is really being served)."""
    resp = httpx.post(f"http://{triton_url}/v2/repository/index", json={"ready": True}, timeout=TRITON_TIMEOUT_S)
    resp.raise_for_status()
    live: dict[str, str] = {}
    for entry in resp.json():
        version = str(entry.get("version", ""))
        if entry.get("state") == "READY" and version:
            current = live.get(entry["name"])
            if current is None or (version.isdigit() and current.isdigit() and int(version) > int(current)):
                live[entry["name"]] = version
    return live


class OpsMonitor:
    """Every `interval_s`: refresh recstream_consumer_lag and recstream_model_version_live."""

    def __init__(self, settings: Settings, interval_s: float = 5.0) -> None:
        self.settings = settings
        self.interval_s = interval_s
        self._admin: AdminClient | None = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ops-monitor", daemon=True)

    def start(self) -> OpsMonitor:
        self._thread.start()
        return self

    def refresh(self) -> None:
        admin = self._admin
        if admin is None:  # stopped
            return
        # Both gauges are replaced as a whole, and emptied when they cannot be read: a stale value
        # (the lag of a group that is gone, a version Triton no longer serves) would read as current.
        try:
            lags = consumer_lag(admin, self.settings.topic_prefix)
        except Exception as exc:  # monitoring must never take the gateway down
            lags = {}
            log.warning("consumer lag refresh failed: %s", exc)
        _replace(CONSUMER_LAG, {(topic, str(p), group): lag for (group, topic, p), lag in lags.items()})
        try:
            live = live_model_versions(self.settings.triton_url)
        except Exception as exc:
            live = {}
            log.info("model version refresh failed: %s", exc)
        _replace(MODEL_VERSION_LIVE, dict.fromkeys(live.items(), 1.0))

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self.interval_s)

    def stop(self) -> None:
        """Stop refreshing and release the admin client's connection now: the app object that holds
        this monitor may outlive the broker (a test client, a reloader), and a live librdkafka
        handle keeps reconnecting to it. (AdminClient has no close(); dropping the last reference
        destroys it.)"""
        self._stop.set()
        if self._thread.is_alive():  # never started: refreshed by hand, or start() failed
            self._thread.join(timeout=ADMIN_TIMEOUT_S * 2)
        self._admin = None

"""The batched behaviour consumer (streams.behaviour) and its changelog tables, against a real broker.

Checks what the stream e2e tests rely on: one user's events arrive in offset order, invalid
messages are dead-lettered once, tables recover from their changelog before any input is folded,
and a restarted consumer continues from the committed offsets with the state those offsets stand for.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from recstream.client import EventProducer
from recstream.client.producer import producer_config
from recstream.config import Settings
from recstream.contracts.events import BehaviourEvent
from recstream.contracts.topics import BEHAVIOUR, dead_letter_topic
from streams.behaviour import BehaviourLoop, Record
from streams.changelog import ChangelogTable, changelog_topic, ensure_changelog
from tests.support.worker_stack import committed_positions

pytestmark = [pytest.mark.kafka]


class Recorder:
    """A processor that keeps, per user, the offsets it saw, and writes each user's count to its table."""

    def __init__(self, topic: str) -> None:
        self.table = ChangelogTable("counts", topic, BEHAVIOUR.partitions)
        self.tables = [self.table]
        self.seen: dict[str, list[int]] = {}
        self.recovered_keys: list[int] = []
        self.batches = 0
        self.lock = threading.Lock()

    def recovered(self) -> None:
        self.recovered_keys.append(len(self.table.data))

    def tick(self) -> None:
        pass

    def process(self, batch: list[Record]) -> None:
        with self.lock:
            self.batches += 1
            for rec in batch:
                self.seen.setdefault(rec.event.user_id, []).append(rec.offset)
                key = rec.event.user_id.encode()
                count = int(self.table.data.get(key, b"0")) + 1
                self.table.put(rec.partition, key, str(count).encode())

    def total(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.seen.values())


def _loop(settings: Settings, recorder: Recorder, group: str) -> BehaviourLoop:
    ctx = SimpleNamespace(settings=settings, worker="test")
    return BehaviourLoop(ctx, [recorder], group_id=group).start()


def _events(users: int, per_user: int, start: int = 0) -> list[BehaviourEvent]:
    return [
        BehaviourEvent(type="click", user_id=f"u{u}", item_id=str(start + i), ts_ms=1_000 + start + i)
        for i in range(per_user)
        for u in range(users)
    ]


def _wait(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _ends(settings: Settings) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "ends"})
    topic = BEHAVIOUR.name(settings.topic_prefix)
    try:
        return {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(BEHAVIOUR.partitions)
        }
    finally:
        consumer.close()


def _lag(settings: Settings, group: str) -> int:
    """Messages of the behaviour topic the group has not committed (an empty partition has no commit)."""
    committed = committed_positions(settings, BEHAVIOUR, group)
    return sum(end - max(committed[p], 0) for p, end in _ends(settings).items())


def test_changelog_table_recovers_puts_and_tombstones_per_partition(settings: Settings) -> None:
    topic = changelog_topic(f"{settings.topic_prefix}app", "t")
    ensure_changelog(settings, topic, 4)
    ensure_changelog(settings, topic, 4)  # idempotent
    producer = Producer(producer_config(settings))
    table = ChangelogTable("t", topic, 4)
    table.bind(lambda topic, key, value, partition: producer.produce(topic, value=value, key=key, partition=partition))
    for p in range(4):
        for i in range(50):
            table.put(p, f"k{p}-{i % 10}".encode(), f"v{i}".encode())
    table.delete(2, b"k2-3")
    assert producer.flush(10) == 0

    again = ChangelogTable("t", topic, 4)
    assert again.recover(settings, range(4)) == 4 * 50 + 1
    assert again.data == table.data and b"k2-3" not in again.data
    assert again.data[b"k1-9"] == b"v49"
    only0 = ChangelogTable("t", topic, 4)
    only0.recover(settings, [0])
    assert set(only0.data) == {k for k in table.data if k.startswith(b"k0-")}


def test_batches_keep_user_order_dead_letter_once_and_commit_what_the_changelog_holds(settings: Settings) -> None:
    topic = BEHAVIOUR.name(settings.topic_prefix)
    group = f"{settings.topic_prefix}behaviour-test"
    events = _events(users=25, per_user=80)
    with EventProducer(settings) as p:
        p.send_many("behaviour", events[:1000])
        p.send_raw(topic, b"u3", b"{not json")
        p.send_raw(topic, b"u4", json.dumps({"type": "teleport", "user_id": "u4", "item_id": "1"}).encode())
        p.send_many("behaviour", events[1000:])
    recorder = Recorder(changelog_topic(f"{settings.topic_prefix}app", "counts"))
    loop = _loop(settings, recorder, group)
    try:
        _wait(lambda: recorder.total() >= len(events), 60, "not every event reached the processor")
        # While running, commits follow the acknowledgements of the outputs (no stop needed).
        _wait(
            lambda: committed_positions(settings, BEHAVIOUR, group) == _ends(settings),
            30,
            "acknowledged positions not committed",
        )
        running = ChangelogTable("counts", recorder.table.topic, 4)
        running.recover(settings, range(4))
        assert running.data == recorder.table.data
    finally:
        loop.stop()
    assert recorder.total() == len(events)
    for user, offsets in recorder.seen.items():
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets), user
        assert int(recorder.table.data[user.encode()]) == len(offsets)
    assert recorder.batches < len(events) / 10, "events were not batched"

    # Stopping committed everything it folded, and the changelog holds the state those offsets mean.
    assert committed_positions(settings, BEHAVIOUR, group) == _ends(settings)
    recovered = ChangelogTable("counts", recorder.table.topic, 4)
    recovered.recover(settings, range(4))
    assert recovered.data == recorder.table.data

    dlq = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "dlq", "auto.offset.reset": "earliest"})
    dlq.subscribe([dead_letter_topic(topic)])
    letters: list[dict] = []
    deadline = time.monotonic() + 30
    while len(letters) < 2 and time.monotonic() < deadline:
        msg = dlq.poll(0.5)
        if msg is not None and not msg.error():
            letters.append(json.loads(msg.value()))
    dlq.close()
    assert sorted(x["error_type"] for x in letters) == ["malformed_json", "schema"]


def _fold_first_run(settings: Settings, group: str, changelog: str) -> None:
    """A first run of the group: 10 users x 30 events folded into the counts table, then stopped."""
    first = _events(users=10, per_user=30)
    with EventProducer(settings) as p:
        p.send_many("behaviour", first)
    recorder = Recorder(changelog)
    loop = _loop(settings, recorder, group)
    try:
        _wait(lambda: recorder.total() >= len(first), 60, "first run did not finish")
    finally:
        loop.stop()


def test_restart_recovers_before_folding_and_continues_from_the_commit(settings: Settings) -> None:
    group = f"{settings.topic_prefix}behaviour-test"
    changelog = changelog_topic(f"{settings.topic_prefix}app", "counts")
    _fold_first_run(settings, group, changelog)

    second = _events(users=10, per_user=20, start=1000)
    with EventProducer(settings) as p:
        p.send_many("behaviour", second)
    b = Recorder(changelog)
    loop = _loop(settings, b, group)
    try:
        _wait(lambda: b.total() >= len(second), 60, "second run did not finish")
        time.sleep(0.5)
    finally:
        loop.stop()
    assert b.recovered_keys and b.recovered_keys[0] == 10, "the table was not recovered before folding"
    assert b.total() == len(second), "the restart re-read input the first run had committed"
    assert {k: int(v) for k, v in b.table.data.items()} == {f"u{u}".encode(): 50 for u in range(10)}


class FailsOnPoison(Recorder):
    """Folds like Recorder, but the first batch holding the `poison` item raises before any of it is
    folded (what a vector-store timeout inside a processor does)."""

    def __init__(self, topic: str, poison: str) -> None:
        super().__init__(topic)
        self.poison = poison
        self.failed = False

    def process(self, batch: list[Record]) -> None:
        if not self.failed and any(rec.event.item_id == self.poison for rec in batch):
            self.failed = True
            raise RuntimeError("vector store timed out")
        super().process(batch)


def test_a_batch_a_processor_failed_on_is_replayed_not_committed(settings: Settings) -> None:
    """The failed batch's offsets are not committed, not even by the revoke that closing the
    consumer runs on the way out, so the restarted worker folds those events instead of losing them."""
    group = f"{settings.topic_prefix}behaviour-test"
    changelog = changelog_topic(f"{settings.topic_prefix}app", "counts")
    _fold_first_run(settings, group, changelog)
    assert _lag(settings, group) == 0

    second = _events(users=10, per_user=20, start=1000)
    with EventProducer(settings) as p:
        p.send_many("behaviour", second)
    failing = FailsOnPoison(changelog, poison="1010")
    crashed = BehaviourLoop(SimpleNamespace(settings=settings, worker="test"), [failing], group_id=group)
    with pytest.raises(RuntimeError, match="timed out"):
        crashed._run()  # in this thread: started, the failure would stop the whole process
    assert failing.failed
    assert _lag(settings, group) > 0, "the failed batch was committed"

    after = Recorder(changelog)
    loop = _loop(settings, after, group)
    try:
        _wait(lambda: len(after.table.data) == 10 and after.total() > 0, 60, "the restart folded nothing")
        _wait(lambda: {int(v) for v in after.table.data.values()} == {50}, 60, "events lost or folded twice")
    finally:
        loop.stop()
    assert failing.total() + after.total() == len(second)


def test_item_popularity_survives_a_restart(settings: Settings, tmp_path) -> None:
    """Interactions per item (a ranker feature) come back from their changelog table after a
    restart instead of starting at 0; they count users (a click then a purchase of one item by one
    user is one interaction, as one rating is in training data), impressions do not count; new
    events add to what came back; so do the per-day rows of the trending feature."""
    from recstream.vectorstore import VectorStore
    from streams.session_features import SessionFeatures

    group = f"{settings.topic_prefix}popularity-test"
    settings = settings.model_copy(update={"qdrant_path": tmp_path / "qdrant"})
    store = VectorStore(settings)  # empty: unknown items still count

    def start() -> tuple[SessionFeatures, BehaviourLoop]:
        ctx = SimpleNamespace(settings=settings, worker="test", tables={}, store=store)
        features = SessionFeatures(ctx)
        ctx.behaviour = BehaviourLoop(ctx, [features], group_id=group).start()
        return features, ctx.behaviour

    first = [
        BehaviourEvent(type=kind, user_id=f"u{u}", item_id=item, ts_ms=1_000 + n)
        for n, (item, kind) in enumerate([("a", "click"), ("b", "view"), ("a", "purchase"), ("c", "impression")])
        for u in range(6)  # six users over the four partitions
    ]
    with EventProducer(settings) as p:
        p.send_many("behaviour", first)
    features, loop = start()
    try:
        _wait(lambda: sum(features.items.popularity.values()) >= 12, 60, "first run did not count")
        time.sleep(0.5)
        assert features.items.popularity == {"a": 6, "b": 6}
    finally:
        loop.stop()
    assert features.items.popularity == {}, "a stopped consumer gave its partitions, and their counts, away"

    features, loop = start()
    try:
        _wait(loop.ready.is_set, 60, "no assignment")
        assert features.items.popularity == {"a": 6, "b": 6}, "the counts were not recovered"
        assert features.items.max_popularity == 6
        with EventProducer(settings) as p:
            p.send_many("behaviour", [BehaviourEvent(type="click", user_id="u9", item_id="b", ts_ms=9_000)])
        _wait(lambda: features.items.popularity.get("b") == 7, 30, "a new event was not counted")
        # every event was on day 0: a request on day 1 sees them as trending, one on day 0 does not
        assert features.items.trending(["a", "b", "c"], 86_400 + 10) == [6, 7, 0]
        assert features.items.trending(["a", "b"], 5) == [0, 0]
    finally:
        loop.stop()

    # A rebalance that takes one partition away takes its counts along; the others stay.
    ctx = SimpleNamespace(settings=settings, worker="test", tables={}, store=store)
    features = SessionFeatures(ctx)
    features.popularity_table.recover(settings, range(BEHAVIOUR.partitions))
    features.recovered()
    assert features.items.popularity == {"a": 6, "b": 7}
    assert features.items.trending(["a", "b"], 86_400) == [6, 7], "the trend rows were not recovered"
    rows = {k: v for k, v in features.popularity_table.data.items() if b"#" not in k}  # totals, not days
    gone = int(next(iter(rows)).split(b"/")[0])
    features.revoked([gone])
    kept: dict[str, int] = {}
    for key, value in rows.items():
        partition, item = key.decode().split("/")
        if int(partition) != gone:
            kept[item] = kept.get(item, 0) + int(value)
    assert features.items.popularity == kept and sum(kept.values()) < 13
    assert sum(features.items.trending(["a", "b"], 86_400)) == sum(kept.values()), "day rows left with it"
    # ... and the sessions of its users (recovered again if the partition comes back)
    features.table.recover(settings, range(BEHAVIOUR.partitions))
    users = {k.decode() for k in features.table.data}
    assert len(users) == 7  # u0..u5 and u9
    features.revoked([gone])
    from recstream.contracts.partitioning import partition_for

    left = {k.decode() for k in features.table.data}
    assert left == {u for u in users if partition_for(u.encode(), BEHAVIOUR.partitions) != gone} != users
    store.close()


def test_trend_rows_older_than_the_trending_window_are_deleted(settings: Settings, tmp_path) -> None:
    """The trending feature reads the TREND_DAYS days before a request; per-day rows older than
    that (by event time, behind the newest event) are tombstoned in the changelog and dropped from
    memory, so they neither come back at recovery nor grow the table for the worker's life."""
    from recstream.recommend.trending import DAY_S, TREND_DAYS
    from recstream.vectorstore import VectorStore
    from streams.session_features import SessionFeatures

    group = f"{settings.topic_prefix}trend-test"
    settings = settings.model_copy(update={"qdrant_path": tmp_path / "qdrant"})
    store = VectorStore(settings)

    def start() -> tuple[SessionFeatures, BehaviourLoop]:
        ctx = SimpleNamespace(settings=settings, worker="test", tables={}, store=store)
        features = SessionFeatures(ctx)
        ctx.behaviour = BehaviourLoop(ctx, [features], group_id=group).start()
        return features, ctx.behaviour

    old_day, new_day = 100, 100 + TREND_DAYS + 5
    old = [BehaviourEvent(type="click", user_id=f"u{u}", item_id="old", ts_ms=old_day * DAY_S * 1000) for u in range(6)]
    new = [BehaviourEvent(type="click", user_id=f"u{u}", item_id="new", ts_ms=new_day * DAY_S * 1000) for u in range(6)]
    features, loop = start()
    try:
        with EventProducer(settings) as p:
            p.send_many("behaviour", old)
        _wait(lambda: features.items.popularity.get("old") == 6, 60, "old events not counted")
        assert features.items.trending(["old"], (old_day + 1) * DAY_S) == [6]
        with EventProducer(settings) as p:
            p.send_many("behaviour", new)
        _wait(lambda: features.items.popularity.get("new") == 6, 60, "new events not counted")
        _wait(lambda: "old" not in features.items.trend, 30, "the old day stayed in memory")
        assert features.items.trending(["new"], (new_day + 1) * DAY_S) == [6]
        # a client whose clock is decades ahead moves nothing: the real days keep their rows
        future = BehaviourEvent(type="click", user_id="u1", item_id="future", ts_ms=4_000_000_000_000)
        with EventProducer(settings) as p:
            p.send("behaviour", future)
        _wait(lambda: features.items.popularity.get("future") == 1, 60, "the future-dated event not counted")
        time.sleep(1.5)  # a flush, which would prune
        assert features.items.trending(["new"], (new_day + 1) * DAY_S) == [6]
    finally:
        loop.stop()

    features, loop = start()
    try:
        _wait(loop.ready.is_set, 60, "no assignment")
        days = {k.split(b"/")[0].split(b"#")[1] for k in features.popularity_table.data if b"#" in k}
        future_day = 4_000_000_000_000 // (DAY_S * 1000)
        assert days == {str(new_day).encode(), str(future_day).encode()}, days  # the old day's rows were tombstoned
        assert features.items.popularity == {"old": 6, "new": 6, "future": 1}  # totals are not trend rows
        assert features.items.trending(["new"], (new_day + 1) * DAY_S) == [6]  # recovery pruned nothing real
        assert features.items.trending(["old"], (old_day + 1) * DAY_S) == [0]
    finally:
        loop.stop()
        store.close()


def test_the_decoded_session_cache_is_bounded(settings: Settings, tmp_path, monkeypatch) -> None:
    """Decoded sessions are a cache beside the table's bytes: past its bound the oldest half goes
    (it held every user ever folded), while the table keeps every session and reads still work."""
    import streams.session_features as sf
    from recstream.vectorstore import VectorStore
    from streams.state import read_session

    monkeypatch.setattr(sf, "SESSION_CACHE_MAX", 20)
    settings = settings.model_copy(update={"qdrant_path": tmp_path / "qdrant"})
    store = VectorStore(settings)
    ctx = SimpleNamespace(settings=settings, worker="test", tables={}, store=store)
    features = sf.SessionFeatures(ctx)
    ctx.behaviour = BehaviourLoop(ctx, [features], group_id=f"{settings.topic_prefix}cache-test").start()
    try:
        with EventProducer(settings) as p:
            p.send_many("behaviour", _events(users=60, per_user=2))
        _wait(lambda: len(features.table.data) == 60, 60, "sessions not folded")
        assert len(features.cache) <= 20
        assert all(read_session(ctx, f"u{u}").recent == ["0", "1"] for u in range(60))
    finally:
        ctx.behaviour.stop()
        store.close()


def _java_produce(settings: Settings, topic: str, records: list[tuple[str, str]]) -> dict[str, set[int]]:
    """Send (key, value) records with a plain Java KafkaProducer (Kafka's default partitioner, the
    jars the broker runs from); the partitions it reports, per key."""
    import subprocess
    from pathlib import Path

    from infra.kafka_install import install

    source = Path(__file__).resolve().parents[1] / "support" / "java" / "KeyedProducer.java"
    out = subprocess.run(
        ["java", "-cp", f"{install()}/*", str(source), settings.kafka_bootstrap, topic],
        input="".join(f"{k}\t{v}\n" for k, v in records),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    placed: dict[str, set[int]] = {}
    for line in out.splitlines():
        key, partition = line.split("\t")
        placed.setdefault(key, set()).add(int(partition))
    return placed


def test_java_producers_and_the_sdk_agree_on_partitions_and_nothing_is_lost(settings: Settings) -> None:
    """A user's clicks written half by a JVM application (Java's default murmur2 partitioner) and
    half by the SDK reach one partition and are all counted; a click written with librdkafka's
    default partitioner (CRC32, kcat's default) to another partition is dead-lettered, not lost
    silently and not applied to the wrong partition's state."""
    from recstream.contracts.partitioning import partition_for
    from recstream.kafka.serde import encode

    topic = BEHAVIOUR.name(settings.topic_prefix)
    group = f"{settings.topic_prefix}behaviour-test"
    users = [f"user-{i}" for i in range(12)]
    clicks = lambda start: [  # noqa: E731
        BehaviourEvent(type="click", user_id=u, item_id=str(start + i), ts_ms=1_000 + start + i)
        for i in range(6)
        for u in users
    ]
    java = _java_produce(settings, topic, [(e.user_id, encode(e).decode()) for e in clicks(0)])
    assert java == {u: {partition_for(u.encode(), BEHAVIOUR.partitions)} for u in users}
    with EventProducer(settings) as p:
        p.send_many("behaviour", clicks(100))
    # librdkafka's default partitioner: find a user it places elsewhere, and send one click that way
    crc = Producer({"bootstrap.servers": settings.kafka_bootstrap})
    misplaced = []
    for i in range(200):
        user = f"crc-{i}"
        event = BehaviourEvent(type="click", user_id=user, item_id="1")
        crc.produce(topic, key=user.encode(), value=encode(event), on_delivery=lambda err, msg: misplaced.append(msg))
        crc.flush(10)
        if misplaced[-1].partition() != partition_for(user.encode(), BEHAVIOUR.partitions):
            break
    wrong = misplaced[-1]
    assert wrong.partition() != partition_for(wrong.key(), BEHAVIOUR.partitions), "CRC32 agreed with murmur2 200 times"

    recorder = Recorder(changelog_topic(f"{settings.topic_prefix}app", "counts"))
    loop = _loop(settings, recorder, group)
    try:
        _wait(lambda: recorder.total() >= 12 * len(users) + len(misplaced) - 1, 60, "events missing")
        time.sleep(0.3)
    finally:
        loop.stop()
    assert {u: int(recorder.table.data[u.encode()]) for u in users} == {u: 12 for u in users}
    assert wrong.key().decode() not in recorder.seen
    dlq = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": "dlq", "auto.offset.reset": "earliest"})
    dlq.subscribe([dead_letter_topic(topic)])
    letters: list[dict] = []
    deadline = time.monotonic() + 30
    while not letters and time.monotonic() < deadline:
        msg = dlq.poll(0.5)
        if msg is not None and not msg.error():
            letters.append(json.loads(msg.value()))
    dlq.close()
    assert [x["error_type"] for x in letters] == ["wrong_partition"]
    assert "murmur2" in letters[0]["error"] and letters[0]["partition"] == wrong.partition()


def test_a_retried_event_is_applied_once(settings: Settings) -> None:
    """A client that retries after a 503 or a timeout resends the same event_id: whether or not the
    first write landed, the worker folds the event once and counts the copy as a duplicate. Ids are
    a user's: an application that numbers each user's events itself ("evt-1" for five users, two
    of whom at least share one of the four partitions) loses none of them."""
    from prometheus_client import REGISTRY

    def duplicates() -> float:
        return REGISTRY.get_sample_value("recstream_feature_events_total", {"result": "duplicate"}) or 0.0

    before = duplicates()
    events = _events(users=5, per_user=4)
    with EventProducer(settings) as p:
        p.send_many("behaviour", events)
        p.send_many("behaviour", events[:7])  # the retry of a batch whose first write did land
        own_ids = [BehaviourEvent(type="click", user_id=f"u{u}", item_id="x", event_id="evt-1") for u in range(5)]
        p.send_many("behaviour", own_ids)
    recorder = Recorder(changelog_topic(f"{settings.topic_prefix}app", "counts"))
    loop = _loop(settings, recorder, f"{settings.topic_prefix}behaviour-test")
    try:
        _wait(lambda: duplicates() - before >= 7, 60, "the retried copies were not recognised")
        _wait(lambda: recorder.total() >= len(events) + len(own_ids), 30, "events missing")
        time.sleep(0.3)
    finally:
        loop.stop()
    assert recorder.total() == len(events) + len(own_ids)
    assert {k: int(v) for k, v in recorder.table.data.items()} == {f"u{u}".encode(): 5 for u in range(5)}


def test_a_click_read_after_a_restart_still_labels_its_impression(make_settings: Callable[..., Settings]) -> None:
    """An impression's window is open when the worker stops; the user clicks while it is down, after
    the window would have closed, behind a backlog of other events. The restarted joiner recovers
    the window from its changelog and must wait for the backlog: it used to close the window at its
    first tick, before the click was read, emitting a label-0 example and dropping the click."""
    from recstream.contracts.events import TrainingExample
    from recstream.contracts.topics import TOPICS
    from recstream.kafka.serde import decode
    from streams.feedback_joiner import FeedbackJoiner
    from streams.state import declare_search_queries

    settings = make_settings(feedback_window_s=1.0)
    group = f"{settings.topic_prefix}feedback-test"

    def joiner_loop() -> tuple[FeedbackJoiner, BehaviourLoop]:
        ctx = SimpleNamespace(settings=settings, worker="test", tables={}, agents=["features"])
        declare_search_queries(ctx)
        joiner = FeedbackJoiner(ctx)
        ctx.behaviour = BehaviourLoop(ctx, [joiner], group_id=group)
        return joiner, ctx.behaviour.start()

    shown = dict(user_id="u1", item_id="i1", request_id="r1", position=0, propensity=1.0)
    joiner, loop = joiner_loop()
    try:
        with EventProducer(settings) as p:
            p.send("behaviour", BehaviourEvent(type="impression", **shown))
        _wait(lambda: len(joiner.table.data) == 1, 60, "the impression's window did not open")
    finally:
        loop.stop()  # commits the impression and its window's changelog record
    time.sleep(1.5)  # past the window's deadline while the worker is down
    with EventProducer(settings) as p:
        p.send_many("behaviour", _events(users=2, per_user=10_000))  # u1 among them: its partition too
        p.send("behaviour", BehaviourEvent(type="click", **shown))

    examples_topic = TOPICS["training-examples"].name(settings.topic_prefix)
    reader = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "examples", "auto.offset.reset": "earliest"}
    )
    reader.subscribe([examples_topic])
    joiner, loop = joiner_loop()
    got: list[TrainingExample] = []
    try:
        deadline = time.monotonic() + 60
        while not got:
            assert time.monotonic() < deadline, "no training example"
            msg = reader.poll(0.2)
            if msg is not None and not msg.error():
                got.append(decode(TOPICS["training-examples"], msg.value(), settings.max_message_bytes))
    finally:
        loop.stop()
        reader.close()
    assert [(e.request_id, e.item_id, e.clicked) for e in got] == [("r1", "i1", True)]

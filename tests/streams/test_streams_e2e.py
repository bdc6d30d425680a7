"""The stream processors end to end: real Kafka broker, real tritonserver, Qdrant local mode, and the
worker as a real child process (`python -m streams.worker`), driven through the client SDK.

The MovieLens-100k catalog goes through the catalog topic once per session (the `indexed_catalog`
fixture, ~1 min on 2 cores, most of it Triton encoding 1,682 titles); each worker then starts
from a copy of that Qdrant directory, because local mode lets one process open a directory.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import Consumer
from worker_stack import TEST_TRITON_TIMEOUT_S, read_all, uninterrupted_fold

from recstream.client import EventProducer, RecommendationClient
from recstream.client.consumer import read_to_end
from recstream.config import Settings, settings_env
from recstream.contracts.events import BehaviourEvent, RecommendationRequest, RecommendationResult, RequestFilters
from recstream.contracts.topics import CATALOG, TOPICS, dead_letter_topic
from recstream.data.datasets import load_dataset
from recstream.data.events import catalog_events
from recstream.explore import PlackettLuce
from recstream.vectorstore import VectorStore
from streams.process import WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

FEEDBACK_WINDOW_S = 2.0


@pytest.fixture(scope="session")
def movielens():
    return load_dataset("ml-100k")


@pytest.fixture(scope="session")
def indexed_catalog(kafka_bootstrap: str, triton_server, tmp_path_factory: pytest.TempPathFactory, movielens) -> Path:
    """A Qdrant directory holding the whole MovieLens catalog, indexed by the catalog agent."""
    from recstream.kafka.admin import ensure_topics

    root = tmp_path_factory.mktemp("catalog")
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"c{uuid.uuid4().hex[:8]}.",
        qdrant_path=root / "qdrant",
        run_dir=root / "run",
        triton_url=triton_server.url,
        triton_grpc_url=triton_server.grpc_url,
    )
    ensure_topics(settings)
    worker = WorkerProcess(settings, root / "worker.log", ["--agents", "catalog"]).start()
    try:
        items = catalog_events(movielens.items)
        with EventProducer(settings) as producer:
            producer.send_many("catalog", items)
        deadline = time.monotonic() + 240
        while worker.metric("recstream_indexed_items") < len(items):
            assert time.monotonic() < deadline, worker.tail()
            assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
            time.sleep(0.5)
    finally:
        worker.stop()
    store = VectorStore(settings)
    assert store.count() == len(movielens.items)
    store.close()
    return settings.qdrant_path


def _worker_settings(
    make_settings: Callable[..., Settings], triton_server, tmp_path: Path, snapshot: Path, **overrides
) -> Settings:
    qdrant = tmp_path / f"qdrant-{uuid.uuid4().hex[:6]}"
    shutil.copytree(snapshot, qdrant)
    values = {
        "qdrant_path": qdrant,
        "triton_url": triton_server.url,
        "triton_grpc_url": triton_server.grpc_url,
        "triton_timeout_s": TEST_TRITON_TIMEOUT_S,
    }
    values.update(overrides)
    return make_settings(**values)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streams")


def _with_sequence_fusion(repo: Path, candidates: int) -> Path:
    """A copy of the committed model repository whose newest sequence_scorer version adds
    `candidates` of its items to each list (the worker reads the fusion from the version's meta)."""
    from recstream.models.repository import versions

    shutil.copytree(Path(__file__).resolve().parents[2] / "model_repo", repo)
    meta_path = repo / "sequence_scorer" / str(versions(repo, "sequence_scorer")[-1]) / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["config"]["fusion"] = {"candidates": candidates, "weight": 0.0}
    meta_path.write_text(json.dumps(meta))
    return repo


@pytest.fixture(scope="module")
def stack(kafka_bootstrap: str, triton_server, indexed_catalog: Path, module_tmp: Path) -> Iterator[Settings]:
    """One worker with every agent, shared by the functional tests (each uses its own users)."""
    from recstream.kafka.admin import ensure_topics

    qdrant = module_tmp / "qdrant"
    shutil.copytree(indexed_catalog, qdrant)
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap,
        topic_prefix=f"s{uuid.uuid4().hex[:8]}.",
        qdrant_path=qdrant,
        run_dir=module_tmp / "run",
        triton_url=triton_server.url,
        triton_grpc_url=triton_server.grpc_url,
        triton_timeout_s=TEST_TRITON_TIMEOUT_S,
    )
    ensure_topics(settings)
    # The in-process ranker: these tests are about the stream logic, and its ranking is explainable;
    # the Triton ranker path is exercised by test_triton_ranker_then_degraded_when_unreachable.
    worker = WorkerProcess(
        settings, module_tmp / "worker.log", ["--feedback-window-s", str(FEEDBACK_WINDOW_S), "--ranker", "inprocess"]
    ).start()
    try:
        yield settings
    finally:
        worker.stop()
        print(worker.tail(3000))


@pytest.fixture(scope="module")
def client(stack: Settings) -> Iterator[RecommendationClient]:
    with RecommendationClient(stack) as c:
        # The first request of a fresh worker pays for lazy start-up; keep it out of the assertions.
        c.request(RecommendationRequest(user_id="warmup", kind="search", query="warm up"), timeout_s=60)
        yield c


def _titles(movielens, result: RecommendationResult) -> list[str]:
    titles = movielens.items.set_index("item_id")["title"]
    return [str(titles[i.item_id]) for i in result.items]


def _user() -> str:
    return f"u{uuid.uuid4().hex[:8]}"


def test_search_returns_items_relevant_to_the_text(client: RecommendationClient, movielens) -> None:
    res = client.request(RecommendationRequest(user_id=_user(), kind="search", query="Star Wars", k=5), timeout_s=10)
    assert not res.degraded and res.kind == "search" and len(res.items) == 5
    assert "Star Wars (1977)" in _titles(movielens, res)[:3], _titles(movielens, res)
    res = client.request(RecommendationRequest(user_id=_user(), kind="search", query="horror", k=10), timeout_s=10)
    tags = movielens.items.set_index("item_id")["genres"]
    horror = sum("Horror" in str(tags[i.item_id]) for i in res.items)
    assert horror >= 5, _titles(movielens, res)
    assert [i.position for i in res.items] == list(range(10))
    assert all(i.propensity == 1.0 and i.reasons for i in res.items)
    # answered by the hybrid search the served text_encoder version ships weights for (bench-search)
    assert res.model_version.endswith("+hybrid"), res.model_version
    assert all({"dense", "lexical"} <= set(i.reasons) for i in res.items), [i.reasons for i in res.items]
    assert all(i.reasons["lexical"] > 0 for i in res.items[:3])  # "horror" is in their genres


def test_a_new_item_is_indexed_from_its_text_and_found(client: RecommendationClient, movielens) -> None:
    """An item upserted at runtime, which the trained item encoder never saw, is embedded from its
    text plus a residual borrowed from its text neighbours (it has none of its own) and retrievable
    at once; catalogue items carry their own residual."""
    from recstream.contracts.events import ItemUpsert
    from recstream.contracts.models import ITEM_ENCODER, TEXT_ENCODER
    from recstream.models.encoder import TextEncoder, version_text_encoder
    from recstream.models.repository import latest_version_dir, versions
    from recstream.models.served import ItemEncoder

    repo = Path(__file__).resolve().parents[2] / "model_repo"
    served_encoder = ItemEncoder.load(repo / ITEM_ENCODER / str(versions(repo, ITEM_ENCODER)[-1]))
    max_len = served_encoder.max_text_len
    item = ItemUpsert(
        item_id=f"new-{uuid.uuid4().hex[:6]}", title="Zorblax the Quantum Llama Detective", category="Comedy"
    )
    client.producer.send("catalog", item)
    client.producer.flush(5)
    query = "quantum llama detective"
    deadline, found, first_found, top = time.monotonic() + 30, [], None, None
    # Retrievable by its vector as soon as it is indexed; its BM25 evidence arrives with the hybrid
    # search's next catalogue snapshot (at most streams.hybrid_search.MIN_REBUILD_GAP_S later), and
    # with it the top slot.
    while top != item.item_id and time.monotonic() < deadline:
        res = client.request(RecommendationRequest(user_id=_user(), kind="search", query=query, k=5), timeout_s=10)
        found = [i for i in res.items if i.item_id == item.item_id]
        top = res.items[0].item_id if res.items else None
        if found and first_found is None:
            first_found = time.monotonic()
        time.sleep(0.2)
    assert found and res.items[0].item_id == item.item_id, res
    assert time.monotonic() - first_found < 5.0, "the lexical evidence lagged the index by more than 5 s"
    assert found[0].reasons["lexical"] > 0, found[0].reasons
    text_model = TextEncoder(max_seq_length=max_len)
    query_model = version_text_encoder(latest_version_dir(repo, TEXT_ENCODER))  # what Triton serves
    q = query_model.encode([query])[0]
    text_vector = text_model.encode([item.text()])
    stored = served_encoder.combine(text_vector, [item.item_id])[0]  # what the catalog indexer stored
    assert not served_encoder.knows(item.item_id) and float(stored @ text_vector[0]) < 0.999
    assert found[0].retrieval_score == pytest.approx(float(q @ stored), abs=2e-3)
    # a catalogue item the model was trained on is not its text alone
    star_wars = catalog_events(movielens.items[movielens.items.item_id == "50"])[0]
    res = client.request(RecommendationRequest(user_id=_user(), kind="search", query="Star Wars", k=20), timeout_s=10)
    hit = next(i for i in res.items if i.item_id == "50")
    q = query_model.encode(["Star Wars"])[0]
    assert abs(hit.retrieval_score - float(q @ text_model.encode([star_wars.text()])[0])) > 0.01

    # a Kafka tombstone (key = item_id, null value) on the compacted catalog topic deletes it
    client.producer.send_raw(CATALOG.name(client.settings.topic_prefix), item.item_id.encode(), None)
    client.producer.flush(5)
    deadline = time.monotonic() + 30
    while found and time.monotonic() < deadline:
        res = client.request(RecommendationRequest(user_id=_user(), kind="search", query=query, k=5), timeout_s=10)
        found = [i for i in res.items if i.item_id == item.item_id]
        time.sleep(0.2)
    assert not found, res


def test_clicks_shift_recommendations_within_one_second(client: RecommendationClient, movielens) -> None:
    user = _user()
    before = client.request(RecommendationRequest(user_id=user, k=10), timeout_s=10)
    horror = movielens.items[movielens.items.category == "Horror"].item_id.tolist()
    share_before = sum(i.category == "Horror" for i in before.items) / 10
    for item in horror[:4]:
        client.producer.send("behaviour", BehaviourEvent(type="click", user_id=user, item_id=item))
    client.producer.flush(5)
    clicked_at = time.monotonic()
    share, after = 0.0, None
    # done when all four clicks show: the list has turned to horror and hides every clicked film
    # (behaviour and requests are separate topics, so a request may see two clicks applied of four)
    while time.monotonic() - clicked_at < 1.0:
        after = client.request(RecommendationRequest(user_id=user, k=10), timeout_s=1)
        share = sum(i.category == "Horror" for i in after.items) / 10
        if share >= 0.5 and not {i.item_id for i in after.items} & set(horror[:4]):
            break
    elapsed = time.monotonic() - clicked_at
    assert after is not None and share >= 0.5 > share_before, (share_before, share, _titles(movielens, after))
    assert elapsed < 1.0, f"recommendations shifted only after {elapsed:.3f}s"
    assert not {i.item_id for i in after.items} & set(horror[:4])  # clicked items are not re-recommended


def test_purchased_items_are_never_recommended_again(client: RecommendationClient, movielens) -> None:
    user = _user()
    first = client.request(RecommendationRequest(user_id=user, kind="search", query="Star Wars", k=5), timeout_s=10)
    bought = [i.item_id for i in first.items[:3]]
    for item in bought:
        client.producer.send("behaviour", BehaviourEvent(type="purchase", user_id=user, item_id=item))
    client.producer.flush(5)
    time.sleep(0.5)
    for _ in range(3):
        for req in (
            RecommendationRequest(user_id=user, kind="search", query="Star Wars", k=20),
            RecommendationRequest(user_id=user, k=20),
            RecommendationRequest(user_id=user, k=20, filters=RequestFilters(categories=["Action", "Sci-Fi"])),
        ):
            res = client.request(req, timeout_s=10)
            assert res.items and not set(bought) & {i.item_id for i in res.items}, _titles(movielens, res)
            if req.filters.categories:
                assert all(i.category in req.filters.categories for i in res.items)


def _consume(settings: Settings, topic: str, want: Callable[[list[dict]], bool], timeout_s: float) -> list[dict]:
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"check-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([topic])
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and not want(out):
            for msg in consumer.consume(500, timeout=0.3):
                if not msg.error():
                    out.append(json.loads(msg.value()))
    finally:
        consumer.close()
    return out


def test_impressions_and_clicks_become_training_examples(stack: Settings, client: RecommendationClient) -> None:
    user = _user()
    res = client.request(RecommendationRequest(user_id=user, k=6), timeout_s=10)
    found = client.request(RecommendationRequest(user_id=user, kind="search", query="Star Wars", k=3), timeout_s=10)
    p = client.producer
    p.send_many("behaviour", [*res.impressions(), *found.impressions()])
    clicked, bought = res.items[1], res.items[3]
    p.send_many("behaviour", [res.feedback(clicked, "click"), res.feedback(bought, "click")])
    p.send("behaviour", res.feedback(bought, "purchase"))
    p.flush(5)
    topic = TOPICS["training-examples"].name(stack.topic_prefix)
    examples = _consume(
        stack,
        topic,
        lambda xs: sum(x["request_id"] in (res.request_id, found.request_id) for x in xs) >= 9,
        timeout_s=FEEDBACK_WINDOW_S + 15,
    )
    searched = [x for x in examples if x["request_id"] == found.request_id]
    assert len(searched) == 3 and {x["query"] for x in searched} == {"Star Wars"}  # the worker kept the query
    mine = {x["item_id"]: x for x in examples if x["request_id"] == res.request_id}
    assert {x["query"] for x in mine.values()} == {None}
    assert set(mine) == {i.item_id for i in res.items}
    for item in res.items:
        ex = mine[item.item_id]
        assert ex["position"] == item.position and ex["propensity"] == item.propensity
        assert ex["model_version"] == res.model_version and ex["user_id"] == user
    was_clicked, was_bought = mine[clicked.item_id], mine[bought.item_id]
    assert (was_clicked["label"], was_clicked["clicked"], was_clicked["purchased"]) == (1.0, True, False)
    assert (was_bought["label"], was_bought["purchased"]) == (1.0, True)
    assert sum(x["label"] for x in mine.values()) == 2.0


def test_invalid_events_are_dead_lettered_and_valid_ones_flow(stack: Settings, client: RecommendationClient) -> None:
    user = _user()
    p = client.producer
    bad = {
        "behaviour": [b"{not json", json.dumps({"type": "teleport", "user_id": user, "item_id": "1"}).encode()],
        "requests": [json.dumps({"user_id": user, "kind": "search"}).encode(), b"\xff\xfe"],
        "catalog": [json.dumps({"op": "upsert", "item_id": "x y"}).encode()],
    }
    for logical, values in bad.items():
        for v in values:
            p.send_raw(TOPICS[logical].name(stack.topic_prefix), user.encode(), v)
    p.send("behaviour", BehaviourEvent(type="purchase", user_id=user, item_id="50"))  # Star Wars
    p.flush(5)
    time.sleep(0.3)
    res = client.request(RecommendationRequest(user_id=user, kind="search", query="Star Wars", k=10), timeout_s=10)
    assert res.items and "50" not in {i.item_id for i in res.items}  # the valid purchase was applied
    for logical, values in bad.items():
        dlq = dead_letter_topic(TOPICS[logical].name(stack.topic_prefix))
        letters = _consume(stack, dlq, lambda xs, n=len(values): len(xs) >= n, timeout_s=15)
        assert len(letters) == len(values), (logical, letters)
        assert {x["error_type"] for x in letters} <= {"malformed_json", "schema"}
        assert all(x["source_topic"] == TOPICS[logical].name(stack.topic_prefix) for x in letters)


def test_triton_ranker_then_degraded_when_unreachable(
    make_settings: Callable[..., Settings], triton_server, indexed_catalog: Path, tmp_path: Path, movielens
) -> None:
    from streams.process import free_port

    # Live Triton: the 'ranker' model scores the candidates. The committed sequence_scorer version
    # chose the ranker alone on validation (its gain was under one standard error), so a worker would
    # not call it; this one reads a copy of the repository whose served version adds 10 candidates.
    repo = _with_sequence_fusion(tmp_path / "model_repo", candidates=10)
    settings = _worker_settings(make_settings, triton_server, tmp_path, indexed_catalog, model_repo=repo)
    worker = WorkerProcess(settings, tmp_path / "live.log", ["--ranker", "triton"]).start()
    try:
        with RecommendationClient(settings) as c:
            user = _user()
            c.producer.send("behaviour", BehaviourEvent(type="click", user_id=user, item_id="50"))
            c.producer.flush(5)
            answers = {}
            for req in (
                RecommendationRequest(user_id=user, k=5),
                RecommendationRequest(user_id=user, kind="search", query="Star Wars", k=5),
            ):
                res = c.request(req, timeout_s=10)
                # a recommendation is scored by the ranker; a search by the hybrid search the served
                # text_encoder ships weights for
                scorer = "ranker" if req.kind == "recommend" else "text_encoder-v"
                assert not res.degraded and res.model_version.startswith(scorer) and len(res.items) == 5, res
                answers[res.request_id] = res
            # The sequence model is asked for a session with items in it; behaviour and requests are
            # separate topics, so the first request may have come before the click: ask until one has.
            deadline = time.monotonic() + 10
            while worker.metric("recstream_triton_request_seconds_count", 'model="sequence_scorer"') < 1:
                assert time.monotonic() < deadline, "the worker never asked Triton's sequence_scorer"
                res = c.request(RecommendationRequest(user_id=user, k=5), timeout_s=10)
                assert not res.degraded and res.model_version.startswith("ranker") and len(res.items) == 5, res
                answers[res.request_id] = res
        # the session vector came from the trained session encoder on Triton, not the decayed sum
        assert worker.metric("recstream_triton_request_seconds_count", 'model="session_encoder"') >= 1
    finally:
        worker.stop()
    # RANKING_LOG=all (the default): each greedy answer of the ranker is logged with the inputs it was
    # scored from; a search the hybrid search answered is not the ranker's and is not logged.
    logs = {rl.request_id: rl for rl in read_to_end(settings, "ranking-log")[0]}  # type: ignore[attr-defined]
    assert set(logs) == {rid for rid, res in answers.items() if res.kind == "recommend"}
    for rid, res in answers.items():
        if res.kind == "search":
            continue
        rl = logs[rid]
        assert rl.policy_spec == "greedy" and [c.item_id for c in rl.pool] == [i.item_id for i in res.items]
        assert [c.score for c in rl.pool] == pytest.approx([i.score for i in res.items], abs=1e-5)
        assert rl.context is not None and len(rl.context) == 768 and all(c.features for c in rl.pool)
        query_half = np.abs(np.array(rl.context[384:])).sum()
        assert (query_half > 0) == (res.kind == "search"), (res.kind, query_half)

    dead = f"127.0.0.1:{free_port()}"  # nothing listens here: Triton is unreachable
    settings = _worker_settings(
        make_settings, triton_server, tmp_path, indexed_catalog, triton_url=dead, triton_grpc_url=dead
    )
    worker = WorkerProcess(settings, tmp_path / "dead.log", ["--ranker", "triton"]).start()
    try:
        with RecommendationClient(settings) as c:
            user = _user()
            c.producer.send("behaviour", BehaviourEvent(type="click", user_id=user, item_id="50"))
            c.producer.flush(5)
            for _ in range(3):
                t0 = time.monotonic()
                res = c.request(RecommendationRequest(user_id=user, kind="search", query="Star Wars", k=5), timeout_s=5)
                assert time.monotonic() - t0 < 2.0  # never stalls on the missing server
                assert res.degraded and res.model_version == "retrieval"
                assert "Star Wars (1977)" in _titles(movielens, res)  # lexical fallback still finds it
                rec = c.request(RecommendationRequest(user_id=user, k=5), timeout_s=5)
                assert rec.degraded and rec.model_version == "retrieval" and len(rec.items) == 5
        assert worker.metric("recstream_degraded_answers_total") >= 6
    finally:
        worker.stop()


def test_exploring_policy_logs_propensities_and_varies_the_order(
    make_settings: Callable[..., Settings], triton_server, indexed_catalog: Path, tmp_path: Path
) -> None:
    settings = _worker_settings(
        make_settings, triton_server, tmp_path, indexed_catalog, exploration_policy="pl:0.5:1", exploration_seed=7
    )
    worker = WorkerProcess(settings, tmp_path / "explore.log", ["--ranker", "inprocess"]).start()
    try:
        with RecommendationClient(settings) as c:
            user = _user()
            for item in ("50", "172", "181"):  # Star Wars and its sequels: a sci-fi session
                c.producer.send("behaviour", BehaviourEvent(type="click", user_id=user, item_id=item))
            c.producer.flush(5)
            time.sleep(1)
            orders = []
            for _ in range(8):
                res = c.request(RecommendationRequest(user_id=user, k=6), timeout_s=10)
                assert res.policy == "pl_t0.5_g1" and len(res.items) == 6
                assert len({i.item_id for i in res.items}) == 6
                head, *rest = res.items
                assert head.propensity == 1.0  # the greedy head slot is not explored
                assert all(0 < i.propensity < 1 for i in rest), res.items
                orders.append(tuple(i.item_id for i in res.items))
            assert len(set(orders)) > 1, "an exploring policy must not always show the same list"
            assert len({o[0] for o in orders}) == 1, "the greedy head stays put"
    finally:
        worker.stop()


def _cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`python -m recstream.ops.cli ARGS` against the test's broker and topics."""
    return subprocess.run(
        [sys.executable, "-m", "recstream.ops.cli", *args],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=180,
        check=check,
    )


def test_off_policy_estimate_from_the_workers_logs(
    make_settings: Callable[..., Settings], triton_server, indexed_catalog: Path, tmp_path: Path
) -> None:
    """pl:2 answers through the real broker: simulated users click by a known item-position model,
    the worker's ranking log and the feedback joiner's training examples are the logs, and
    `recstream.ops.cli ope` estimates what the greedy answers, and a cooler policy, would have earned.
    The intervals cover the truth, computed from the logged pools and the click model."""
    settings = _worker_settings(
        make_settings, triton_server, tmp_path, indexed_catalog, exploration_policy="pl:2", exploration_seed=11
    )
    worker = WorkerProcess(
        settings, tmp_path / "ope.log", ["--feedback-window-s", "1", "--ranker", "inprocess"]
    ).start()
    rng = np.random.default_rng(5)
    k, n_users, rounds = 6, 40, 12

    def click_p(score: float, slot: int) -> float:  # the users' item-position click model
        # Steep in the ranker's logit (it spans ~0.15-0.4 within a pool), so the weights matter.
        return 0.7 / (1.0 + np.exp(-25.0 * (score - 0.22))) / (1.0 + slot) ** 0.7

    try:
        with RecommendationClient(settings) as c:
            users = [_user() for _ in range(n_users)]
            for u in users:  # each session starts from two real items, so pools differ
                for item in rng.choice(1682, 2, replace=False) + 1:
                    c.producer.send("behaviour", BehaviourEvent(type="click", user_id=u, item_id=str(item)))
            c.producer.flush(5)
            time.sleep(1)
            answers = []
            for _ in range(rounds):
                futures = [c.submit(RecommendationRequest(user_id=u, k=k)) for u in users]
                for f in futures:
                    res = f.result(timeout=60)
                    assert res.policy == "pl_t2" and not res.degraded and len(res.items) == k
                    answers.append(res)
                    c.producer.send_many("behaviour", res.impressions())
                    for item in res.items:
                        if rng.random() < click_p(item.score, item.position):
                            c.producer.send("behaviour", res.feedback(item, "click"))
            c.producer.flush(5)
        n = len(answers)
        deadline = time.monotonic() + 60
        while len(read_to_end(settings, "training-examples")[0]) < n * k:
            assert time.monotonic() < deadline, worker.tail(2000)
            time.sleep(1)
        logs = read_to_end(settings, "ranking-log")[0]
        assert {rl.request_id for rl in logs} == {a.request_id for a in answers}  # type: ignore[attr-defined]
        for target in ("greedy", "pl:0.5"):
            truth = 0.0  # the target's expected clicks on these requests under the click model
            for rl in logs:
                if target == "greedy":
                    truth += sum(click_p(c.score, j) for j, c in enumerate(rl.greedy))  # type: ignore[attr-defined]
                else:
                    pool = rl.pool  # type: ignore[attr-defined]
                    m = PlackettLuce(0.5).exact_marginals(-np.arange(len(pool), dtype=np.float64), k)
                    truth += sum(m[i, j] * click_p(c.score, j) for i, c in enumerate(pool) for j in range(k))
            truth /= n * k
            # 99.9% intervals: six of them must all cover the truth, whatever pools this run drew.
            out = _cli(settings, "ope", target, "--json", "--confidence", "0.999")
            report = json.loads(out.stdout)
            assert report["requests"] == n and report["requests_incomplete"] == 0, report
            assert report["logging_policies"] == {"pl:2": n} and report["target_mass_unsupported"] < 0.05
            for est in report["estimates"]:
                assert est["low"] <= truth <= est["high"], (target, est, truth, report)
        table = _cli(settings, "ope", "greedy").stdout
        assert f"{n} logged requests" in table and "95% CI" in table, table
        assert [line.split()[0] for line in table.splitlines()[-3:]] == ["ips", "snips", "dr"], table
    finally:
        worker.stop()


def test_a_model_version_is_evaluated_on_the_workers_logged_pools(
    make_settings: Callable[..., Settings], triton_server, indexed_catalog: Path, tmp_path: Path, movielens
) -> None:
    """With the Triton ranker live, each ranking log carries the ranker's inputs as served; the
    logged context and features plus the catalog's item vectors reproduce the served logits, and
    `recstream.ops.cli ope greedy --model-version V` rescores every logged pool with V. Evaluating the
    live version itself, its paired difference with the logging model is 0."""
    from recstream.models.repository import load_exported, versions
    from recstream.models.served import item_vectors_as_indexed
    from recstream.ope.logged import LoggedRequest
    from recstream.ope.rescoring import PoolRescorer

    settings = _worker_settings(
        make_settings, triton_server, tmp_path, indexed_catalog, exploration_policy="pl:2", exploration_seed=3
    )
    worker = WorkerProcess(settings, tmp_path / "ope-model.log", ["--feedback-window-s", "1"]).start()
    rng = np.random.default_rng(9)
    k, users = 6, [_user() for _ in range(24)]
    try:
        with RecommendationClient(settings) as c:
            for u in users:
                for item in rng.choice(1682, 2, replace=False) + 1:
                    c.producer.send("behaviour", BehaviourEvent(type="click", user_id=u, item_id=str(item)))
            c.producer.flush(5)
            time.sleep(1)
            answers = []
            for _ in range(4):
                for f in [c.submit(RecommendationRequest(user_id=u, k=k)) for u in users]:
                    res = f.result(timeout=60)
                    assert res.policy == "pl_t2" and not res.degraded, res
                    answers.append(res)
                    c.producer.send_many("behaviour", res.impressions())
                    for item in res.items:
                        if rng.random() < 0.3 / (1 + item.position):
                            c.producer.send("behaviour", res.feedback(item, "click"))
            c.producer.flush(5)
        deadline = time.monotonic() + 60
        while len(read_to_end(settings, "training-examples")[0]) < len(answers) * k:
            assert time.monotonic() < deadline, worker.tail(2000)
            time.sleep(1)
    finally:
        worker.stop()
    logs = read_to_end(settings, "ranking-log")[0]
    assert len(logs) == len(answers)
    assert all(rl.context is not None and all(c.features is not None for c in rl.pool) for rl in logs)  # type: ignore[attr-defined]
    # The catalog topic of this test's prefix is empty (the Qdrant snapshot was indexed elsewhere):
    # publish the pooled items' upserts, as the application did for the live catalog.
    pooled = {c.item_id for rl in logs for c in rl.pool}  # type: ignore[attr-defined]
    upserts = [ev for ev in catalog_events(movielens.items) if ev.item_id in pooled]
    with EventProducer(settings) as producer:
        producer.send_many("catalog", upserts)
    live = versions(settings.model_repo)[-1]

    # the item vectors as the catalog indexer made them (the served item encoder)
    ids = [ev.item_id for ev in upserts]
    vectors = dict(
        zip(ids, item_vectors_as_indexed(settings.model_repo, [ev.text() for ev in upserts], ids), strict=True)
    )
    rescorer = PoolRescorer(load_exported(settings.model_repo, version=live).net, vectors)
    worst = max(
        float(np.abs(rescorer(LoggedRequest(rl, [])) - np.array([c.score for c in rl.pool])).max())  # type: ignore[arg-type, attr-defined]
        for rl in logs
    )
    assert worst < 1e-3, worst

    out = _cli(settings, "ope", "greedy", "--model-version", str(live), "--json")
    report = json.loads(out.stdout)
    assert report["candidate_model"] == str(live) and report["requests"] == len(answers), report
    assert report["requests_invalid"] == {}, report
    assert [e["method"] for e in report["versus_logging_model"]] == ["ips", "dr"]
    for e in report["versus_logging_model"]:
        assert abs(e["ctr"]) < 1e-3, report
    missing = _cli(settings, "ope", "greedy", "--model-version", "999", check=False)
    assert missing.returncode == 2 and "no model version 999" in missing.stderr, missing.stderr


def test_learning_policy_sinks_items_users_ignored(
    make_settings: Callable[..., Settings], triton_server, indexed_catalog: Path, tmp_path: Path
) -> None:
    """lift:1 (posterior-mean click lifts, no deliberate exploration) through the real broker: the
    impressions of one answer close their windows unclicked, the feedback joiner reports them to the
    worker's policy, and the next answer for the same session no longer leads with the ignored items;
    after a restart the worker still ranks that way."""
    settings = _worker_settings(make_settings, triton_server, tmp_path, indexed_catalog, exploration_policy="lift:1")
    worker = WorkerProcess(
        settings, tmp_path / "lift.log", ["--feedback-window-s", "1", "--ranker", "inprocess"]
    ).start()
    try:
        with RecommendationClient(settings) as c:
            user = _user()
            for item in ("50", "172", "181"):
                c.producer.send("behaviour", BehaviourEvent(type="click", user_id=user, item_id=item))
            c.producer.flush(5)
            time.sleep(1)
            first = c.request(RecommendationRequest(user_id=user, k=6), timeout_s=10)
            assert first.policy == "mean_lift_p1_h20000" and all(i.propensity == 1.0 for i in first.items)
            again = c.request(RecommendationRequest(user_id=user, k=6), timeout_s=10)
            assert [i.item_id for i in again.items] == [i.item_id for i in first.items]  # no feedback yet
            c.producer.send_many("behaviour", first.impressions())
            c.producer.flush(5)
            deadline = time.monotonic() + 20
            while worker.metric("recstream_policy_feedback_total", 'outcome="not_clicked"') < 6:
                assert time.monotonic() < deadline, worker.tail(2000)
                time.sleep(0.2)
            assert worker.metric("recstream_policy_feedback_total", 'outcome="unknown"') == 0
            after = c.request(RecommendationRequest(user_id=user, k=6), timeout_s=10)
            assert after.items[0].item_id != first.items[0].item_id, (first.items, after.items)
            shown_first = {i.item_id for i in first.items}
            assert any(i.item_id not in shown_first for i in after.items), "ignored items make room for others"
        worker.stop()  # a graceful stop saves what the policy learned
        assert (settings.run_dir / "policy").is_dir()
        worker = WorkerProcess(
            settings, tmp_path / "lift-restarted.log", ["--feedback-window-s", "1", "--ranker", "inprocess"]
        ).start()
        with RecommendationClient(settings) as c:
            restarted = c.request(RecommendationRequest(user_id=user, k=6), timeout_s=30)
            assert [i.item_id for i in restarted.items] == [i.item_id for i in after.items], "learning survives"
    finally:
        worker.stop()


# --- restart: kill -9 mid-stream -------------------------------------------------------------------

N_EVENTS = 50_000


def test_kill_9_mid_stream_then_restart_gives_the_uninterrupted_tables(
    make_settings: Callable[..., Settings], triton_server, indexed_catalog: Path, tmp_path: Path, movielens
) -> None:
    from recstream.contracts.topics import BEHAVIOUR
    from recstream.data.events import behaviour_events
    from recstream.recommend.session import SessionState
    from streams.naming import app_id

    settings = _worker_settings(make_settings, triton_server, tmp_path, indexed_catalog)
    events = []
    for ev in behaviour_events(movielens.interactions):
        events.append(ev)
        if len(events) == N_EVENTS:
            break
    log = tmp_path / "worker.log"
    worker = WorkerProcess(settings, log, ["--agents", "features"]).start()
    import threading

    def produce() -> None:
        with EventProducer(settings) as p:
            p.send_many("behaviour", events)

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        deadline = time.monotonic() + 120
        applied = 0.0
        while applied < N_EVENTS * 0.3:
            assert time.monotonic() < deadline, worker.tail()
            applied = worker.metric("recstream_feature_events_total", 'result="applied"')
            time.sleep(0.02)
        worker.kill9()
        assert applied < N_EVENTS, "the stream finished before the kill; nothing was interrupted"
        producer.join(120)
        restarted = WorkerProcess(settings, log, ["--agents", "features"]).start()
    finally:
        worker.kill9()
        producer.join(120)

    try:
        # The uninterrupted result: the pure fold over the topic in offset order, in-process.
        reference_store = tmp_path / "qdrant-ref"
        shutil.copytree(indexed_catalog, reference_store)
        store = VectorStore(settings.model_copy(update={"qdrant_path": reference_store}))
        source = read_all(settings, BEHAVIOUR.name(settings.topic_prefix))
        assert len(source) == N_EVENTS
        items = store.retrieve(sorted({e.item_id for e in events}))
        expected = uninterrupted_fold(settings, source, items)
        store.close()
        want = {k: v.to_bytes() for k, v in expected.items()}

        changelog = f"{app_id(settings)}-sessions-changelog"
        deadline = time.monotonic() + 180
        while True:
            table: dict[bytes, bytes] = {}
            for msg in read_all(settings, changelog):
                table[msg.key()] = msg.value()
            got = {k: SessionState.from_bytes(v).to_bytes() for k, v in table.items()}
            if got == want or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        differing = [k for k in want if got.get(k) != want[k]]
        assert not differing and set(got) == set(want), (
            f"{len(differing)} of {len(want)} users differ, e.g. {differing[:3]}\n{restarted.tail()}"
        )
        assert restarted.metric("recstream_feature_events_total", 'result="applied"') > 0
        skipped = restarted.metric("recstream_feature_events_total", 'result="skipped_replay"')
        print(
            f"killed at {applied:.0f} applied; after restart {skipped:.0f} replayed events skipped, "
            f"{len(want)} users equal"
        )
    finally:
        restarted.stop()

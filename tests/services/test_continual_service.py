"""The trainer service's steps without Kafka or Triton: fold events in, decide when to train,
promote a gated candidate into the registry, refuse a corrupted stream, roll back on a CTR drop."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from recstream.config import Settings
from recstream.continual import GateConfig, LearnerConfig
from recstream.contracts.events import ItemUpsert, TrainingExample
from recstream.models.export import export_ranker
from recstream.models.ranker import ITEM_DIM, N_CAND_FEATURES, RankerConfig, new_ranker
from services.trainer import CatalogFeatures, TrainerConfig, TrainerService

CATS = ["a", "b", "c", "d"]


def _fake_encode(texts: list[str]) -> np.ndarray:
    """Deterministic unit vectors: category direction + per-text noise (no model download in unit tests)."""
    rng0 = np.random.default_rng(0)
    dirs = {c: rng0.normal(size=ITEM_DIM) for c in CATS}
    out = []
    for t in texts:
        seed = int(hashlib.sha256(t.encode()).hexdigest()[:8], 16)
        v = dirs[t.split()[0]] + 0.5 * np.random.default_rng(seed).normal(size=ITEM_DIM)
        out.append(v / np.linalg.norm(v))
    return np.array(out, dtype=np.float32)


def _events(n_req: int, seed: int, shuffle_labels: bool = False, version: str = "ranker-v1") -> list:
    rng = np.random.default_rng(seed)
    items = [(f"i{n}", CATS[n % 4]) for n in range(40)]
    evs: list = [ItemUpsert(item_id=i, title=f"{c} item {i}", category=c) for i, c in items]
    ex = []
    for r in range(n_req):
        fav = CATS[r % 2]
        ctx = [i for i, c in items if c == fav][:3]
        for pos, j in enumerate(rng.choice(40, 8, replace=False)):
            item, cat = items[j]
            clicked = bool(rng.random() < (0.6 if cat == fav else 0.03) / (1 + pos) ** 0.5)
            ex.append([f"r{seed}-{r}", f"u{r % 20}", item, pos, clicked, ctx])
    if shuffle_labels:
        labels = rng.permutation([e[4] for e in ex])
        for e, y in zip(ex, labels, strict=True):
            e[4] = bool(y)
    evs += [
        TrainingExample(
            request_id=rid,
            user_id=u,
            item_id=i,
            position=p,
            propensity=1.0,
            model_version=version,
            clicked=c,
            label=float(c),
            context_items=ctx,
        )
        for rid, u, i, p, c, ctx in ex
    ]
    return evs


@pytest.fixture
def service(tmp_path: Path) -> TrainerService:
    return _service(tmp_path, triton_url="")


def _service(tmp_path: Path, triton_url: str) -> TrainerService:
    """A trainer over a fresh repository holding an untrained ranker v1: a round every 1,000 examples."""
    repo = tmp_path / "model_repo"
    if not repo.exists():
        export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    served_by = {"triton_url": triton_url} if triton_url else {}
    settings = Settings(model_repo=repo, run_dir=tmp_path / "run", **served_by)
    cfg = TrainerConfig(
        train_every_examples=1000,
        train_every_s=3600,
        min_examples=600,
        holdout=400,
        learner=LearnerConfig(steps=80),
        gate=GateConfig(min_examples=200),
    )
    return TrainerService(settings, cfg, CatalogFeatures(encode=_fake_encode), triton_url=triton_url)


def test_round_promotes_a_trained_candidate(service: TrainerService) -> None:
    assert service.registry.live == 1 and not service.due()
    added = service.handle(_events(150, seed=1))
    assert added == 1200 and service.due()
    res = service.train_round()
    assert res.accepted, res.reason
    assert res.version == 2 and service.registry.live == 2 and service.registry.served() == [1, 2]
    assert not service.due()  # counters reset after a round


def test_corrupted_stream_is_refused(service: TrainerService) -> None:
    service.handle(_events(150, seed=1))
    assert service.train_round().accepted  # v2 learnt the real signal
    # A broken pipeline: the training data since v2 has shuffled labels (the reservoir is emptied so
    # the candidate sees only those); the held-back window (newest 400) is clean traffic.
    service.buffer.reservoir.clear()
    service.handle(_events(150, seed=2, shuffle_labels=True, version="ranker-v2"))
    service.handle(_events(50, seed=3, version="ranker-v2"))
    service.cfg.learner = LearnerConfig(mode="full", steps=200, lr=3e-3)  # let the noise do real damage
    res = service.train_round()
    assert not res.accepted, res
    assert service.registry.live == 2 and service.registry.versions() == [1, 2]


def test_ctr_drop_triggers_automatic_rollback(service: TrainerService) -> None:
    service.handle(_events(150, seed=1))
    assert service.train_round().accepted
    rng = np.random.default_rng(3)
    for _ in range(1500):
        service.monitor.observe("ranker-v1", bool(rng.random() < 0.2))
        service.monitor.observe("ranker-v2", bool(rng.random() < 0.08))
    assert service.check_rollback() == 1
    assert service.registry.live == 1 and service.registry.served() == [1]
    assert service.registry.state()["history"][-1]["event"] == "rollback"


def test_a_rollback_during_a_round_is_not_undone_by_its_promotion(tmp_path: Path) -> None:
    """An operator rolls v2 back (`models rollback`, another process: here another registry object
    on the same folder) while a round trains from v2. The round used to promote its candidate over
    the rollback, serving a child of the version just rolled back; now the rollback stands."""
    from recstream.continual import ModelRegistry

    service = _service(tmp_path, triton_url="")
    service.handle(_events(150, seed=1))
    assert service.train_round().accepted and service.registry.live == 2
    operator = ModelRegistry(service.settings.model_repo, service.cfg.model_name)
    publish = service.registry.publish

    def publish_after_a_rollback(ranker: object, metrics: dict | None = None) -> int:
        operator.rollback("manual: v2 misbehaves")
        return publish(ranker, metrics)

    service.registry.publish = publish_after_a_rollback  # type: ignore[method-assign]
    service.handle(_events(150, seed=4))
    res = service.train_round()
    assert not res.accepted and "not promoted" in res.reason and "live is v1" in res.reason, res
    assert service.registry.live == 1 and service.registry.served() == [1]


def test_a_restarted_trainer_still_rolls_back_a_bad_promotion(tmp_path: Path) -> None:
    """After a promotion the previous version gets no traffic, so its CTR counts exist only from
    before. They used to live in memory alone: after any restart of the trainer the rollback rule
    waited for v1 impressions that could never come. Now they are kept beside the registry."""
    service = _service(tmp_path, triton_url="")
    service.handle(_events(150, seed=1))
    assert service.train_round().accepted and service.registry.live == 2
    rng = np.random.default_rng(3)
    for _ in range(1500):
        service.monitor.observe("ranker-v1", bool(rng.random() < 0.2))
    service.save_ctr()  # what the run loop does before it commits a batch's offsets

    restarted = _service(tmp_path, triton_url="")
    assert restarted.monitor.counts[1] == service.monitor.counts[1]
    for _ in range(1500):
        restarted.monitor.observe("ranker-v2", bool(rng.random() < 0.08))
    assert restarted.check_rollback() == 1
    assert restarted.registry.live == 1


def _logged_answers(service: TrainerService, n_req: int, seed: int) -> list:
    """pl:4 answers of the live v1 over pools of 8 catalog items, as the worker logs them (ranker
    inputs included), and their outcomes: users click by the live model's rank (it is right)."""
    import torch

    from recstream.contracts.events import PoolCandidate, RankingLog
    from recstream.explore import make_policy
    from recstream.models.repository import load_exported
    from recstream.ope.logged import LoggedRequest
    from recstream.ope.rescoring import PoolRescorer

    rng = np.random.default_rng(seed)
    service.handle(_events(1, seed=seed)[:40])  # the catalog upserts
    service.features.flush()
    live = load_exported(service.settings.model_repo, version=1).net
    rescore = PoolRescorer(live, service.features.vectors)
    policy = make_policy("pl:4")
    out: list = []
    for r in range(n_req):
        items = [f"i{j}" for j in rng.choice(40, 8, replace=False)]
        ctx = service.features.vectors[items[0]]
        context = np.concatenate([ctx, np.zeros_like(ctx)]).round(6).tolist()
        feats = rng.random((8, N_CAND_FEATURES)).round(6)
        draft = RankingLog(
            request_id=f"q{seed}-{r}",
            user_id=f"u{r % 30}",
            model_version="ranker-v1",
            policy_spec="pl:4",
            k=4,
            pool=[PoolCandidate(item_id=i, score=0.0, features=f.tolist()) for i, f in zip(items, feats, strict=True)],
            greedy=[],
            context=context,
        )
        with torch.inference_mode():
            scores = rescore(LoggedRequest(draft, []))
        order = np.argsort(-scores, kind="stable")
        pool = [draft.pool[i].model_copy(update={"score": float(scores[i])}) for i in order]
        rl = draft.model_copy(update={"pool": pool, "greedy": pool[:4]})
        out.append(rl)
        for s in policy.rank([c.item_id for c in pool], -np.arange(8, dtype=np.float64), 4, rng):
            rank = [c.item_id for c in pool].index(s.item_id)
            out.append(rl.outcome(s.item_id, s.position, s.propensity, bool(rng.random() < 0.6 / (1 + rank))))
    return out


def test_off_policy_check_refuses_a_candidate_the_logs_show_worse(service: TrainerService) -> None:
    """The logged pools say a version that reverses the live order loses clicks: refused with the
    paired estimate in the reason. The live version itself passes (difference 0); too few logged
    answers, or none, skip the check instead of deciding on noise."""
    import torch

    from recstream.models.repository import load_exported

    live = load_exported(service.settings.model_repo, version=1).net

    class Reversed(torch.nn.Module):
        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            return -live(*inputs)

    refused, why, stats = service.off_policy_check(Reversed(), live, 1)
    assert not refused and stats == {"ope": "skipped: no logged answers"}
    service.handle(_logged_answers(service, 1500, seed=4))
    assert len(service.logged) == 1500

    from prometheus_client import REGISTRY

    def sample(name: str, **labels: str) -> float:
        return REGISTRY.get_sample_value(name, {"model": "ranker", **labels}) or 0.0

    refused_before = sample("recstream_off_policy_checks_total", result="refused")
    refused, why, stats = service.off_policy_check(Reversed(), live, 1)
    assert refused and stats["ope"] == "refused", stats
    assert sample("recstream_off_policy_checks_total", result="refused") == refused_before + 1
    assert sample("recstream_off_policy_ctr_difference", bound="high") == stats["ope_dr_diff_ci"][1] < 0
    assert why.startswith("off-policy: on 1500 logged answers") and "vs live v1" in why
    assert stats["ope_dr_diff_ci"][1] < 0

    refused, _, stats = service.off_policy_check(live, live, 1)
    assert not refused and stats["ope"] == "passed" and stats["ope_dr_diff"] == pytest.approx(0.0, abs=1e-12)

    service.cfg.ope.min_ess = 1e9
    refused, _, stats = service.off_policy_check(Reversed(), live, 1)
    assert not refused and stats["ope"].startswith("skipped: effective sample size"), stats


def test_examples_learn_from_the_inputs_they_were_served_with(service: TrainerService) -> None:
    """A greedy answer's ranking log (RANKING_LOG=all) carries the ranker's inputs: the trainer's
    examples of that answer are built from exactly those, an answer without a log is rebuilt from
    the catalog, and both kinds are counted. Old logs expire."""
    from logged_answers import greedy_answer_log
    from prometheus_client import REGISTRY

    from services.trainer.examples import ServedInputs

    def count(kind: str) -> float:
        return REGISTRY.get_sample_value("recstream_training_examples_total", {"inputs": kind}) or 0.0

    events = _events(2, seed=5)
    upserts = [ev for ev in events if isinstance(ev, ItemUpsert)]
    examples = [ev for ev in events if isinstance(ev, TrainingExample)]
    first = [ex for ex in examples if ex.request_id == examples[0].request_id]
    rng = np.random.default_rng(5)
    context = np.concatenate([rng.normal(size=ITEM_DIM) / 20, np.zeros(ITEM_DIM)]).round(6)
    log = greedy_answer_log(
        first[0].request_id,
        first[0].user_id,
        [ex.item_id for ex in first],
        rng.random((len(first), N_CAND_FEATURES)),
        context,
        scores=[0.1 * n for n in range(len(first))],
    )
    shown = log.pool
    served_before, rebuilt_before = count("served"), count("rebuilt")
    service.handle([*upserts, log, *examples])
    assert count("served") == served_before + len(first)
    assert count("rebuilt") == rebuilt_before + len(examples) - len(first)
    assert len(service.logged) == 0  # a greedy log cannot enter an off-policy estimate

    got = list(service.buffer.recent)
    ctx, _, feats = service.features.build(got)
    by_item = {c.item_id: c.features for c in shown}
    for n, ex in enumerate(got):
        if ex.request_id == log.request_id:
            np.testing.assert_allclose(ctx[n], context, atol=1e-3)
            np.testing.assert_allclose(feats[n], by_item[ex.item], atol=1e-3)
        else:  # rebuilt: the mean of the context items' vectors, no query half
            assert ex.context is None and np.linalg.norm(ctx[n, :ITEM_DIM]) == pytest.approx(1.0, abs=1e-4)
            assert not ctx[n, ITEM_DIM:].any()

    store = ServedInputs(ttl_s=10.0, capacity=2)
    store.add(log, now=0.0)
    store.add(log.model_copy(update={"request_id": "b"}), now=5.0)
    store.add(log.model_copy(update={"request_id": "c"}), now=12.0)  # evicts the first (age), capacity holds
    assert len(store) == 2 and not store.attach(service.buffer.recent[0])
    # another ranker's inputs (context of another width) would fail every round that samples them
    store.add(log.model_copy(update={"request_id": "d", "context": [0.0] * 10}), now=12.0)
    assert len(store) == 2 and "d" not in store._by_request


def test_a_search_example_without_served_inputs_is_rebuilt_with_its_query(service: TrainerService) -> None:
    """The joiner fills a search's query: the rebuild puts its vector in the context's second half
    and scores retrieval against it (searches are retrieved by the query, not the session)."""
    events = _events(1, seed=6)
    upserts = [ev for ev in events if isinstance(ev, ItemUpsert)]
    examples = [ev for ev in events if isinstance(ev, TrainingExample)]
    search = [ex.model_copy(update={"query": f"{CATS[1]} films"}) for ex in examples]
    service.handle([*upserts, *search])
    got = [ex for ex in service.buffer.recent if ex.request_id == search[0].request_id]
    assert got and all(ex.query == f"{CATS[1]} films" for ex in got)
    ctx, cand, feats = service.features.build(got)
    q = _fake_encode([f"{CATS[1]} films"])[0]
    np.testing.assert_allclose(ctx[:, ITEM_DIM:], np.tile(q, (len(got), 1)), atol=1e-6)
    np.testing.assert_allclose(feats[:, 0], cand @ q, atol=1e-5)
    assert np.linalg.norm(ctx[0, :ITEM_DIM]) == pytest.approx(1.0, abs=1e-4)  # the session half as before
    plain, _, plain_feats = service.features.build([replace(ex, query=None) for ex in got])
    assert not plain[:, ITEM_DIM:].any() and not np.allclose(plain_feats[:, 0], feats[:, 0])


@pytest.mark.slow
def test_search_clicks_train_the_served_query_encoder_into_a_new_version(tmp_path: Path) -> None:
    """Training examples that carry their search's query continue training the served LoRA query
    encoder; a gated winner becomes the next text_encoder version (same search weights), whose
    encoder answers the clicked queries."""
    import shutil

    from recstream.config import REPO_ROOT
    from recstream.contracts.models import ITEM_ENCODER, TEXT_ENCODER
    from recstream.models.encoder import version_text_encoder
    from recstream.models.repository import versions
    from recstream.models.training import read_meta
    from recstream.search.continual import QueryUpdateConfig

    repo = tmp_path / "model_repo"
    for name in (TEXT_ENCODER, ITEM_ENCODER):  # a query adapter is only trained beside a served item encoder
        shutil.copytree(REPO_ROOT / "model_repo" / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    served = max(versions(repo, TEXT_ENCODER))
    settings = Settings(model_repo=repo, run_dir=tmp_path / "run")
    cfg = TrainerConfig(
        search=QueryUpdateConfig(min_clicks=50, min_holdout=10, steps=40, lr=3e-3, batch_size=16),
        search_every_clicks=50,
    )
    service = TrainerService(settings, cfg, CatalogFeatures(model_repo=repo), triton_url="")
    words = ["cats", "dogs", "boats", "trains", "music", "paint"]
    events: list = [ItemUpsert(item_id=f"s{n}", title=f"a film about {w}", category="x") for n, w in enumerate(words)]
    answers = {"pick one": "s3", "pick two": "s5", "choose a thing": "s0"}
    for n, query in enumerate(list(answers) * 30):
        events.append(
            TrainingExample(
                request_id=f"q{n}",
                user_id=f"u{n % 7}",
                item_id=answers[query],
                position=0,
                propensity=1.0,
                model_version=f"text_encoder-v{served}+hybrid",
                clicked=True,
                label=1.0,
                query=query,
                ts_ms=1_000 + n,
            )
        )
    service.handle(events)
    assert len(service.search_clicks) == 90 and service.query_round_due()
    res = service.query_round()
    assert res.accepted and res.version == served + 1, res
    assert res.stats["cand_mrr"] > res.stats["live_mrr"], res.stats
    new_dir = repo / TEXT_ENCODER / str(res.version)
    meta = read_meta(new_dir)
    assert (
        meta.extra["parent_version"] == served
        and meta.extra["search_weights"] == read_meta(repo / TEXT_ENCODER / str(served)).extra["search_weights"]
    )
    assert "search_weights" in (repo / TEXT_ENCODER / "config.pbtxt").read_text()
    encoder = version_text_encoder(new_dir)
    items = np.stack([service.features.vectors[f"s{n}"] for n in range(len(words))])
    best = (encoder.encode(list(answers)) @ items.T).argmax(axis=1)
    assert [f"s{b}" for b in best] == list(answers.values())
    assert not service.query_round_due()  # the clicks were used; the next round waits for new ones


@pytest.mark.kafka
def test_a_malformed_ranking_log_is_dead_lettered_and_learning_goes_on(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """A ranking log whose candidates carry features rows of different widths (valid JSON, a
    schema-valid list each) used to raise out of the trainer's loop before its offsets were
    committed: the trainer stopped, restarted on the same message and stopped again. Real Kafka:
    the log goes to its dead-letter topic with the reason, the examples after it are learned from,
    and the committed offsets move past it."""
    import base64
    import json
    import threading
    import time

    from confluent_kafka import Consumer, TopicPartition
    from logged_answers import greedy_answer_log

    from recstream.client import EventProducer
    from recstream.contracts.topics import dead_letter_topic

    repo = tmp_path / "model_repo"
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    settings = make_settings(model_repo=repo)
    cfg = TrainerConfig(train_every_examples=10**6, train_every_s=10**6, group_id="trainer-malformed")
    service = TrainerService(settings, cfg, CatalogFeatures(encode=_fake_encode), triton_url="")
    events = _events(2, seed=9)
    upserts = [ev for ev in events if isinstance(ev, ItemUpsert)]
    examples = [ev for ev in events if isinstance(ev, TrainingExample)]
    rng = np.random.default_rng(9)
    good = greedy_answer_log("r-ok", "u1", ["i1", "i2"], rng.random((2, N_CAND_FEATURES)), np.zeros(2 * ITEM_DIM))
    ragged = good.model_dump(mode="json")
    ragged["request_id"] = "r-ragged"
    ragged["policy_spec"] = "pl:0.5"  # an exploring answer's log: the off-policy window stacks its rows
    ragged["pool"][1]["features"] = ragged["pool"][1]["features"][:3]
    with EventProducer(settings) as producer:
        producer.send_many("catalog", upserts)
        producer.send_raw(producer.topic_for("ranking-log"), b"u1", json.dumps(ragged).encode())
        producer.send_many("ranking-log", [good])
        producer.send_many("training-examples", examples)

    failures: list[BaseException] = []

    def run() -> None:
        try:
            service.run(max_seconds=120)
        except BaseException as exc:
            failures.append(exc)
            raise

    runner = threading.Thread(target=run)
    runner.start()
    read_from_start = {"bootstrap.servers": settings.kafka_bootstrap, "auto.offset.reset": "earliest"}
    letters = Consumer({**read_from_start, "group.id": "dlq-read"})
    letters.subscribe([dead_letter_topic(producer.topic_for("ranking-log"))])
    got: list[dict] = []
    try:
        deadline = time.monotonic() + 90
        while len(service.buffer) < len(examples) or not got:
            assert not failures, f"the trainer stopped: {failures[0]!r}"
            assert time.monotonic() < deadline, f"{len(service.buffer)} of {len(examples)} learned, {len(got)} letters"
            msg = letters.poll(0.2)
            if msg is not None and not msg.error():
                got.append(json.loads(msg.value()))
    finally:
        service.stop_event.set()
        runner.join(30)
        letters.close()
    assert not runner.is_alive() and not failures, failures
    assert len(got) == 1 and "different widths" in got[0]["error"], got
    assert json.loads(base64.b64decode(got[0]["value_b64"]))["request_id"] == "r-ragged"

    topic = producer.topic_for("ranking-log")
    reader = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": cfg.group_id})
    try:
        partitions = reader.list_topics(topic, timeout=10).topics[topic].partitions
        committed = reader.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        reader.close()
    assert sum(max(tp.offset, 0) for tp in committed) == 2, committed  # past both logs


@pytest.mark.kafka
def test_an_event_the_trainer_cannot_fold_is_dead_lettered_not_fatal(
    service: TrainerService, make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever fails while one event is folded in (here the feature store, on one item) costs that
    event alone: it goes to its dead-letter topic with the reason, the events beside it are learned."""
    import base64
    import json
    import time

    from confluent_kafka import Consumer

    from recstream.client import ConsumedEvent, EventConsumer
    from recstream.contracts.topics import dead_letter_topic
    from recstream.kafka.serde import encode

    settings = make_settings()
    examples = [ev for ev in _events(1, seed=11) if isinstance(ev, TrainingExample)][:2]
    bad, good = examples
    observe = service.features.observe

    def failing_observe(ex):
        if ex.item == bad.item_id:
            raise RuntimeError("feature store refused the item")
        observe(ex)

    monkeypatch.setattr(service.features, "observe", failing_observe)
    source = EventConsumer(settings, ["training-examples"], "fold-test", worker="trainer")
    topic = source.settings.topic_prefix + "training-examples"
    consumed = [ConsumedEvent(topic, 0, n, None, ev, 0, encode(ev)) for n, ev in enumerate(examples)]
    try:
        assert service.fold(consumed, source) == 1
        source.commit()  # delivers the dead letter first
    finally:
        source.close()
    assert [ex.item for ex in service.buffer.recent] == [good.item_id]

    letters = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "r", "auto.offset.reset": "earliest"}
    )
    letters.subscribe([dead_letter_topic(topic)])
    try:
        deadline, msg = time.monotonic() + 20, None
        while msg is None and time.monotonic() < deadline:
            msg = letters.poll(0.5)
    finally:
        letters.close()
    assert msg is not None and not msg.error()
    letter = json.loads(msg.value())
    assert letter["error"] == "RuntimeError: feature store refused the item" and letter["error_type"] == "unusable"
    assert json.loads(base64.b64decode(letter["value_b64"]))["item_id"] == bad.item_id


@pytest.mark.triton
@pytest.mark.timeout(600)
def test_a_version_triton_cannot_load_is_not_recorded_live(tmp_path: Path) -> None:
    """The gate passes a candidate, but its folder is corrupt (truncated weights) and the REAL
    tritonserver refuses to load it. The registry used to say it was live anyway (and the gauge,
    the next round's parent and the rollback target followed); now it stays on what Triton serves."""
    from prometheus_client import REGISTRY

    from infra.triton_server import TritonServer
    from recstream.contracts.models import RANKER

    repo = tmp_path / "model_repo"
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    server = TritonServer(repo, tmp_path / "triton", http_port=0, grpc_port=0, metrics_port=0, models=[RANKER])
    server.start(timeout_s=300)
    try:
        service = _service(tmp_path, triton_url=server.url)
        publish = service.registry.publish

        def publish_corrupt(ranker: object, metrics: dict | None = None) -> int:
            v = publish(ranker, metrics)
            weights = service.registry.model_dir / str(v) / "ranker.safetensors"
            weights.write_bytes(weights.read_bytes()[:100])
            return v

        service.registry.publish = publish_corrupt  # type: ignore[method-assign]
        failed_before = REGISTRY.get_sample_value(
            "recstream_training_runs_total", {"model": RANKER, "result": "load_failed"}
        )
        service.handle(_events(150, seed=1))
        res = service.train_round()
        assert not res.accepted and "did not load in Triton" in res.reason, res
        assert service.registry.live == 1 and service.registry.served() == [1]
        assert service.control is not None and service.control.client.is_model_ready(RANKER, "1")
        failed_after = REGISTRY.get_sample_value(
            "recstream_training_runs_total", {"model": RANKER, "result": "load_failed"}
        )
        assert (failed_after or 0) == (failed_before or 0) + 1
    finally:
        server.stop()


@pytest.mark.kafka
def test_a_restarted_trainer_refills_its_replay_buffer_from_committed_examples(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Real Kafka. A trainer commits examples once they are in its buffer, which lives in memory:
    restarted, it used to start empty (no recent window, no reservoir) and wait for new traffic.
    Now it reads the newest committed examples back, in time order, up to the buffer's capacity,
    without counting them as new (no round falls due) or as clicks for the CTR monitor."""
    import time

    from recstream.client import EventProducer
    from recstream.continual.replay import ReplayConfig

    repo = tmp_path / "model_repo"
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    settings = make_settings(model_repo=repo)
    cfg = TrainerConfig(
        train_every_examples=150,
        train_every_s=10**6,
        min_examples=100,
        holdout=40,
        group_id="trainer-refill",
        replay=ReplayConfig(recent_capacity=60, reservoir_capacity=90),
    )
    events = _events(25, seed=3)  # 200 examples
    upserts = [ev for ev in events if isinstance(ev, ItemUpsert)]
    t0 = int(time.time() * 1000) - 10**6
    examples = [
        ev.model_copy(update={"ts_ms": t0 + 10 * n})
        for n, ev in enumerate(ev for ev in events if isinstance(ev, TrainingExample))
    ]
    first = TrainerService(settings, cfg.model_copy(update={"train_every_examples": 10**6}), triton_url="")
    first.features = CatalogFeatures(encode=_fake_encode)
    with EventProducer(settings) as producer:
        producer.send_many("catalog", upserts)
        producer.send_many("training-examples", examples)
    deadline = time.monotonic() + 60
    while first.buffer.seen < len(examples):
        assert time.monotonic() < deadline, f"{first.buffer.seen} of {len(examples)} consumed"
        first.run(max_seconds=2)  # each run ends after committing what it folded
    assert first.buffer.seen == len(examples)  # a second run() does not refill what it holds
    clicked = sum(e.clicked for e in examples)
    assert first.monitor.counts[1].clicks == clicked  # "ranker-v1": every example counted once

    restarted = TrainerService(settings, cfg, CatalogFeatures(encode=_fake_encode), triton_url="")
    restarted.run(max_seconds=3)
    newest = [(e.request_id, e.item_id) for e in examples[-60:]]
    assert [(ex.request_id, ex.item) for ex in restarted.buffer.recent] == newest
    assert restarted.buffer.seen == 150  # the capacity, newest first; nothing consumed twice
    assert restarted.new_since_round == 0 and not restarted.rounds  # 150 refilled, none due
    assert restarted.monitor.counts[1].clicks == clicked  # the saved counts, not counted again
    assert sum(restarted.features.counts.values()) == sum(e.clicked for e in examples[-150:])


def test_a_rollback_whose_triton_reload_failed_is_reloaded_later(service: TrainerService) -> None:
    """The automatic rollback rewrote the registry, but Triton's load_model failed (busy, or
    restarting): the bad version kept answering until Triton's next start. The reload is now
    retried until it succeeds, and not after."""
    service.handle(_events(150, seed=1))
    assert service.train_round().accepted and service.registry.served() == [1, 2]

    class Control:
        def __init__(self) -> None:
            self.calls, self.fail = 0, True

        def reload(self) -> None:
            self.calls += 1
            if self.fail:
                raise ConnectionError("Triton busy")

    control = Control()
    service.control, service.triton_url = control, "http://triton:8000"  # type: ignore[assignment]
    assert service.rollback("ctr dropped") == 1 and control.calls == 1
    assert service.reload_due_at is not None
    assert not service.retry_reload(now=service.reload_due_at - 1) and control.calls == 1  # not yet due
    assert not service.retry_reload(now=service.reload_due_at + 1) and control.calls == 2  # still failing
    control.fail = False
    assert service.retry_reload(now=service.reload_due_at + 1) and control.calls == 3
    assert service.reload_due_at is None
    assert not service.retry_reload(now=1e12) and control.calls == 3  # loaded: nothing more to do


@pytest.mark.kafka
def test_a_restarted_trainer_waits_for_the_catalog_before_its_first_round(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Real Kafka. A backlog of examples and a larger catalogue: the examples consumer takes
    1,000 a loop, the catalog consumer 500, so a round fell due after two loops, with most items
    still without a vector (the candidate trained on zeros for them, and the gate scored both
    models on the same broken inputs). The first round now runs with the whole catalogue read."""
    from recstream.client import EventProducer

    repo = tmp_path / "model_repo"
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    settings = make_settings(model_repo=repo)
    cfg = TrainerConfig(
        train_every_examples=1000,
        train_every_s=10**6,
        min_examples=600,
        holdout=400,
        group_id="trainer-catalog-first",
        learner=LearnerConfig(steps=10),
        gate=GateConfig(min_examples=200),
    )
    events = _events(150, seed=1)
    fillers = [
        ItemUpsert(item_id=f"f{n}", title=f"{CATS[n % 4]} filler {n}", category=CATS[n % 4]) for n in range(4000)
    ]
    with EventProducer(settings) as producer:
        producer.send_many("catalog", fillers + [ev for ev in events if isinstance(ev, ItemUpsert)])
        producer.send_many("training-examples", [ev for ev in events if isinstance(ev, TrainingExample)])
    service = TrainerService(settings, cfg, CatalogFeatures(encode=_fake_encode), triton_url="")
    known_at_round: list[int] = []
    train_round = service.train_round

    def recording_round():
        known_at_round.append(len(service.features.categories))
        service.stop_event.set()
        return train_round()

    service.train_round = recording_round  # type: ignore[method-assign]
    service.run(max_seconds=60)
    assert known_at_round == [len(fillers) + 40], known_at_round


@pytest.mark.kafka
def test_a_restarted_trainer_gets_back_the_inputs_its_examples_were_served_with(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    """Real Kafka. The refill read only the examples back, so every refilled example was rebuilt
    from the catalogue; so was every example of an answer logged just before the restart whose
    feedback window closed after it. Now the committed tail of the ranking log comes back too."""
    import time

    from logged_answers import greedy_answer_log

    from recstream.client import EventProducer

    repo = tmp_path / "model_repo"
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    settings = make_settings(model_repo=repo)
    cfg = TrainerConfig(train_every_examples=10**6, train_every_s=10**6, group_id="trainer-refill-inputs")
    events = _events(12, seed=4)
    upserts = [ev for ev in events if isinstance(ev, ItemUpsert)]
    t0 = int(time.time() * 1000) - 60_000
    examples = [
        ev.model_copy(update={"ts_ms": t0 + 10 * n})
        for n, ev in enumerate(ev for ev in events if isinstance(ev, TrainingExample))
    ]
    rng = np.random.default_rng(4)
    by_request: dict[str, list[TrainingExample]] = {}
    for ex in examples:
        by_request.setdefault(ex.request_id, []).append(ex)
    logs = {
        rid: greedy_answer_log(
            rid,
            exs[0].user_id,
            [ex.item_id for ex in exs],
            rng.random((len(exs), N_CAND_FEATURES)),
            np.concatenate([rng.normal(size=ITEM_DIM) / 20, np.zeros(ITEM_DIM)]),
        ).model_copy(update={"ts_ms": exs[0].ts_ms})
        for rid, exs in by_request.items()
    }
    pending = sorted(by_request)[-2:]  # answered before the restart, their examples come after it
    with EventProducer(settings) as producer:
        producer.send_many("catalog", upserts)
        producer.send_many("ranking-log", list(logs.values()))
        producer.send_many("training-examples", [ex for ex in examples if ex.request_id not in pending])
    first = TrainerService(settings, cfg, CatalogFeatures(encode=_fake_encode), triton_url="")
    want = len(examples) - sum(len(by_request[r]) for r in pending)
    deadline = time.monotonic() + 60
    while first.buffer.seen < want or len(first.served) < len(logs):
        assert time.monotonic() < deadline, f"{first.buffer.seen} of {want} examples consumed"
        first.run(max_seconds=2)

    restarted = TrainerService(settings, cfg, CatalogFeatures(encode=_fake_encode), triton_url="")
    assert restarted.refill() == want
    assert all(ex.context is not None for ex in restarted.buffer.recent)  # all rebuilt before
    with EventProducer(settings) as producer:
        producer.send_many("training-examples", [ex for ex in examples if ex.request_id in pending])
    deadline = time.monotonic() + 60
    while restarted.buffer.seen < len(examples):
        assert time.monotonic() < deadline
        restarted.run(max_seconds=2)
    late = [ex for ex in restarted.buffer.recent if ex.request_id in pending]
    assert late and all(ex.context is not None for ex in late)


def test_a_round_that_cannot_read_the_live_version_or_publish_fails_without_stopping(
    service: TrainerService,
) -> None:
    """A live version folder that cannot be read, and a publish that loses its version number to a
    concurrent export, raised out of the round and stopped the trainer (which restarted into the
    same failure). Each now ends the round as failed; the next one can succeed."""
    service.handle(_events(150, seed=1))
    weights = service.registry.model_dir / "1" / "ranker.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:100])
    res = service.train_round()
    assert not res.accepted and res.reason.startswith("failed"), res
    weights.write_bytes(intact)
    publish = service.registry.publish

    def taken(*args, **kwargs):
        raise FileExistsError("model_repo/ranker/2 exists")

    service.registry.publish = taken  # type: ignore[method-assign]
    service.handle(_events(150, seed=2))
    res = service.train_round()
    assert not res.accepted and "not published" in res.reason and service.registry.live == 1
    service.registry.publish = publish  # type: ignore[method-assign]
    service.handle(_events(150, seed=3))
    assert service.train_round().accepted and service.registry.live == 2

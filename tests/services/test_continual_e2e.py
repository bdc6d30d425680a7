"""End to end through the REAL broker and the REAL tritonserver: a burst of clicks on the
training-examples topic -> the trainer service fine-tunes, gates, writes v2 and loads it in Triton,
while a stream of ranker requests across the switch sees zero errors and then version 2."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from infra.triton_server import TritonServer
from recstream.config import Settings
from recstream.continual import GateConfig, LearnerConfig
from recstream.contracts.events import ItemUpsert, TrainingExample
from recstream.contracts.models import RANKER
from recstream.models.export import export_ranker
from recstream.models.ranker import CONTEXT_DIM, ITEM_DIM, N_CAND_FEATURES, RankerConfig, new_ranker
from recstream.recommend.scoring import Candidate, RankContext
from services.trainer import CatalogFeatures, TrainerConfig, TrainerService
from streams.rankers import TritonRanker

CATS = ["scifi", "romance", "horror", "comedy"]
TITLES = {
    "scifi": "space ship alien planet galaxy",
    "romance": "love story wedding heart kiss",
    "horror": "ghost haunted house blood scream",
    "comedy": "funny jokes laugh party prank",
}


@pytest.mark.timeout(600)
def test_click_burst_goes_live_in_triton_without_failed_requests(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    import tritonclient.http as httpclient

    from recstream.client import EventProducer

    repo = tmp_path / "model_repo"
    export_ranker(new_ranker(RankerConfig(seed=0)), repo, version=1)
    server = TritonServer(repo, tmp_path / "triton", http_port=0, grpc_port=0, metrics_port=0, models=[RANKER]).start(
        timeout_s=300
    )
    settings = make_settings(model_repo=repo, triton_url=server.url)
    cfg = TrainerConfig(
        train_every_examples=1200,
        train_every_s=3600,
        min_examples=800,
        holdout=400,
        learner=LearnerConfig(steps=80),
        # The untrained v1 already ranks these synthetic clicks well through its category-affinity
        # feature (holdout AUC ~0.90), so one round's candidate lands within noise of it and the
        # arrival order decides. This test is about the live switch; the gate's strictness (a
        # shuffled-labels candidate refused) is tested in test_continual_service.py.
        gate=GateConfig(min_examples=200, tolerance=0.05),
    )
    svc = TrainerService(settings, cfg, CatalogFeatures())
    trainer = threading.Thread(target=svc.run, kwargs={"max_seconds": 400}, daemon=True)

    stop = threading.Event()
    seen: list[tuple[float, str]] = []
    errors: list[str] = []

    def request_stream() -> None:
        client = httpclient.InferenceServerClient(url=server.url, network_timeout=30)
        rng = np.random.default_rng(0)
        while not stop.is_set():
            arrays = {
                "CONTEXT": rng.normal(size=(1, CONTEXT_DIM)).astype(np.float32),
                "CANDIDATES": rng.normal(size=(1, 8, ITEM_DIM)).astype(np.float32),
                "CAND_FEATURES": rng.random((1, 8, N_CAND_FEATURES)).astype(np.float32),
            }
            inputs = []
            for k, a in arrays.items():
                inp = httpclient.InferInput(k, list(a.shape), "FP32")
                inp.set_data_from_numpy(a)
                inputs.append(inp)
            try:
                res = client.infer(RANKER, inputs)
                seen.append((time.monotonic(), str(res.get_response()["model_version"])))
            except Exception as exc:
                errors.append(repr(exc))
            time.sleep(0.01)
        client.close()

    streamer = threading.Thread(target=request_stream, daemon=True)
    try:
        streamer.start()
        trainer.start()
        rng = np.random.default_rng(1)
        items = [(f"m{n}", CATS[n % 4]) for n in range(40)]
        with EventProducer(settings) as producer:
            producer.send_many(
                "catalog",
                [ItemUpsert(item_id=i, title=f"{TITLES[c]} {n}", category=c) for n, (i, c) in enumerate(items)],
            )
            producer.flush()
            burst = []
            for r in range(150):
                fav = CATS[r % 2]  # half the users like scifi, half romance
                ctx = [i for i, c in items if c == fav][:3]
                shown = rng.choice(len(items), 10, replace=False)
                for pos, j in enumerate(shown):
                    item, cat = items[j]
                    p = (0.7 if cat == fav else 0.03) / (1 + pos) ** 0.5
                    clicked = bool(rng.random() < p)
                    burst.append(
                        TrainingExample(
                            request_id=f"r{r}",
                            user_id=f"u{r % 30}",
                            item_id=item,
                            position=pos,
                            propensity=1.0,
                            model_version="ranker-v1",
                            clicked=clicked,
                            label=float(clicked),
                            context_items=ctx,
                        )
                    )
            # The first 20 answers were logged with the inputs they were scored from (RANKING_LOG=all,
            # written at answer time, before their outcomes): their examples must use exactly those.
            logged = [ex for ex in burst if int(ex.request_id[1:]) < 20]
            producer.send_many("ranking-log", _ranking_logs(logged, items))
            producer.flush()
            deadline = time.monotonic() + 60  # in production outcomes come a feedback window later
            while len(svc.served) < 20:
                assert time.monotonic() < deadline, "the trainer did not consume the ranking logs"
                time.sleep(0.1)
            served_before, rebuilt_before = _inputs_count("served"), _inputs_count("rebuilt")
            producer.send_many("training-examples", burst)
            producer.flush()
        t_burst = time.monotonic()
        deadline = t_burst + 300
        while time.monotonic() < deadline and not any(v == "2" for _, v in seen):
            time.sleep(0.1)
        click_to_live = time.monotonic() - t_burst
        time.sleep(1.0)
        # The stream recommender's ranker reports the version of each Triton response, so answers
        # scored after the promotion say so (its version is not a value read once at start-up).
        ranker = TritonRanker(settings.model_copy(update={"triton_grpc_url": server.grpc_url}))
        unit = np.full(ITEM_DIM, ITEM_DIM**-0.5, np.float32)
        candidates = [Candidate(f"m{n}", 0.5, unit, CATS[n % 4], {}, 1.0) for n in range(5)]
        scores, served_by = ranker.score_versioned(RankContext(recent_categories=["scifi"]), candidates, 10.0)
    finally:
        stop.set()
        svc.stop_event.set()
        streamer.join(timeout=30)
        trainer.join(timeout=60)
        server.stop()
    rounds = [(r.accepted, r.reason) for r in svc.rounds]
    assert svc.registry.live == 2, rounds
    assert svc.registry.served() == [1, 2]
    assert not errors, errors[:5]
    versions = Counter(v for _, v in seen)
    assert versions["1"] > 0 and versions["2"] > 0, versions
    last = [v for _, v in seen[-20:]]
    assert set(last) == {"2"}
    assert click_to_live < 60, (click_to_live, rounds)
    assert served_by == "ranker-v2" and scores.shape == (5,)
    assert _inputs_count("served") - served_before == len(logged) == 200
    assert _inputs_count("rebuilt") - rebuilt_before == len(burst) - len(logged)
    print(f"click-to-live {click_to_live:.1f}s; rounds {rounds}; requests {len(seen)} {dict(versions)}")


def _inputs_count(kind: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("recstream_training_examples_total", {"inputs": kind}) or 0.0


def _ranking_logs(examples: list[TrainingExample], items: list[tuple[str, str]]) -> list:
    """Greedy answers' ranking logs as the worker writes them with RANKING_LOG=all. The inputs are
    what the catalog rebuild gives (so the round trains on the same signal)."""
    from logged_answers import greedy_answer_log

    from services.trainer.examples import example_from_event

    features = CatalogFeatures()
    for n, (i, c) in enumerate(items):
        features.upsert(ItemUpsert(item_id=i, title=f"{TITLES[c]} {n}", category=c))
    by_request: dict[str, list[TrainingExample]] = {}
    for ex in examples:
        by_request.setdefault(ex.request_id, []).append(ex)
    logs = []
    for rid, shown in by_request.items():
        ctx, _, feats = features.build([example_from_event(ex) for ex in shown])
        logs.append(greedy_answer_log(rid, shown[0].user_id, [ex.item_id for ex in shown], feats, ctx[0]))
    return logs

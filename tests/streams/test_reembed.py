"""A new item-encoder version goes live: the worker re-embeds the catalog into a new collection and
switches over while requests keep being answered, none failed or empty.

Real Kafka, a real tritonserver over a temporary copy of the committed models (so a version can be
added), and the worker as a child process with every agent.
"""

from __future__ import annotations

import shutil
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from recstream.client import EventProducer, RecommendationClient
from recstream.config import REPO_ROOT, Settings
from recstream.contracts.events import BehaviourEvent, RecommendationRequest
from recstream.contracts.models import ITEM_ENCODER, SESSION_ENCODER
from recstream.data.datasets import load_dataset
from recstream.data.events import catalog_events
from recstream.models.served import ItemEncoder, SessionEncoder
from recstream.models.training import CheckpointMeta
from streams.process import WorkerProcess

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

N_ITEMS = 60


def test_a_new_item_encoder_version_is_switched_in_without_a_failed_answer(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    from infra.triton_server import TritonServer
    from recstream.continual.registry import TritonModelControl
    from recstream.contracts.models import TEXT_ENCODER
    from recstream.kafka.admin import ensure_topics
    from recstream.models.encoder import TextEncoder, version_text_encoder
    from recstream.models.export import export_item_encoder, export_session_encoder
    from recstream.models.repository import latest_version_dir

    repo = tmp_path / "model_repo"
    for name in ("text_encoder", ITEM_ENCODER, SESSION_ENCODER, "ranker"):
        shutil.copytree(REPO_ROOT / "model_repo" / name, repo / name)
    triton = TritonServer(repo, tmp_path / "triton", http_port=0, grpc_port=0, metrics_port=0).start(timeout_s=180)
    worker = None
    try:
        settings = Settings(
            kafka_bootstrap=kafka_bootstrap,
            topic_prefix=f"r{uuid.uuid4().hex[:8]}.",
            qdrant_path=tmp_path / "qdrant",
            run_dir=tmp_path / "run",
            triton_url=triton.url,
            triton_grpc_url=triton.grpc_url,
            triton_timeout_s=5.0,
        )
        ensure_topics(settings)
        worker = WorkerProcess(settings, tmp_path / "worker.log", ["--ranker", "triton"]).start(ready_timeout_s=180)
        items = catalog_events(load_dataset("ml-100k").items.head(N_ITEMS))
        user = "reembed-user"
        with EventProducer(settings) as p:
            p.send_many("catalog", items)
            deadline = time.monotonic() + 120
            while worker.metric("recstream_indexed_items") < N_ITEMS:
                assert time.monotonic() < deadline, worker.tail()
                time.sleep(0.3)
            p.send_many("behaviour", [BehaviourEvent(type="click", user_id=user, item_id=i.item_id) for i in items[:3]])

        answers: list[tuple[float, object]] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def ask() -> None:
            with RecommendationClient(settings) as client:
                while not stop.is_set():
                    for req in (
                        RecommendationRequest(user_id=user, k=5),
                        RecommendationRequest(user_id=user, kind="search", query=items[10].title, k=5),
                    ):
                        try:
                            answers.append((time.monotonic(), client.request(req, timeout_s=15)))
                        except BaseException as exc:  # a lost or late answer fails the test below
                            errors.append(exc)
                    time.sleep(0.05)

        asker = threading.Thread(target=ask, daemon=True)
        asker.start()
        time.sleep(2)
        # version 2 of both encoders: a new item encoder (no learned residuals: every vector its
        # text alone, easy to tell apart) and the session encoder trained with it
        old = ItemEncoder.load(repo / ITEM_ENCODER / "1")
        meta = CheckpointMeta.model_validate_json((repo / ITEM_ENCODER / "1" / "meta.json").read_text())
        new = ItemEncoder(np.zeros_like(old.residual), list(old.row_of), old.max_text_len)
        export_item_encoder(new, meta.model_copy(deep=True), repo, version=2)
        session = SessionEncoder.load(repo / SESSION_ENCODER / "1")
        smeta = CheckpointMeta.model_validate_json((repo / SESSION_ENCODER / "1" / "meta.json").read_text())
        export_session_encoder(session, smeta, repo, version=2)
        for name in (SESSION_ENCODER, ITEM_ENCODER):
            control = TritonModelControl(triton.url, name)
            control.reload()
            control.wait_live(2)
            control.close()
        switched_at = time.monotonic()
        deadline = switched_at + 90
        while worker.metric("recstream_catalog_reembeds_total") < 1:
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.3)
        time.sleep(2)
        stop.set()
        asker.join(30)
    finally:
        if worker is not None:
            worker.stop()
        triton.stop()
    assert not errors, errors[:3]
    assert len(answers) > 20
    for _, res in answers:
        assert len(res.items) == 5, res  # never an empty or short answer while switching
    # after the switch the vectors are version 2's (text alone): a search scores its hit by text
    query = items[10].title
    last = [res for t, res in answers if res.kind == "search" and t > switched_at][-1]
    hit = next(i for i in last.items if i.item_id == items[10].item_id)
    text = TextEncoder(max_seq_length=old.max_text_len).encode([items[10].text()])[0]
    q = version_text_encoder(latest_version_dir(repo, TEXT_ENCODER)).encode([query])[0]  # what Triton serves
    assert hit.retrieval_score == pytest.approx(float(q @ text), abs=2e-3)
    first = next(res for _, res in answers if res.kind == "search")
    before = next(i for i in first.items if i.item_id == items[10].item_id)
    assert abs(before.retrieval_score - hit.retrieval_score) > 0.005, "the first answers already had v2 vectors"

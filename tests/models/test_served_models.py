"""The trained models as served: Triton's item and session encoders and sequence model equal the in-process classes,
and the committed versions carry what serving and operators need.

Through the REAL tritonserver over the committed model_repo (session fixture); no skips.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from recstream.config import REPO_ROOT
from recstream.contracts.models import ITEM_ENCODER, SEQUENCE_SCORER, SESSION_ENCODER, TRAINED_MODELS
from recstream.models.repository import versions
from recstream.models.sequence import SequenceScorer
from recstream.models.served import ItemEncoder, SessionEncoder

pytestmark = pytest.mark.triton

REPO = REPO_ROOT / "model_repo"


def _latest(name: str):
    vs = versions(REPO, name)
    assert vs, f"no committed version of {name}"
    return REPO / name / str(vs[-1])


def test_committed_versions_describe_their_training():
    for name in TRAINED_MODELS:
        vdir = _latest(name)
        meta = json.loads((vdir / "meta.json").read_text())
        assert meta["data_hash"] and meta["git_sha"] and meta["config"]
        m = meta["metrics"]
        assert meta["extra"]["dataset"] == "ml-100k"
        assert 0.05 < m["retrieval_valid_ndcg10"] < 0.5 and 0.05 < m["ranker_valid_ndcg10"] < 0.5
        assert m["train_peak_rss_mb"] > 0 and m["retrieval_train_seconds"] > 0 and m["ranker_train_seconds"] > 0
        size = sum(p.stat().st_size for p in vdir.rglob("*") if p.is_file())
        assert size < 5 * 1024 * 1024, (name, size)


def test_item_encoder_on_triton_equals_in_process(triton_server):
    from recstream.models.encoder import TextEncoder
    from recstream.serving.triton_client import TritonEncoderClient

    local = ItemEncoder.load(_latest(ITEM_ENCODER))
    known = sorted(local.row_of, key=local.row_of.__getitem__)[:3]
    texts = [
        "Toy Story (1995) | Animation | Animation Children's Comedy",
        "GoldenEye (1995) | Action",
        "x",
        "a new film",
    ]
    ids = [*known, "never-seen-item-42"]
    with TritonEncoderClient(triton_server.grpc_url, model_name=ITEM_ENCODER, timeout_s=30) as client:
        served = client.encode_texts(texts, item_ids=ids)
    want = local.encode(texts, ids)
    np.testing.assert_allclose(served, want, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(served, axis=1), 1.0, atol=1e-5)
    text_only = TextEncoder(max_seq_length=local.max_text_len).encode(texts)
    # known items get their learned residual on top of the text vector; an item the model never saw
    # one borrowed from the known items nearest in text (the committed version carries their vectors)
    assert local.known_text is not None and local.cold_rule.neighbours > 0
    assert (np.sum(served * text_only, axis=1) < 0.999).all()
    mixed = text_only[3] + local.borrowed_residual(text_only[3:])[0]
    np.testing.assert_allclose(served[3], mixed / np.linalg.norm(mixed), atol=1e-4)


def test_session_encoder_on_triton_equals_in_process(triton_server, make_settings):
    from streams.inference import TritonSessionEncoder

    local = SessionEncoder.load(_latest(SESSION_ENCODER))
    rng = np.random.default_rng(0)
    histories = []
    for n in (1, 3, 17, local.max_history + 9):  # the longest is cut to the newest max_history
        h = rng.standard_normal((n, 384)).astype(np.float32)
        histories.append(h / np.linalg.norm(h, axis=1, keepdims=True))
    remote = TritonSessionEncoder(make_settings(triton_grpc_url=triton_server.grpc_url))
    assert remote.max_history == local.max_history and remote.version.startswith("session_encoder-v")
    got = remote.encode(histories, timeout_s=30)
    np.testing.assert_allclose(got, local.encode(histories), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # one session alone gives what it gave in the batch (padding changes nothing)
    np.testing.assert_allclose(remote.encode(histories[1:2], timeout_s=30)[0], got[1], atol=1e-4)
    # the order of a session's items matters (a sequence model, not a bag)
    assert not np.allclose(remote.encode([histories[2][::-1]], timeout_s=30)[0], got[2], atol=1e-3)


def test_sequence_scorer_on_triton_equals_in_process(triton_server, make_settings):
    from streams.inference import TritonSequenceScorer

    local = SequenceScorer.load(_latest(SEQUENCE_SCORER))
    remote = TritonSequenceScorer(make_settings(triton_grpc_url=triton_server.grpc_url, model_repo=REPO))
    assert remote.version == f"{SEQUENCE_SCORER}-v{_latest(SEQUENCE_SCORER).name}"
    assert remote.fusion == local.fusion and remote.max_history == local.max_len
    ids = local.item_ids
    recent = [ids[:3], [ids[7]], ["never-seen-item", ids[3], ids[5]], ids[100 : 100 + local.max_len + 9], ["nope"]]
    got = remote.score(recent, timeout_s=30)
    assert got.scores.shape == (len(recent), len(ids)) and got.ids == ids
    # unknown ids are left out of the history; the longest is cut to the newest max_len
    rows = [np.array([local.row_of[i] for i in r if i in local.row_of], dtype=np.int64) for r in recent]
    np.testing.assert_allclose(got.scores, local.score_index(rows), atol=1e-4)
    assert np.isnan(got.scores[-1]).all()  # nothing known to go on: no opinion
    assert np.isfinite(got.scores[0]).sum() > 0.9 * len(ids)
    # one session alone gives what it gave in the batch
    np.testing.assert_allclose(remote.score(recent[1:2], timeout_s=30).scores[0], got.scores[1], atol=1e-4)
    np.testing.assert_allclose(got.of(0, [ids[9], "nope"])[0], got.scores[0, 9])
    assert np.isnan(got.of(0, [ids[9], "nope"])[1])


def test_models_list_shows_every_served_model():
    from typer.testing import CliRunner

    from recstream.ops.cli import app

    out = CliRunner().invoke(app, ["models", "list"])
    assert out.exit_code == 0, out.output
    listed = {m["model"]: m for m in json.loads(out.output)}
    assert set(listed) == set(TRAINED_MODELS)
    for m in listed.values():
        described = next(iter(m["versions"].values()))
        assert described["dataset"] == "ml-100k" and described["retrieval_valid_ndcg10"] > 0.05

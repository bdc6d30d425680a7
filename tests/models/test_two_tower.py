"""Two-tower retrieval: learns on tiny data, LoRA trains adapters only, checkpoints round-trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recstream.data.datasets import tiny_synthetic
from recstream.data.split import leave_last_out
from recstream.eval.metrics import metrics_from_ranks, target_ranks
from recstream.models.training import CheckpointMeta, EarlyStopping, data_hash, library_versions
from recstream.models.two_tower import ItemTower, SessionTower, TwoTowerConfig, TwoTowerModel
from recstream.training.two_tower import evaluate_retrieval, train_two_tower

TINY = dict(max_history=10, d_model=32, n_heads=2, batch_size=16, fresh_items_per_step=16, max_text_len=16)


@pytest.fixture(scope="module")
def split():
    return leave_last_out(tiny_synthetic())


@pytest.fixture(scope="module")
def trained(split):
    cats = split.data.items.set_index("item_id").loc[split.item_ids, "category"].tolist()
    cfg = TwoTowerConfig(finetune="lora", epochs=4, patience=4, lr_session=3e-3, eval_untrained=True, **TINY)
    valid = split.cases("valid")
    model, stats = train_two_tower(
        cfg,
        split.train_seqs,
        split.item_texts,
        valid.histories,
        valid.targets,
        cats,
        progress=False,
        item_ids=split.item_ids,
    )
    return model, stats


def test_two_tower_beats_random(split, trained):
    model, stats = trained
    test = split.cases("test")
    got = evaluate_retrieval(model, test.histories, test.targets)["NDCG@10"]
    rng = np.random.default_rng(0)
    rand = np.mean(
        [
            metrics_from_ranks(target_ranks(rng.random((len(test), split.n_items)), test.targets, test.histories))[
                "NDCG@10"
            ]
            for _ in range(20)
        ]
    )
    assert got > rand + 0.05, (got, rand, stats)
    assert stats["valid_ndcg10"] >= stats["valid_ndcg10_untrained"]


def test_item_vectors_unit_and_cold_start(trained):
    model, _ = trained
    v = model.embed_items(["Item 0 | alpha", "A brand-new item nobody has seen | beta"])
    assert v.shape == (2, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # a known item gets its ID residual, an unknown id (new item) the pure text vector
    known = model.item_ids[int(np.flatnonzero(model.has_id.numpy())[0])]
    both = model.embed_items(["Item 0 | alpha", "Item 0 | alpha"], item_ids=[known, "never-seen"])
    np.testing.assert_allclose(both[1], v[0], atol=1e-6)
    assert not np.allclose(both[0], v[0], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(both, axis=1), 1.0, atol=1e-5)
    s = model.embed_session(v[:1], query=model.embed_query("beta"))
    assert s.shape == (384,)
    assert abs(float(np.linalg.norm(s)) - 1.0) < 1e-5


def test_lora_trains_only_adapters():
    cfg = TwoTowerConfig(finetune="lora", lora_r=4, **TINY)
    tower = ItemTower(cfg)
    trainable = [(n, p) for n, p in tower.encoder.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    n_layers = tower.encoder.base_model.model.config.num_hidden_layers
    # A [r, 384] + B [384, r] for query and value in every layer
    expected = n_layers * 2 * (4 * 384 + 384 * 4)
    assert sum(p.numel() for _, p in trainable) == expected
    total = sum(p.numel() for p in tower.encoder.parameters())
    assert expected < 0.01 * total

    full = ItemTower(TwoTowerConfig(finetune="full", **TINY))
    assert all(p.requires_grad for p in full.encoder.parameters())
    frozen = ItemTower(TwoTowerConfig(finetune="frozen", **TINY))
    assert not any(p.requires_grad for p in frozen.encoder.parameters())


def test_session_tower_is_causal_and_padding_invariant():
    torch.manual_seed(0)
    tower = SessionTower(TwoTowerConfig(**TINY)).eval()
    x = torch.randn(2, 6, 384)
    valid = torch.ones(2, 6, dtype=torch.bool)
    valid[0, :3] = False
    x = x * valid[..., None]
    out = tower(x, valid)
    assert torch.isfinite(out).all()
    alone = tower(x[:1, 3:], valid[:1, 3:])
    torch.testing.assert_close(out[0, -1], alone[0, -1], atol=1e-5, rtol=1e-5)
    # changing a later item must not change an earlier position (causal)
    y = x.clone()
    y[1, -1] += 1.0
    torch.testing.assert_close(tower(y, valid)[1, :-1], out[1, :-1])


def test_checkpoint_round_trip(tmp_path: Path, split, trained):
    model, stats = trained
    meta = CheckpointMeta(
        kind="two_tower",
        config=model.cfg.model_dump(),
        data_hash=data_hash(split.train[["user_idx", "item_idx", "ts"]]),
        metrics={"valid_ndcg10": stats["valid_ndcg10"]},
    )
    model.save(tmp_path / "ckpt", meta)
    assert (tmp_path / "ckpt" / "item_adapter.safetensors").exists()
    assert not (tmp_path / "ckpt" / "item_encoder.safetensors").exists()  # LoRA: adapters only
    loaded, meta2 = TwoTowerModel.load(tmp_path / "ckpt")
    assert loaded.item_ids == model.item_ids and bool((loaded.has_id == model.has_id).all())
    assert meta2.data_hash == meta.data_hash and meta2.config == meta.config
    assert meta2.metrics == meta.metrics and meta2.git_sha == meta.git_sha
    assert meta2.library_versions == library_versions()
    texts = ["Item 3 | alpha", "Item 7 | delta"]
    np.testing.assert_allclose(loaded.embed_items(texts), model.embed_items(texts), atol=1e-6)
    hist = [split.train_seqs[0], split.train_seqs[1]]
    np.testing.assert_allclose(loaded.score_index(hist), model.score_index(hist), atol=1e-5)


def test_exported_item_encoder_serves_same_vectors(tmp_path: Path, trained):
    from recstream.models.encoder import TextEncoder

    model, _ = trained
    out = model.export_item_encoder(tmp_path / "enc")
    texts = ["Item 3 | alpha", "Something longer about a film | gamma"]
    served = TextEncoder(out).encode(texts)
    np.testing.assert_allclose(served, model.embed_items(texts), atol=1e-5)


def test_early_stopping():
    es = EarlyStopping(patience=2)
    assert es.step(0.1, 1) and es.step(0.2, 2)
    assert not es.step(0.15, 3) and not es.should_stop
    assert not es.step(0.19, 4) and es.should_stop
    assert es.best == 0.2 and es.best_step == 2

"""The trainer's rebuilt features know only what serving knew: no label leaks through them."""

from __future__ import annotations

import numpy as np

from recstream.continual import Example
from recstream.continual.gate import weighted_auc
from recstream.contracts.events import ItemUpsert
from recstream.models.ranker import ITEM_DIM
from services.trainer import CatalogFeatures


def _encode(texts: list[str]) -> np.ndarray:
    rng = np.random.default_rng(len(texts))
    v = rng.normal(size=(len(texts), ITEM_DIM))
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_rebuilt_popularity_holds_no_label() -> None:
    """Clicks at 5 % whatever the item: the popularity feature of a rebuilt example (the count
    before its own click) cannot tell clicked from ignored. Built from the counts at round time,
    every clicked item had a count of at least 1, and the feature alone scored an AUC of about 0.8."""
    rng = np.random.default_rng(0)
    features = CatalogFeatures(encode=_encode)
    n_items = 1500
    for i in range(n_items):
        features.upsert(ItemUpsert(item_id=f"i{i}", title=f"item {i}", category="c"))
    items, clicked = rng.integers(n_items, size=20_000), rng.random(20_000) < 0.05
    examples = [
        Example(user=f"u{n}", item=f"i{i}", position=0, propensity=1.0, label=float(c))
        for n, (i, c) in enumerate(zip(items, clicked, strict=True))
    ]
    for ex in examples:
        features.observe(ex)
    _, _, feats = features.build(examples)
    labels = np.array([ex.label for ex in examples])
    auc = weighted_auc(feats[:, 1], labels, np.ones(len(examples)))
    assert abs(auc - 0.5) < 0.05, auc

    first, second = (Example(user="u", item="i7", position=0, propensity=1.0, label=1.0) for _ in range(2))
    before = features.counts.get("i7", 0.0)
    features.observe(first)
    features.observe(second)
    _, _, rows = features.build([first, second])
    assert first.counts_before[0] == before and second.counts_before[0] == before + 1
    assert rows[1, 1] > rows[0, 1]  # the later example saw one click more


def test_item_vectors_follow_a_new_item_encoder_version(tmp_path) -> None:
    """`make train` adds item_encoder v2 while the trainer runs: the workers re-embed the catalogue
    with it, so the trainer's vectors must move too, all of them (it kept v1's for every item it had
    already seen and gave only new upserts v2's, mixing two spaces in one round)."""
    from recstream.contracts.models import ITEM_ENCODER
    from recstream.models.export import export_item_encoder
    from recstream.models.served import ItemEncoder
    from recstream.models.training import CheckpointMeta

    ids = ["a", "b", "c"]
    meta = CheckpointMeta(kind=ITEM_ENCODER, config={}, data_hash="test")
    rng = np.random.default_rng(0)
    v1 = ItemEncoder(rng.normal(size=(3, ITEM_DIM)).astype(np.float32), ids, max_text_len=32)
    export_item_encoder(v1, meta, tmp_path, version=1)
    features = CatalogFeatures(model_repo=tmp_path)
    upserts = {i: ItemUpsert(item_id=i, title=f"film {i}", category="c") for i in [*ids, "d"]}
    for i in ids:
        features.upsert(upserts[i])
    features.build([])
    texts = [upserts[i].text() for i in ids]
    np.testing.assert_allclose(np.stack([features.vectors[i] for i in ids]), v1.encode(texts, ids), atol=1e-5)
    v2 = ItemEncoder(np.zeros((3, ITEM_DIM), np.float32), ids, max_text_len=32)
    export_item_encoder(v2, meta, tmp_path, version=2)
    features.upsert(upserts["d"])
    features.build([])
    every = [*ids, "d"]
    want = v2.encode([upserts[i].text() for i in every], every)
    np.testing.assert_allclose(np.stack([features.vectors[i] for i in every]), want, atol=1e-5)
    assert features.encoded_with == 2

"""The served item encoder's vectors: a known item's text plus its residual, a new item's text plus
a residual borrowed from the known items whose text is nearest (`ColdItemRule`)."""

from __future__ import annotations

import numpy as np
import pytest

from recstream.models.served import DIM, ColdItemRule, ItemEncoder
from recstream.models.training import CheckpointMeta


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.fixture
def catalogue() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return _unit(rng.normal(size=(6, DIM))), rng.normal(scale=0.1, size=(6, DIM)).astype(np.float32)


def _encoder(catalogue, **rule: float) -> ItemEncoder:
    text, residual = catalogue
    return ItemEncoder(residual, [f"i{n}" for n in range(6)], 32, known_text=text, cold_rule=ColdItemRule(**rule))


def test_a_known_item_is_its_text_plus_its_own_residual(catalogue) -> None:
    text, residual = catalogue
    out = _encoder(catalogue).combine(text[[2]], ["i2"])
    np.testing.assert_allclose(out[0], _unit(text[2] + residual[2]), atol=1e-6)


def test_a_new_item_borrows_the_residual_of_its_nearest_known_items(catalogue) -> None:
    text, residual = catalogue
    # a new item whose text is known item 4's, nudged: its one nearest neighbour is item 4
    new_text = _unit(text[4] + 0.05 * text[1])
    one = _encoder(catalogue, neighbours=1, strength=2.0).combine(new_text[None], ["brand-new"])
    np.testing.assert_allclose(one[0], _unit(new_text + 2.0 * residual[4]), atol=1e-5)

    # with several neighbours the weights are a softmax over their cosines
    rule = ColdItemRule(neighbours=3, strength=1.5, temperature=0.1)
    sim = text @ new_text
    top = np.argsort(-sim)[:3]
    w = np.exp((sim[top] - sim[top].max()) / rule.temperature)
    want = _unit(new_text + rule.strength * (w / w.sum()) @ residual[top])
    got = _encoder(catalogue, **rule.model_dump()).combine(new_text[None], ["brand-new"])
    np.testing.assert_allclose(got[0], want, atol=1e-5)


def test_without_neighbours_a_new_item_is_its_text_alone(catalogue) -> None:
    text, residual = catalogue
    new_text = _unit(text[0] + text[3])
    off = _encoder(catalogue, neighbours=0).combine(new_text[None], ["x"])
    np.testing.assert_allclose(off[0], new_text, atol=1e-6)
    # a version folder written before the rule existed holds no text vectors: text alone as well
    old = ItemEncoder(residual, [f"i{n}" for n in range(6)], 32)
    np.testing.assert_allclose(old.combine(new_text[None], ["x"])[0], new_text, atol=1e-6)


def test_mixed_batches_keep_row_order_and_unit_length(catalogue) -> None:
    text, _ = catalogue
    enc = _encoder(catalogue)
    batch = np.stack([text[1], _unit(text[1] + text[2]), text[5]])
    ids = ["i1", "new", "i5"]
    out = enc.combine(batch, ids)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    for r, item in enumerate(ids):  # each row as if encoded alone
        np.testing.assert_allclose(out[r], enc.combine(batch[[r]], [item])[0], atol=1e-6)


def test_save_and_load_keep_the_rule_and_give_the_same_vectors(catalogue, tmp_path) -> None:
    text, _ = catalogue
    enc = _encoder(catalogue, neighbours=2, strength=3.0, temperature=0.2)
    enc.save(tmp_path, CheckpointMeta(kind="item_encoder", config={}, data_hash="t"))
    loaded = ItemEncoder.load(tmp_path)
    assert loaded.cold_rule == enc.cold_rule
    batch = np.stack([_unit(text[0] - text[2]), text[3]])
    np.testing.assert_array_equal(loaded.combine(batch, ["new", "i3"]), enc.combine(batch, ["new", "i3"]))


def test_mismatched_text_vectors_are_refused(catalogue) -> None:
    text, residual = catalogue
    with pytest.raises(ValueError, match="text vectors"):
        ItemEncoder(residual, [f"i{n}" for n in range(6)], 32, known_text=text[:5])

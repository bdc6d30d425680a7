"""bench-search's reuse key for a trained query encoder: it must be computable from the current code
(it read a module path that had become a package, so the bench failed before its first seed) and
must change with every input that changes what training produces."""

from __future__ import annotations

import numpy as np

from bench.bench_search import _adapter_key
from recstream.data import leave_last_out, tiny_synthetic
from recstream.search.protocol import category_cases, known_item_cases
from recstream.search.query_encoder import QueryEncoderConfig


def test_the_adapter_key_follows_validation_cases_config_and_item_vectors() -> None:
    split = leave_last_out(tiny_synthetic(n_users=60, n_items=40, seed=0))
    vectors = np.random.default_rng(0).normal(size=(split.n_items, 8)).astype(np.float32)
    valid = [category_cases(split, "valid"), known_item_cases(split, 10, seed=1)]
    key = _adapter_key(split, vectors, valid, QueryEncoderConfig(seed=0))

    assert key == _adapter_key(split, vectors.copy(), list(valid), QueryEncoderConfig(seed=0))
    # --known-items changes the cases that stop the training: a run over other cases is another run
    fewer = [valid[0], known_item_cases(split, 5, seed=1)]
    assert _adapter_key(split, vectors, fewer, QueryEncoderConfig(seed=0)) != key
    assert _adapter_key(split, vectors, valid, QueryEncoderConfig(seed=1)) != key
    assert _adapter_key(split, vectors + 0.01, valid, QueryEncoderConfig(seed=0)) != key

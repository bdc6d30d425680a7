"""`make train` on a data set in the generic form: the three served models are trained, exported as
Triton versions that score exactly like the trained models, and a second run adds a version.

In-process (no broker, no Triton); the Triton side of the same classes is tests/models/test_served_models.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recstream.contracts.models import ITEM_ENCODER, SEQUENCE_SCORER, SESSION_ENCODER, TRAINED_MODELS
from recstream.data.datasets import save_generic, tiny_synthetic
from recstream.models.repository import load_exported, versions
from recstream.models.sequence import SequenceScorer
from recstream.models.served import ServedRetrieval
from recstream.training.bundle import export_bundle, serving_item_texts, train_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("train")
    data = save_generic(tiny_synthetic(n_users=40, n_items=30), root / "tiny")
    return train_bundle(str(data), work_dir=root / "work"), root


def test_exported_versions_score_like_the_trained_models(bundle) -> None:
    trained, root = bundle
    repo = root / "model_repo"
    written = export_bundle(trained, repo)
    assert {k: p.name for k, p in written.items()} == {name: "1" for name in TRAINED_MODELS}
    split = trained.split
    served = ServedRetrieval.from_repo(repo, serving_item_texts(split), [str(i) for i in split.item_ids])
    np.testing.assert_allclose(served.item_vectors.numpy(), trained.retrieval.item_vectors.numpy(), atol=1e-5)
    cases = split.cases("valid")
    np.testing.assert_allclose(
        served.score_index(cases.histories), trained.retrieval.score_index(cases.histories), atol=1e-4
    )
    ranker = load_exported(repo)
    assert ranker.meta.config["rerank_depth"] == 29  # the whole catalogue of 30 but one
    assert ranker.meta.data_hash == trained.data_hash
    # the sequence model as exported: the same scores, and the fusion chosen on validation
    sequence = SequenceScorer.load(repo / SEQUENCE_SCORER / "1")
    assert sequence.fusion == trained.sequence.fusion
    np.testing.assert_allclose(
        sequence.score_index(cases.histories), trained.sequence.score_index(cases.histories), atol=1e-5
    )
    assert trained.stats["fused_valid_ndcg10"] > 0 and trained.stats["sequence_valid_ndcg10"] > 0
    for name in (ITEM_ENCODER, SESSION_ENCODER):
        meta = json.loads((repo / name / "1" / "meta.json").read_text())
        assert meta["data_hash"] == trained.data_hash and meta["extra"]["dataset"] == "tiny"
        assert meta["metrics"]["retrieval_valid_ndcg10"] == pytest.approx(trained.stats["retrieval_valid_ndcg10"])


def test_a_second_export_adds_one_version_number_to_all_four(bundle) -> None:
    trained, root = bundle
    repo = root / "repo2"
    export_bundle(trained, repo)
    export_bundle(trained, repo)
    assert [versions(repo, n) for n in TRAINED_MODELS] == [[1, 2]] * 4


def test_a_rerun_reuses_what_it_trained(bundle) -> None:
    trained, root = bundle
    again = train_bundle(str(root / "tiny"), work_dir=root / "work")
    assert again.stats["command_seconds"] < trained.stats["command_seconds"]
    assert again.stats["retrieval_valid_ndcg10"] == trained.stats["retrieval_valid_ndcg10"]
    assert again.stats["ranker_valid_ndcg10"] == trained.stats["ranker_valid_ndcg10"]


def test_texts_are_the_catalog_upserts_texts(bundle) -> None:
    from recstream.data.events import catalog_events

    trained, _ = bundle
    upserts = {u.item_id: u.text() for u in catalog_events(trained.split.data.items)}
    assert trained.texts == [upserts[str(i)] for i in trained.split.item_ids]


def test_an_unknown_dataset_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises((FileNotFoundError, ValueError)):
        train_bundle(str(tmp_path / "nothing-here"), work_dir=tmp_path / "work")


def test_make_train_compares_with_simple_baselines_on_validation(bundle) -> None:
    """`make train` serves only what beats item-knn and popularity on validation: the figure it
    judges the trained models by is the validation figure of the fusion it chose, recomputed the serving way."""
    from recstream.ops.models_cli import _validation_against_baselines

    trained, _ = bundle
    check = _validation_against_baselines(trained)
    assert set(check) == {"served (retrieval + sequence + ranker)", "item-knn", "popularity"}
    assert all(0.0 <= v <= 1.0 for v in check.values())
    served = check["served (retrieval + sequence + ranker)"]
    assert served == pytest.approx(trained.stats["fused_valid_ndcg10"], abs=1e-4)


def test_served_rows_score_an_item_without_training_data_as_the_worker_does(bundle, tmp_path) -> None:
    """The worker ranks an item without an ID residual by the vector the exported item encoder gives
    it (its text plus a residual borrowed from its text neighbours), and builds the session from the
    stored vectors; the quality bench's served rows score it the same way, not by the offline
    cold-item rule, which the worker does not apply."""
    import copy
    import dataclasses

    from recstream.models.served import ItemEncoder
    from recstream.models.training import CheckpointMeta
    from recstream.training.bundle import AsServed, BundleRecommender

    trained, _ = bundle
    model = copy.deepcopy(trained.retrieval)
    model.has_id[0] = False  # item 0 as if it had no training data
    model.refresh_item_vectors()
    # the vector serving stores for it: the exported encoder, saved and loaded as Triton loads it
    ItemEncoder.from_two_tower(model).save(tmp_path, CheckpointMeta(kind="item_encoder", config={}, data_hash="t"))
    exported = ItemEncoder.load(tmp_path)
    stored = exported.combine(model.text_vectors.numpy()[:1], [model.item_ids[0]])[0]
    assert not exported.knows(model.item_ids[0])
    assert not np.allclose(stored, model.text_vectors[0].numpy(), atol=1e-3)  # not the bare text vector

    cases = trained.split.cases("valid")
    as_served = AsServed(model)
    np.testing.assert_allclose(as_served.item_vectors[0].numpy(), stored, atol=1e-6)
    served = as_served.score_index(cases.histories)
    session = as_served.session_vectors_from_index(cases.histories)
    np.testing.assert_allclose(served[:, 0], session.numpy() @ stored, atol=1e-5)
    with_item0 = [r for r, h in enumerate(cases.histories) if 0 in h]
    if with_item0:  # sessions that hold item 0 read its stored vector, not the model's cache
        plain = model.session_vectors_from_index([cases.histories[r] for r in with_item0])
        assert not np.allclose(plain.numpy(), session.numpy()[with_item0], atol=1e-6)
    assert not np.allclose(model.score_index(cases.histories)[:, 0], served[:, 0])  # the offline rule
    row = BundleRecommender(ranked=False).attach(dataclasses.replace(trained, retrieval=model))
    np.testing.assert_allclose(row.score(cases.users, cases.histories), served)


def test_the_export_ships_whether_the_lists_place_new_items(bundle) -> None:
    """Chosen on validation by `make train` (recstream.training.new_items), kept in the ranker
    version's meta, read back by the worker (streams.rankers.version_files); offline scoring of a
    bundle that chose not to place them orders new items by the ranker, as the worker then does."""
    import copy
    import dataclasses

    from recstream.contracts.models import RANKER
    from recstream.models.ranker import PLACES_NEW_ITEMS
    from streams.rankers import version_files

    trained, root = bundle
    assert isinstance(trained.places_new_items, bool)
    assert trained.stats["places_new_items"] == float(trained.places_new_items)
    assert {"placement_cost", "placement_cost_se", "new_item_share_top10"} <= set(trained.stats)
    written = export_bundle(trained, root / "placement_repo")
    assert version_files(written[RANKER], "ranker-v1")[3] is trained.places_new_items

    off = dataclasses.replace(trained, places_new_items=False, ranker=copy.deepcopy(trained.ranker))
    written = export_bundle(off, root / "placement_off_repo")
    assert load_exported(root / "placement_off_repo").meta.extra[PLACES_NEW_ITEMS] is False
    assert version_files(written[RANKER], "ranker-v1")[3] is False


def test_a_ranker_version_with_broken_files_is_served_without_them(bundle, tmp_path: Path) -> None:
    """A corrupt statistic or meta.json must not fail every answer of the worker (it reads these per
    request): the version is served without co-visitation, as a ranker trained without it would be."""
    import shutil

    from recstream.contracts.models import RANKER
    from recstream.models.co_visitation import CoVisitation
    from streams.rankers import NO_VERSION_FILES, version_files

    trained, root = bundle
    written = export_bundle(trained, root / "broken_files_repo")
    folder = tmp_path / "1"
    shutil.copytree(written[RANKER], folder)
    assert version_files(folder, "ranker-v1")[0] is not None
    intact = (folder / CoVisitation.FILE).read_bytes()
    (folder / CoVisitation.FILE).write_bytes(intact[: len(intact) // 2])
    assert version_files(folder, "ranker-v1") == NO_VERSION_FILES
    (folder / CoVisitation.FILE).write_bytes(intact)
    (folder / "meta.json").write_text('{"model": ')
    assert version_files(folder, "ranker-v1") == NO_VERSION_FILES

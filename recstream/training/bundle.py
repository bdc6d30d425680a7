"""`make train`: fit the models behind the best quality-bench row and write them as Triton versions.

One command trains, on a data set's leave-last-out training part (validation = each user's
second-to-last item, for early stopping; the test item is never seen):

1. the two-tower retrieval model (frozen MiniLM text tower + ID residual + session transformer), on
   the item texts the catalog indexer will encode (`ItemUpsert.text()` of the replayed catalog, so
   training and serving embed the same strings);
2. its out-of-fold twin (without each user's last 5 training items), whose lists the ranker learns
   from;
3. the ranker, on candidate features computed by the one function serving uses;
4. the ID sequence model (the `sasrec-id` baseline's SASRec), a second candidate source whose
   candidates and score join the ranked list as far as validation says (recstream.training.sequence).

and exports `item_encoder`, `session_encoder`, `ranker` and `sequence_scorer` versions with a meta.json each (data
hash, git commit, config, training time and peak memory, validation figures). Checkpoints are
cached under artifacts/quality/<split>/seed<n>/ (the quality bench's folder for the same split and
seed) keyed by data, texts, config, code and feature schema, so a rerun reuses what is unchanged.

How a new item is served (the cold rule) is chosen on the same data's cold-start split
(recstream.training.cold_rule), whose bundle is trained or reused the same way.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recstream.atomic import atomic_write_text
from recstream.contracts.models import ITEM_ENCODER, RANKER, SEQUENCE_SCORER, SESSION_ENCODER
from recstream.data.datasets import data_hash
from recstream.models.code_hash import code_version
from recstream.models.training import ARTIFACTS_DIR, CheckpointMeta, read_meta, split_fingerprint

log = logging.getLogger(__name__)

OOF_LAST = 5
#: Candidates the served ranker reorders (retrieved per request).
SERVED_DEPTH = 50


def serving_item_texts(split: Any) -> list[str]:
    """Per split item, the text the catalog indexer encodes: ItemUpsert.text() of its replayed upsert."""
    from recstream.data.events import catalog_events

    texts = {u.item_id: u.text() for u in catalog_events(split.data.items)}
    return [texts[str(i)] for i in split.item_ids]


def item_categories(split: Any) -> list[str]:
    return split.data.items.set_index("item_id").loc[split.item_ids, "category"].astype(str).tolist()


#: The code the bundle's ranker (and so the sequence model's fusion, chosen against it) follows in its
#: cache key: everything the bundle runs. The two-towers and the sequence model follow only their own
#: (recstream.training.two_tower.TwoTowerData.key, recstream.training.sequence_model.SEQUENCE_MODEL_CODE).
BUNDLE_CODE = ("recstream.training.bundle",)


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class TrainedBundle:
    """The retrieval model (both towers, exported as two parts), the ranker, and how they were made."""

    split: Any
    retrieval: Any  # TwoTowerModel
    ranker: Any  # Ranker
    texts: list[str]
    stats: dict[str, float]
    data_hash: str
    #: how a new item is served (recstream.training.cold_rule.ColdRuleChoice); None: the default rule
    cold_rule_choice: Any = None
    #: the sequence model with its fusion (recstream.models.sequence.SequenceScorer); None: not served
    sequence: Any = None
    #: whether its lists place items nobody has interacted with by retrieval (recstream.training.new_items)
    places_new_items: bool = True

    @property
    def new_item_slot_factor(self) -> float | None:
        """How offline scoring places new items for this bundle: at their retrieval slot, or not at all."""
        from recstream.recommend.rerank import new_item_slot_factor

        return new_item_slot_factor(self.places_new_items)

    @property
    def cold_rule(self) -> Any:
        return None if self.cold_rule_choice is None else self.cold_rule_choice.rule


def bundle_work_dir(split: Any, seed: int, root: Path | None = None) -> Path:
    """Where a split's bundle for a seed is cached: one folder per split and seed, shared by `make
    train` and the quality bench (so the exported models are the bench's seed-n served row)."""
    return Path(root or ARTIFACTS_DIR / "quality") / split_fingerprint(split)[:16] / f"seed{seed}"


def train_bundle(dataset: str = "ml-100k", seed: int = 0, work_dir: Path | None = None) -> TrainedBundle:
    """Train (or reuse) the retrieval model, its out-of-fold twin and the ranker."""
    from recstream.data.datasets import load_dataset
    from recstream.data.split import leave_last_out

    split = leave_last_out(load_dataset(dataset))
    return train_bundle_on(split, seed, Path(work_dir) if work_dir else bundle_work_dir(split, seed))


def train_bundle_on(split: Any, seed: int, work: Path, places_new_items: bool | None = None) -> TrainedBundle:
    """`train_bundle` on a given split (the quality bench passes its cold-start split too).

    Whether the lists place new items is chosen on the split's validation cases unless
    `places_new_items` gives it (a cold-start split takes its data set's choice: `BundleRecommender`)."""
    from recstream.models.ranker import FEATURE_SCHEMA, Ranker, RankerConfig
    from recstream.models.two_tower import TwoTowerConfig
    from recstream.recommend.rerank import new_item_slot_factor
    from recstream.training.ranker import (
        request_times,
        split_events,
        split_train_times,
        train_ranker,
        truncate_sequences,
    )
    from recstream.training.two_tower import TwoTowerData, cached_two_tower

    t0 = time.perf_counter()
    texts = serving_item_texts(split)
    fp = split_fingerprint(split)
    cfg = TwoTowerConfig(finetune="frozen", seed=seed)
    cats = item_categories(split)
    # each two-tower is keyed by what it is fitted on, its config and its own code
    # (recstream.training.two_tower.TwoTowerData.key): a change to the ranker reuses both
    valid = split.cases("valid")
    data = TwoTowerData(split.train_seqs, texts, valid.histories, valid.targets, cats, split.item_ids)
    retrieval, r_stats, key = cached_two_tower(cfg, data, work / "two_tower")
    full = split.train_seqs
    fold_seqs = truncate_sequences(full, OOF_LAST)
    users = [u for u, s in enumerate(full) if len(s) > OOF_LAST]
    fold_valid = ([fold_seqs[u] for u in users], np.array([full[u][len(fold_seqs[u])] for u in users]))
    fold_data = TwoTowerData(fold_seqs, texts, fold_valid[0], fold_valid[1], cats, split.item_ids)
    fold, f_stats, fold_key = cached_two_tower(cfg, fold_data, work / "two_tower_fold")

    # Depth 50, not the quality bench's 100: serving reorders what it retrieves, and on 2 cores at
    # 200 requests/s 100 candidates a request tipped the stack into saturation (p50 18.9 -> 276 ms,
    # measured side by side); the ranker is trained on lists of the depth it will serve.
    # (a catalogue smaller than that is reordered whole, less one: the lists need an item to leave out)
    depth = min(SERVED_DEPTH, len(split.item_ids) - 1)
    rcfg = RankerConfig(init_retrieval_weight=1.0 / cfg.temperature, dropout=0.3, seed=seed, rerank_depth=depth)
    rkey = _key(fp, data_hash(split.data), key, fold_key, rcfg.model_dump(), FEATURE_SCHEMA, code_version(*BUNDLE_CODE))
    rpath = work / "ranker"
    meta = read_meta(rpath)
    if meta is not None and meta.extra.get("bundle_key") == rkey:
        ranker, k_stats = Ranker.load(rpath), dict(meta.metrics)
    else:
        # the ranker learns from and is validated on lists as serving builds them (AsServed)
        ranker, k_stats = train_ranker(
            rcfg,
            AsServed(retrieval),
            split.train_seqs,
            cats,
            valid.histories,
            valid.targets,
            fp,
            events=split_events(split),
            train_times=split_train_times(split),
            valid_times=request_times(split, valid.users, valid.histories),
            example_retrieval=AsServed(fold),
            item_ids=split.item_ids,
        )
        ranker.meta.extra["bundle_key"] = rkey
        ranker.save(rpath)
    places, p_stats = _placement(split, ranker, retrieval, cats, work / "placement.json", rkey, places_new_items)
    factor = new_item_slot_factor(places)
    sequence, s_stats = _sequence(split, seed, ranker, retrieval, cats, work / "sequence", fp, rkey, factor)
    stats = {
        "retrieval_valid_ndcg10": float(r_stats.get("valid_ndcg10", float("nan"))),
        "retrieval_train_seconds": float(r_stats.get("train_seconds", float("nan"))),
        "retrieval_best_epoch": float(r_stats.get("best_epoch", float("nan"))),
        "ranker_valid_ndcg10": float(k_stats.get("valid_ndcg10", float("nan"))),
        "fold_train_seconds": float(f_stats.get("train_seconds", float("nan"))),
        "ranker_train_seconds": float(k_stats.get("train_seconds", float("nan"))),
        **s_stats,
        **p_stats,
        "train_peak_rss_mb": max(float(r_stats.get("peak_rss_mb", 0)), float(k_stats.get("peak_rss_mb", 0))),
        # this invocation (short when every part came from the cache)
        "command_seconds": time.perf_counter() - t0,
    }
    return TrainedBundle(split, retrieval, ranker, texts, stats, fp, sequence=sequence, places_new_items=places)


def _placement(
    split: Any, ranker: Any, retrieval: Any, cats: list[str], path: Path, ranker_key: str, given: bool | None
) -> tuple[bool, dict[str, float]]:
    """Whether the lists place new items (`given`, or chosen on the split's validation against this
    ranker and cached beside it, keyed by it), with the figures behind the choice."""
    from recstream.models.ranker import RankingContext
    from recstream.training.new_items import choose_placement
    from recstream.training.ranker import request_times, split_events

    if given is not None:
        return given, {"places_new_items": float(given)}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if cached.get("key") == ranker_key:
        places, figures = bool(cached["places_new_items"]), cached["figures"]
    else:
        valid = split.cases("valid")
        ctx = RankingContext(cats, split.train_seqs, split.n_items, split_events(split))
        depth = int(ranker.meta.config.get("rerank_depth", SERVED_DEPTH))
        times = request_times(split, valid.users, valid.histories)
        places, figures = choose_placement(
            ranker, AsServed(retrieval), ctx, valid.histories, valid.targets, depth, times
        )
        atomic_write_text(path, json.dumps({"key": ranker_key, "places_new_items": places, "figures": figures}))
    return places, {"places_new_items": float(places), **{k: float(v) for k, v in figures.items()}}


def _sequence(
    split: Any,
    seed: int,
    ranker: Any,
    retrieval: Any,
    cats: list[str],
    path: Path,
    fp: str,
    ranker_key: str,
    new_item_slot_factor: float | None = 1.0,
) -> tuple[Any, dict[str, float]]:
    """The sequence model (trained or reused) with its fusion chosen on validation against this
    ranker, new items placed as the lists will place them (the choice is cached beside it, keyed by
    all three)."""
    from recstream.eval.baselines import SASRecConfig
    from recstream.models.ranker import RankingContext
    from recstream.models.sequence_fusion import SequenceFusion
    from recstream.training.ranker import request_times, split_events
    from recstream.training.sequence import choose_fusion
    from recstream.training.sequence_model import SEQUENCE_MODEL_CODE, train_sequence_model

    # its training data, early-stopping cases (the whole data set's hash), config and own code
    key = _key(fp, data_hash(split.data), SASRecConfig(seed=seed).model_dump(), code_version(*SEQUENCE_MODEL_CODE))
    sequence, s_stats = train_sequence_model(split, seed, path, key)
    choice_file = path / "fusion.json"
    choice_key = _key(key, ranker_key, new_item_slot_factor)
    cached = json.loads(choice_file.read_text()) if choice_file.is_file() else {}
    if cached.get("key") == choice_key:
        sequence.fusion = SequenceFusion.model_validate(cached["fusion"])
        figures = cached["figures"]
    else:
        valid = split.cases("valid")
        ctx = RankingContext(cats, split.train_seqs, split.n_items, split_events(split))
        depth = int(ranker.meta.config.get("rerank_depth", SERVED_DEPTH))
        times = request_times(split, valid.users, valid.histories)
        as_served = AsServed(retrieval)
        sequence.fusion, figures = choose_fusion(
            ranker, as_served, ctx, sequence, valid.histories, valid.targets, depth, times, new_item_slot_factor
        )
        atomic_write_text(
            choice_file, json.dumps({"key": choice_key, "fusion": sequence.fusion.model_dump(), "figures": figures})
        )
    chosen = f"{sequence.fusion.candidates},{sequence.fusion.weight:g}"
    return sequence, {
        "sequence_valid_ndcg10": float(s_stats.get("valid_ndcg10", float("nan"))),
        "sequence_train_seconds": float(s_stats.get("train_seconds", float("nan"))),
        "sequence_candidates": float(sequence.fusion.candidates),
        "sequence_weight": float(sequence.fusion.weight),
        "fused_valid_ndcg10": float(figures[chosen]),
        "fusion_best_gain": float(figures.get("gain_over_ranker_alone", float("nan"))),
        "fusion_best_gain_se": float(figures.get("gain_se", float("nan"))),
    }


def export_bundle(bundle: TrainedBundle, model_repo: Path, version: int | None = None) -> dict[str, Path]:
    """Write item_encoder and session_encoder as version `version` (default: one past the newest of
    either) and the ranker as the same number, or the next free one when the continual trainer
    already holds that number. An explicit `version` overwrites what is there."""
    from recstream.models.export import (
        export_item_encoder,
        export_ranker,
        export_sequence_scorer,
        export_session_encoder,
    )
    from recstream.models.ranker import PLACES_NEW_ITEMS
    from recstream.models.repository import versions
    from recstream.models.served import ItemEncoder, SessionEncoder

    overwrite = version is not None

    common = dict(bundle.stats)
    extra: dict[str, Any] = {
        "dataset": bundle.split.data.name,
        "item_texts": "ItemUpsert.text() of the replayed catalog",
    }
    cfg = bundle.retrieval.cfg.model_dump()
    item = ItemEncoder.from_two_tower(bundle.retrieval, bundle.cold_rule)
    if bundle.cold_rule_choice is not None:
        extra["cold_rule_choice"] = bundle.cold_rule_choice.model_dump()
    session = SessionEncoder(bundle.retrieval.session_tower, bundle.retrieval.cfg)

    def meta(kind: str, config: dict) -> CheckpointMeta:
        return CheckpointMeta(kind=kind, config=config, data_hash=bundle.data_hash, metrics=common, extra=dict(extra))

    # The two encoders share a version number: the worker pins the session encoder to the number of
    # the item encoder whose vectors it holds (streams.inference.matching_session_version).
    if version is None:
        version = max([0, *versions(model_repo, ITEM_ENCODER), *versions(model_repo, SESSION_ENCODER)]) + 1
    out = {SESSION_ENCODER: export_session_encoder(session, meta(SESSION_ENCODER, cfg), model_repo, version)}
    bundle.ranker.meta.metrics.update(common)
    bundle.ranker.meta.extra.update(extra)
    bundle.ranker.meta.extra[PLACES_NEW_ITEMS] = bundle.places_new_items
    ranker_version = version if overwrite or version not in versions(model_repo, RANKER) else None
    out[RANKER] = export_ranker(bundle.ranker, model_repo, ranker_version, overwrite=overwrite)
    if bundle.sequence is not None:
        sequence_cfg = {"fusion": bundle.sequence.fusion.model_dump()}
        out[SEQUENCE_SCORER] = export_sequence_scorer(
            bundle.sequence, meta(SEQUENCE_SCORER, sequence_cfg), model_repo, version
        )
    # Last: a new item encoder is what the worker follows (it re-embeds the catalogue and switches),
    # so everything that version serves with is complete on disk before it appears.
    out[ITEM_ENCODER] = export_item_encoder(item, meta(ITEM_ENCODER, cfg), model_repo, version)
    return out


class AsServed:
    """The retrieval model as the stream worker uses it: every item by the vector the vector store
    holds (`ItemEncoder.from_two_tower`, the exported item encoder: an item without training data
    borrows its neighbours' residual by `cold_rule`), scored by its cosine to the session vector.
    The two-tower's offline rule for such items (`TwoTowerModel.cold_item_scores`) is not served, so
    a row that claims to be the served model must not use it."""

    def __init__(self, model: Any, cold_rule: Any = None) -> None:
        import torch

        from recstream.models.served import ItemEncoder

        self.model = model
        encoder = ItemEncoder.from_two_tower(model, cold_rule)
        self.item_vectors = torch.from_numpy(encoder.combine(model.text_vectors.numpy(), model.item_ids))

    def session_vectors_from_index(self, histories: Any) -> Any:
        # the session tower reads the history's vectors as stored too
        return self.model.session_vectors_from_index(histories, self.item_vectors)

    def score_index(self, histories: Any) -> np.ndarray:
        return (self.session_vectors_from_index(histories) @ self.item_vectors.T).numpy()


class BundleRecommender:
    """`make train`'s models as a quality-bench row (`fit(split)` / `score(users, histories)`).

    The same training code and configuration as the served versions, one checkpoint folder per
    split and seed (artifacts/quality/<split fingerprint>/seed<n>), so a seed's retrieval-only and
    ranked rows share one training run. `ranked=False` scores with the retrieval stage alone. Both
    score as the worker serves (`AsServed`: no offline cold-item rule), with the cold rule `make
    train` would ship: chosen on the split's own cold validation cases (cold-start split) or on the
    same data's cold-start split (`choose_cold_rule=False` keeps the default).
    """

    def __init__(
        self, seed: int = 0, ranked: bool = True, work_root: Path | None = None, choose_cold_rule: bool = True
    ) -> None:
        self.seed = seed
        self.ranked = ranked
        self.work_root = Path(work_root or ARTIFACTS_DIR / "quality")
        self.choose_cold_rule = choose_cold_rule
        self.cold_rule: Any = None
        self.info: dict[str, Any] = {}

    def fit(self, split: Any, places_new_items: bool | None = None) -> BundleRecommender:
        """Train or reuse the split's bundle. A cold-start split's lists place new items as its data
        set's served model does: `places_new_items` when the caller has that model, else looked up
        (`placement_for`)."""
        cold = hasattr(split, "cold_valid")
        if cold and places_new_items is None:
            places_new_items = placement_for(split.data, self.seed, self.work_root)
        work = bundle_work_dir(split, self.seed, self.work_root)
        bundle = train_bundle_on(split, self.seed, work, places_new_items if cold else None)
        if cold:
            bundle.cold_rule_choice = choose_own_cold_rule(bundle)
        elif self.choose_cold_rule:
            bundle.cold_rule_choice = cold_rule_for(split.data, self.seed, self.work_root, bundle.places_new_items)
        return self.attach(bundle)

    def attach(self, bundle: TrainedBundle) -> BundleRecommender:
        """Score with an already trained bundle (`make train` judges the one it is about to export)."""
        from recstream.models.ranker import RankingContext
        from recstream.training.ranker import split_events

        split = bundle.split
        self.bundle = bundle
        self.split = split
        self.ctx = RankingContext(item_categories(split), split.train_seqs, split.n_items, split_events(split))
        self.depth = int(self.bundle.ranker.meta.config.get("rerank_depth", SERVED_DEPTH))
        self.info = {k: round(v, 4) for k, v in self.bundle.stats.items()}
        self.cold_rule = bundle.cold_rule
        if bundle.cold_rule_choice is not None:
            self.info["cold_rule"] = bundle.cold_rule.model_dump()
        return self

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        from recstream.training.ranker import request_times, rerank_scores

        retrieval = AsServed(self.bundle.retrieval, self.cold_rule)
        if not self.ranked:
            return retrieval.score_index(histories)
        times = request_times(self.split, users, histories)
        bundle = self.bundle
        factor = bundle.new_item_slot_factor
        return rerank_scores(bundle.ranker, retrieval, self.ctx, histories, self.depth, times, factor, bundle.sequence)


def choose_own_cold_rule(bundle: TrainedBundle) -> Any:
    """The cold rule chosen on the bundle's own cold validation cases (a cold-start split's bundle;
    any other keeps the default), scored on the served path: vectors as exported, then the ranker."""
    from recstream.training.cold_rule import choose_cold_rule

    split = bundle.split
    cases = split.cases("cold_valid") if hasattr(split, "cold_valid") else None
    return choose_cold_rule(BundleRecommender(ranked=True).attach(bundle), cases)


def cold_rule_for(data: Any, seed: int = 0, work_root: Path | None = None, places_new_items: bool | None = None) -> Any:
    """The rule for models trained on `data`: chosen on the default cold-start split of the same data,
    whose bundle for `seed` is trained or reused (the quality bench's cache), its lists placing new
    items as the models' do (`places_new_items`; None: looked up, `placement_for`)."""
    from recstream.data.split import cold_start_split

    row = BundleRecommender(seed, work_root=work_root).fit(cold_start_split(data), places_new_items)
    return row.bundle.cold_rule_choice


def placement_for(data: Any, seed: int = 0, work_root: Path | None = None) -> bool:
    """Whether the served model for `data` places new items: chosen on the leave-last-out split's
    validation, whose bundle for `seed` is trained or reused (the quality bench's cache)."""
    from recstream.data.split import leave_last_out

    split = leave_last_out(data)
    return train_bundle_on(split, seed, bundle_work_dir(split, seed, work_root)).places_new_items


def served_model(seed: int = 0) -> BundleRecommender:
    """The served pair: frozen-text + ID two-tower retrieval -> ranker over the top 50."""
    return BundleRecommender(seed, ranked=True)


def served_retrieval(seed: int = 0) -> BundleRecommender:
    """The served retrieval stage alone (the ablation of the ranker)."""
    return BundleRecommender(seed, ranked=False)

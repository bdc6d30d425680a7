"""Training CLI: one command per step, each writing a checkpoint folder with provenance metadata.

Typical run (ml-100k, 2 CPU cores)::

    python -m recstream.training.cli train-retrieval --finetune frozen   # -> artifacts/two_tower_frozen/
    python -m recstream.training.cli train-retrieval --finetune lora     # -> artifacts/two_tower_lora/
    python -m recstream.training.cli train-retrieval --finetune full     # -> artifacts/two_tower_full/
    python -m recstream.training.cli train-ranker --retrieval artifacts/two_tower_frozen
    python -m recstream.training.cli export --ranker artifacts/ranker   # -> model_repo/ranker/<v+1>/
    python -m recstream.training.cli evaluate --retrieval artifacts/two_tower_frozen --ranker artifacts/ranker
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import typer

from recstream.config import REPO_ROOT
from recstream.models.training import ARTIFACTS_DIR, CheckpointMeta, configure_threads, write_json
from recstream.training.bundle import item_categories, serving_item_texts

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
log = logging.getLogger("recstream.train")


def _setup(threads: int) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    configure_threads(threads or None)


def load_split(dataset: str, split: str = "leave-last-out", cold_frac: float = 0.1, seed: int = 0) -> Any:
    """The evaluation split every step agrees on (same item indexing as the quality bench)."""
    from recstream.data.datasets import DataFormatError, load_dataset
    from recstream.data.split import cold_start_split, leave_last_out

    if split not in ("leave-last-out", "cold"):
        raise typer.BadParameter(f"split must be 'leave-last-out' or 'cold', got {split!r}")
    try:
        data = load_dataset(dataset)
        return cold_start_split(data, frac=cold_frac, seed=seed) if split == "cold" else leave_last_out(data)
    except DataFormatError as exc:
        raise typer.BadParameter(str(exc), param_hint="--dataset") from exc


def _stage_cases(sp: Any, stage: str) -> Any:
    """The cases the printed metrics use: validation by default; test figures only when asked for,
    so nothing is tuned on them. Checked before any training, so a wrong --stage costs nothing."""
    if stage not in ("valid", "cold_valid", "test"):
        raise typer.BadParameter(f"must be valid, cold_valid or test, got {stage!r}", param_hint="--stage")
    try:
        return sp.cases(stage)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--stage") from exc


def _split_of(meta: CheckpointMeta) -> Any:
    """The split a retrieval checkpoint was trained on: data set, kind, and the cold split's draw."""
    extra = meta.extra
    return load_split(
        extra.get("dataset", "ml-100k"),
        extra.get("split", "leave-last-out"),
        cold_frac=float(extra.get("cold_frac", 0.1)),
        seed=int(extra.get("split_seed", 0)),
    )


def split_hash(sp: Any) -> str:
    from recstream.models.training import split_fingerprint

    return split_fingerprint(sp)


@app.command("train-retrieval")
def train_retrieval(
    dataset: str = typer.Option("ml-100k", help="Built-in name or generic-form directory"),
    finetune: str = typer.Option("lora", help="lora | full | frozen"),
    split: str = typer.Option("leave-last-out", help="leave-last-out | cold (held-out cold items)"),
    epochs: int = typer.Option(15),
    patience: int = typer.Option(3),
    max_history: int = typer.Option(50),
    fresh_items: int = typer.Option(32, help="Target items re-encoded with gradients per step"),
    batch_size: int = typer.Option(64),
    windows: str = typer.Option("all", help="all: every training transition once per epoch; sampled"),
    windows_per_user: int = typer.Option(2, help="With --windows sampled"),
    lr_text: float = typer.Option(0.0, help="0 = default for the fine-tuning mode"),
    seed: int = typer.Option(0, help="Training seed, and the cold split's draw of held-out items"),
    cold_frac: float = typer.Option(0.1, help="With --split cold: the share of items held out"),
    max_minutes: float = typer.Option(0.0, help="Wall-time budget; stops after the epoch past it (0 = none)"),
    stage: str = typer.Option("valid", help="Which cases the printed metrics use: valid, or test (explicitly)"),
    threads: int = typer.Option(0, help="torch threads (0 = all cores)"),
    out: Path = typer.Option(None, help="Checkpoint folder (default artifacts/two_tower_<finetune>[_cold])"),
) -> None:
    """Fine-tune the two-tower retrieval model; early-stops on validation NDCG@10 (full ranking)."""
    _setup(threads)
    from recstream.models.two_tower import TwoTowerConfig
    from recstream.training.two_tower import evaluate_retrieval, train_two_tower

    sp = load_split(dataset, split, cold_frac=cold_frac, seed=seed)
    cases = _stage_cases(sp, stage)
    cfg = TwoTowerConfig(
        finetune=finetune,  # type: ignore[arg-type]
        epochs=epochs,
        patience=patience,
        max_history=max_history,
        fresh_items_per_step=fresh_items,
        batch_size=batch_size,
        windows=windows,  # type: ignore[arg-type]
        windows_per_user=windows_per_user,
        lr_text=lr_text or None,
        seed=seed,
        time_budget_s=max_minutes * 60 or None,
    )
    valid = sp.cases("valid")
    model, stats = train_two_tower(
        cfg,
        sp.train_seqs,
        serving_item_texts(sp),  # what the catalog indexer encodes, so offline figures are served ones
        valid.histories,
        valid.targets,
        item_categories(sp),
        item_ids=sp.item_ids,
    )
    metrics = evaluate_retrieval(model, cases.histories, cases.targets)
    metrics = {f"{stage}_{k}": v for k, v in metrics.items()}
    log.info("%s %s", stage, json.dumps(metrics))
    out = out or ARTIFACTS_DIR / f"two_tower_{finetune}{'_cold' if split == 'cold' else ''}"
    meta = CheckpointMeta(
        kind="two_tower",
        config=cfg.model_dump(),
        data_hash=split_hash(sp),
        metrics={**metrics, **{k: v for k, v in stats.items() if not k.startswith(("train_loss", "valid_ndcg10_"))}},
        extra={
            "dataset": dataset,
            "split": split,
            "split_seed": seed,
            "cold_frac": cold_frac,
            "n_items": sp.n_items,
            "curve": stats,
        },
    )
    model.save(out, meta)
    write_json(out / "train_stats.json", {"stats": stats, "metrics": metrics})
    typer.echo(json.dumps({"checkpoint": str(out), **metrics, **stats}, indent=2))


def _load_retrieval(path: Path, sp: Any) -> Any:
    from recstream.models.two_tower import TwoTowerModel

    model, meta = TwoTowerModel.load(path)
    if meta.data_hash != split_hash(sp):
        raise typer.BadParameter(f"{path} was trained on data {meta.data_hash}, this data is {split_hash(sp)}")
    if model.item_ids != [str(i) for i in sp.item_ids]:
        raise typer.BadParameter(f"{path}: item index differs from this data set's")
    return model, meta


@app.command("train-ranker")
def train_ranker_cmd(
    retrieval: Path = typer.Option(ARTIFACTS_DIR / "two_tower_frozen", help="Two-tower checkpoint folder"),
    epochs: int = typer.Option(15),
    positions_per_user: int = typer.Option(5),
    depth: int = typer.Option(100, help="Candidates per list, as served: the top retrieved"),
    lr: float = typer.Option(5e-4),
    dropout: float = typer.Option(0.3, help="MLP dropout (0.1 overfits the few thousand ml-100k lists)"),
    batch_size: int = typer.Option(128),
    seed: int = typer.Option(0),
    stage: str = typer.Option("valid", help="Which cases the printed metrics use: valid, or test (explicitly)"),
    threads: int = typer.Option(0),
    out_of_fold: bool = typer.Option(
        True, help="Build training lists with a retrieval model that never saw those positions (trained first)"
    ),
    out: Path = typer.Option(None, help="Default artifacts/ranker (or ranker_cold for a cold-split retrieval)"),
) -> None:
    """Train the MLP ranker on retrieval hard negatives; early-stops on validation NDCG@10 after rerank."""
    _setup(threads)
    from recstream.eval.metrics import metrics_from_ranks, target_ranks
    from recstream.models.ranker import RankerConfig, RankingContext
    from recstream.training.ranker import (
        out_of_fold_retrieval,
        request_times,
        rerank_scores,
        split_events,
        split_train_times,
        train_ranker,
    )

    rmeta = CheckpointMeta.model_validate_json((retrieval / "meta.json").read_text())
    sp = _split_of(rmeta)
    model, _ = _load_retrieval(retrieval, sp)
    cases = _stage_cases(sp, stage)
    cfg = RankerConfig(
        init_retrieval_weight=1.0 / model.cfg.temperature,
        epochs=epochs,
        positions_per_user=positions_per_user,
        rerank_depth=depth,
        dropout=dropout,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
    )
    valid = sp.cases("valid")
    cats = item_categories(sp)
    ranker, stats = train_ranker(
        cfg,
        model,
        sp.train_seqs,
        cats,
        valid.histories,
        valid.targets,
        data_hash=split_hash(sp),
        events=split_events(sp),
        train_times=split_train_times(sp),
        valid_times=request_times(sp, valid.users, valid.histories),
        example_retrieval=out_of_fold_retrieval(
            sp,
            model.cfg,
            positions_per_user,
            retrieval.with_name(f"{retrieval.name}_fold{positions_per_user}"),
            serving_item_texts(sp),
        )
        if out_of_fold
        else None,
        item_ids=sp.item_ids,
    )
    ctx = RankingContext(cats, sp.train_seqs, sp.n_items, split_events(sp))
    depth = int(ranker.meta.config.get("rerank_depth", cfg.rerank_depth))
    scores = rerank_scores(ranker, model, ctx, cases.histories, depth, request_times(sp, cases.users, cases.histories))
    metrics = {
        f"{stage}_{k}": v for k, v in metrics_from_ranks(target_ranks(scores, cases.targets, cases.histories)).items()
    }
    ranker.meta.metrics.update(metrics)
    # relative to the checkout where it is inside it: the meta ships with exported versions
    where = retrieval.resolve()
    where_text = str(where.relative_to(REPO_ROOT)) if where.is_relative_to(REPO_ROOT) else str(where)
    ranker.meta.extra.update(retrieval_checkpoint=where_text, retrieval_git_sha=rmeta.git_sha)
    out = out or ARTIFACTS_DIR / ("ranker_cold" if rmeta.extra.get("split") == "cold" else "ranker")
    ranker.save(out)
    write_json(out / "train_stats.json", {"stats": stats, "metrics": metrics})
    typer.echo(json.dumps({"checkpoint": str(out), **metrics, **stats}, indent=2))


@app.command("export")
def export_cmd(
    ranker: Path = typer.Option(ARTIFACTS_DIR / "ranker", help="Ranker checkpoint folder"),
    model_repo: Path = typer.Option(None, help="Triton model repository (default: settings.model_repo)"),
    version: int = typer.Option(0, help="0 = next free version"),
    overwrite: bool = typer.Option(False),
    retrieval: Path = typer.Option(None, help="Also export this two-tower's item encoder (HF layout)"),
    encoder_out: Path = typer.Option(None, help="Where the item encoder goes (default <retrieval>/item_encoder)"),
) -> None:
    """Write model_repo/ranker/<v>/ (weights + meta + model.py) and optionally the tuned item encoder."""
    _setup(1)
    from recstream.config import get_settings
    from recstream.models.export import export_ranker
    from recstream.models.ranker import Ranker

    repo = model_repo or get_settings().model_repo
    vdir = export_ranker(Ranker.load(ranker), repo, version or None, overwrite=overwrite)
    typer.echo(f"ranker -> {vdir}")
    if retrieval is not None:
        from recstream.models.two_tower import TwoTowerModel

        model, _ = TwoTowerModel.load(retrieval)
        enc = model.export_item_encoder(encoder_out or retrieval / "item_encoder")
        typer.echo(f"item encoder -> {enc} (serve with TextEncoder({enc}) or text_encoder/<v>/encoder/)")


@app.command("evaluate")
def evaluate_cmd(
    retrieval: Path = typer.Option(ARTIFACTS_DIR / "two_tower_frozen"),
    ranker: Path = typer.Option(None, help="Add the reranking stage"),
    stage: str = typer.Option("valid", help="valid | cold_valid (cold split) | test (report only; never tune on it)"),
    threads: int = typer.Option(0),
    out: Path = typer.Option(None, help="Write the metrics JSON here"),
) -> None:
    """Full-ranking metrics (history excluded) of retrieval alone or retrieval -> ranker."""
    _setup(threads)
    from recstream.eval.metrics import metrics_from_ranks, target_ranks
    from recstream.models.ranker import Ranker, RankingContext
    from recstream.training.ranker import request_times, rerank_scores, split_events
    from recstream.training.two_tower import evaluate_retrieval

    rmeta = CheckpointMeta.model_validate_json((retrieval / "meta.json").read_text())
    sp = _split_of(rmeta)
    cases = _stage_cases(sp, stage)
    model, _ = _load_retrieval(retrieval, sp)
    result: dict[str, Any] = {"retrieval": evaluate_retrieval(model, cases.histories, cases.targets)}
    if ranker is not None:
        rk = Ranker.load(ranker)
        ctx = RankingContext(item_categories(sp), sp.train_seqs, sp.n_items, split_events(sp))
        depth = int(rk.meta.config.get("rerank_depth", 100))
        times = request_times(sp, cases.users, cases.histories)
        scores = rerank_scores(rk, model, ctx, cases.histories, depth, times)
        result["retrieval+ranker"] = metrics_from_ranks(target_ranks(scores, cases.targets, cases.histories))
    result["n_cases"] = len(cases)
    if out is not None:
        write_json(out, result)
    typer.echo(json.dumps(result, indent=2, default=lambda o: float(o) if isinstance(o, np.floating) else str(o)))


if __name__ == "__main__":
    app()

"""`train` and `models list|promote|rollback`: the served models' versions in the model repository
(the continual trainer's registry), registered on the main CLI by recstream.ops.cli."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from recstream.config import get_settings
from recstream.contracts.models import RANKER, TRAINED_MODELS

if TYPE_CHECKING:
    from recstream.continual import ModelRegistry


def setup_logging() -> None:
    logging.basicConfig(level=get_settings().log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


models_app = typer.Typer(help="Ranker versions in the model repository (the continual trainer's registry)")


def _reload_triton(model: str, version: int) -> None:
    from recstream.continual import TritonModelControl

    settings = get_settings()
    try:
        control = TritonModelControl(settings.triton_url, model)  # this model's: it reloaded the ranker
        control.reload()
        control.close()
        typer.echo(f"{model}: live version is now {version} (Triton reloaded)")
    except Exception as exc:  # the registry on disk is already switched; Triton picks it up at its next load
        typer.echo(f"{model}: live version is now {version} on disk; Triton reload failed: {exc}", err=True)
        raise typer.Exit(1) from exc


@models_app.command("list")
def models_list(
    model: str = typer.Option("", help="one model name in MODEL_REPO (default: the trained models)"),
) -> None:
    """Per model: versions on disk with what each was trained on and scored on validation, which
    one is live, the rollback target, and the recent history."""
    from recstream.continual import ModelRegistry
    from recstream.models.training import read_meta

    out = []
    for name in [model] if model else TRAINED_MODELS:
        reg = ModelRegistry(get_settings().model_repo, name)
        state = reg.state()
        described = {}
        for v in reg.versions():
            meta = read_meta(reg.model_dir / str(v))
            if meta is not None:
                described[str(v)] = {
                    "created_utc": meta.created_utc,
                    "git_sha": meta.git_sha,
                    "data_hash": meta.data_hash,
                    "dataset": meta.extra.get("dataset"),
                    **{k: round(x, 4) for k, x in meta.metrics.items() if "valid" in k and isinstance(x, float)},
                }
        out.append(
            {
                "model": name,
                "live": state.get("live"),
                "previous": state.get("previous"),
                "versions": described or reg.versions(),
                "served": reg.served(),
                "history": state.get("history", [])[-10:],
            }
        )
    typer.echo(json.dumps(out[0] if model else out, indent=2))


def train(
    dataset: str = typer.Option("ml-100k", help="built-in name (ml-100k) or a generic-form directory"),
    model_repo: Path = typer.Option(None, help="Triton repository to write (default MODEL_REPO)"),
    version: int = typer.Option(0, help="version number to write (0 = one past the newest of each model)"),
    seed: int = typer.Option(0),
    threads: int = typer.Option(0, help="torch threads (0 = all cores)"),
    export_if_worse: bool = typer.Option(
        False, help="export even when a simple baseline beats the trained models on validation"
    ),
    choose_cold_rule: bool = typer.Option(
        True,
        help="choose how new items are served on the cold-start split's validation cases (trains that "
        "split's models too, or reuses the quality bench's); off: the default rule",
    ),
) -> None:
    """Train the served models (item encoder, session encoder, ranker) on DATASET's leave-last-out
    training part and write them as Triton model versions; prints their validation figures beside
    item-knn's and popularity's, and refuses to export models that lose to either on validation."""
    from recstream.data.datasets import DataFormatError
    from recstream.models.training import configure_threads
    from recstream.training.bundle import cold_rule_for, export_bundle, train_bundle

    setup_logging()
    configure_threads(threads or None)
    try:
        bundle = train_bundle(dataset, seed=seed)
    except DataFormatError as exc:  # raised while reading the files, before any training
        raise typer.BadParameter(str(exc), param_hint="--dataset") from exc
    if choose_cold_rule:
        bundle.cold_rule_choice = cold_rule_for(bundle.split.data, seed, places_new_items=bundle.places_new_items)
    check = _validation_against_baselines(bundle)
    cold = None if bundle.cold_rule_choice is None else bundle.cold_rule_choice.model_dump()
    typer.echo(json.dumps({"stats": bundle.stats, "validation_ndcg10": check, "cold_rule": cold}, indent=2))
    ours = check["served (retrieval + sequence + ranker)"]
    better = {name: v for name, v in check.items() if not name.startswith("served") and v > ours}
    if better and not export_if_worse:
        typer.echo(
            f"not exported: on {dataset}'s validation cases {', '.join(better)} beat the trained models "
            f"(NDCG@10 {ours:.4f} against {', '.join(f'{v:.4f}' for v in better.values())}); serving them would "
            "be worse than the simple baseline. --export-if-worse overrides.",
            err=True,
        )
        raise typer.Exit(2)
    written = export_bundle(bundle, model_repo or get_settings().model_repo, version or None)
    typer.echo(json.dumps({"written": {k: str(v) for k, v in written.items()}}, indent=2))


def _validation_against_baselines(bundle: object) -> dict[str, float]:
    """Validation NDCG@10 (full ranking) of the trained pair and of item-knn and popularity fitted on
    the same training part: the choice to serve is made on validation, never on test."""
    from recstream.eval.baselines import ItemKNN, Popularity
    from recstream.eval.metrics import evaluate
    from recstream.training.bundle import BundleRecommender

    split = bundle.split  # type: ignore[attr-defined]
    valid = split.cases("valid")
    models = {
        "served (retrieval + sequence + ranker)": BundleRecommender().attach(bundle),  # type: ignore[arg-type]
        "item-knn": ItemKNN().fit(split),
        "popularity": Popularity().fit(split),
    }
    return {name: round(float(evaluate(model, valid)["NDCG@10"]), 4) for name, model in models.items()}


@models_app.command("promote")
def models_promote(
    version: int = typer.Argument(..., help="a version newer than the live one"),
    reason: str = typer.Option("manual", help="recorded in the registry history"),
    model: str = typer.Option(RANKER),
) -> None:
    """Make VERSION live (the current live version becomes the rollback target) and reload Triton."""
    try:
        _registry(model).promote(version, reason)
    except (FileNotFoundError, ValueError) as exc:  # no such version; not newer than live
        raise typer.BadParameter(str(exc), param_hint="VERSION") from exc
    _reload_triton(model, version)


@models_app.command("rollback")
def models_rollback(
    reason: str = typer.Option("manual", help="recorded in the registry history"),
    model: str = typer.Option(RANKER),
) -> None:
    """Serve the previous version again and reload Triton."""
    try:
        version = _registry(model).rollback(reason)
    except (FileNotFoundError, RuntimeError) as exc:  # no versions; nothing to roll back to
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    _reload_triton(model, version)


def _registry(model: str) -> ModelRegistry:
    """The registry of a model the repository serves; a typo is refused before anything is written
    (the registry's lock would create the folder, and Triton would try to load it at its next start)."""
    from recstream.continual import ModelRegistry

    repo = get_settings().model_repo
    if not (repo / model / "config.pbtxt").is_file():
        served = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
        raise typer.BadParameter(f"{repo} serves no {model!r}; it serves {', '.join(served)}", param_hint="--model")
    return ModelRegistry(repo, model)

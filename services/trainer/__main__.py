"""CLI of the continual fine-tuning worker.

python -m services.trainer run [--train-every 2000] [--train-every-s 300] [--max-seconds N]
python -m services.trainer rollback [--reason TEXT]     serve the previous version again
python -m services.trainer status                       live/previous/versions/history
"""

from __future__ import annotations

import json
import logging

import typer

from recstream.config import get_settings
from recstream.continual import ModelRegistry, TritonModelControl
from recstream.telemetry import serve_metrics
from services.trainer.config import TrainerConfig
from services.trainer.worker import TrainerService

app = typer.Typer(add_completion=False, help="Continual fine-tuning worker for the Triton ranker.")


@app.command()
def run(
    train_every: int = typer.Option(
        None, help="New examples that trigger a round (default: TRAINER_TRAIN_EVERY_EXAMPLES)"
    ),
    train_every_s: float = typer.Option(
        None, help="Seconds after which a round runs anyway (default: TRAINER_TRAIN_EVERY_S)"
    ),
    min_examples: int = typer.Option(
        None, help="No round before the buffer holds this many (default: TRAINER_MIN_EXAMPLES)"
    ),
    holdout: int = typer.Option(None, help="Newest examples held back for the gate (default: TRAINER_HOLDOUT)"),
    max_seconds: float | None = typer.Option(None, help="Stop after this long (default: run until killed)"),
) -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    serve_metrics(settings.metrics_port)
    cfg = TrainerConfig.from_settings(
        settings,
        train_every_examples=train_every,
        train_every_s=train_every_s,
        min_examples=min_examples,
        holdout=holdout,
    )
    TrainerService(settings, cfg).run(max_seconds=max_seconds)


@app.command()
def rollback(reason: str = typer.Option("manual", help="Recorded in the registry history")) -> None:
    settings = get_settings()
    reg = ModelRegistry(settings.model_repo)
    v = reg.rollback(reason)
    try:
        control = TritonModelControl(settings.triton_url)
        control.reload()
        control.close()
        typer.echo(f"live version is now {v} (Triton reloaded)")
    except Exception as exc:
        typer.echo(f"live version is now {v} on disk; Triton reload failed: {exc}", err=True)
        raise typer.Exit(1) from exc


@app.command()
def status() -> None:
    reg = ModelRegistry(get_settings().model_repo)
    typer.echo(json.dumps({**reg.state(), "versions": reg.versions(), "served": reg.served()}, indent=2))


if __name__ == "__main__":
    app()

"""Continual fine-tuning worker (`python -m services.trainer`)."""

from services.trainer.config import TrainerConfig
from services.trainer.examples import CatalogFeatures, example_from_event
from services.trainer.worker import TrainerService

__all__ = ["CatalogFeatures", "TrainerConfig", "TrainerService", "example_from_event"]

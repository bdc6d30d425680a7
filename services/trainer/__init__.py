"""Continual fine-tuning worker (`python -m services.trainer`)."""

from services.trainer.worker import CatalogFeatures, TrainerConfig, TrainerService, example_from_event

__all__ = ["CatalogFeatures", "TrainerConfig", "TrainerService", "example_from_event"]

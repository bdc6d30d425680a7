"""Clients for the model-serving tier (Triton)."""

from recstream.contracts.models import SERVED_MODELS
from recstream.serving.triton_client import TritonEncoderClient, TritonError, TritonUnavailable

__all__ = ["SERVED_MODELS", "TritonEncoderClient", "TritonError", "TritonUnavailable"]

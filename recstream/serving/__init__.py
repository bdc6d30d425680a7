"""Clients for the model-serving tier (Triton)."""

from recstream.serving.triton_client import SERVED_MODELS, TritonEncoderClient, TritonError, TritonUnavailable

__all__ = ["SERVED_MODELS", "TritonEncoderClient", "TritonError", "TritonUnavailable"]

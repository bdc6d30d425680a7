"""Clients for the model-serving tier (Triton)."""

from recstream.serving.triton_client import TritonEncoderClient, TritonError, TritonUnavailable

__all__ = ["TritonEncoderClient", "TritonError", "TritonUnavailable"]

"""Model code shared by in-process inference, the Triton python backend and fine-tuning.

Exports resolve lazily so that importing a sibling module (or this package) does not pay for
loading transformers until the encoder is actually used.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "EMBEDDING_DIM": "recstream.models.encoder",
    "MODEL_SHA256": "recstream.models.encoder",
    "TextEncoder": "recstream.models.encoder",
    "WeightsMismatchError": "recstream.models.encoder",
    "default_model_dir": "recstream.models.encoder",
    "verify_weights": "recstream.models.encoder",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

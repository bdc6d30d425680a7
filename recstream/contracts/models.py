"""The models of the Triton repository (model_repo/) by name: the contract between the repository,
the exporters and trainers that write versions into it, and every client that calls it."""

from __future__ import annotations

#: MiniLM sentence encoder for queries and item text (v1 zero-shot; later versions fine-tuned).
TEXT_ENCODER = "text_encoder"
#: The trained two-tower model's item tower (item text -> vector in the retrieval space).
ITEM_ENCODER = "item_encoder"
#: The trained two-tower model's session tower (recent item vectors -> session vector).
SESSION_ENCODER = "session_encoder"
#: The second-stage ranker (candidates and features -> logits).
RANKER = "ranker"
#: The ID sequence model (session item ids -> a score per catalogue item): the second candidate source.
SEQUENCE_SCORER = "sequence_scorer"
#: Every model the stack serves.
SERVED_MODELS = (TEXT_ENCODER, ITEM_ENCODER, SESSION_ENCODER, RANKER, SEQUENCE_SCORER)
#: The models `make train` fits (the continual trainer derives new versions of the first three).
TRAINED_MODELS = (ITEM_ENCODER, SESSION_ENCODER, RANKER, SEQUENCE_SCORER)
#: Beside a model's config.pbtxt, the continual trainer's registry of its live and previous versions
#: (recstream.continual.registry). Where it exists, the registry decides what Triton serves.
REGISTRY_STATE_FILE = "registry.json"

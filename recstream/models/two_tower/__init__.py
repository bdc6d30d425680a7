"""Two-tower retrieval model: a fine-tuned MiniLM item tower and a sequential session tower.

Item tower: the pretrained sentence encoder over item text (mean pooling, L2-normalised), fine-tuned
either with LoRA adapters on the attention query/value projections or fully. Because items are
embedded from their text, an item that never occurred in training still gets a useful vector (cold
start), and the vectors are exactly what the `text_encoder` Triton model produces once the tuned
weights are exported (`export_item_encoder`).

Session tower: a small causal transformer over the session's item vectors (most recent last, with
positions counted back from the newest item so "recent" means the same thing for any length), plus
an optional query vector fused into the output. The output is L2-normalised so retrieval is cosine
similarity against item vectors (Qdrant, cosine distance).

Training (offline) lives in recstream.training.two_tower; this module is what serving, export and
the continual workers load.
"""

from recstream.models.two_tower.config import FineTune, TwoTowerConfig
from recstream.models.two_tower.model import TwoTowerModel
from recstream.models.two_tower.towers import ItemTower, SessionTower, ensure_nonempty, pad_histories

__all__ = [
    "FineTune",
    "ItemTower",
    "SessionTower",
    "TwoTowerConfig",
    "TwoTowerModel",
    "ensure_nonempty",
    "pad_histories",
]

"""Interaction data in one generic form, its loaders and the offline evaluation splits."""

from recstream.data.datasets import (
    InteractionData,
    data_hash,
    load_dataset,
    load_generic,
    load_movielens_100k,
    tiny_synthetic,
)
from recstream.data.split import ColdStartSplit, Split, cold_start_split, leave_last_out

__all__ = [
    "ColdStartSplit",
    "InteractionData",
    "Split",
    "cold_start_split",
    "data_hash",
    "leave_last_out",
    "load_dataset",
    "load_generic",
    "load_movielens_100k",
    "tiny_synthetic",
]

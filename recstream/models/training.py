"""Shared training utilities: seeds, early stopping, provenance metadata and checkpoints.

Every checkpoint is a folder with tensors (safetensors) plus `meta.json` so that a model found on
disk can always be traced back to the data, config, code and libraries that produced it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import resource
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from recstream.atomic import atomic_write_text
from recstream.config import REPO_ROOT

log = logging.getLogger(__name__)

ARTIFACTS_DIR = REPO_ROOT / "artifacts"
TRACKED_LIBRARIES = ("torch", "transformers", "peft", "numpy", "pandas", "safetensors")


def set_seed(seed: int) -> None:
    """Seed every RNG we use so two runs with the same config give the same model."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def configure_threads(n: int | None = None) -> int:
    """Cap intra-op threads (the box is shared); returns the count in use."""
    n = n or int(os.environ.get("RECSTREAM_TORCH_THREADS", "0")) or (os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def git_sha(short: bool = False) -> str:
    """Commit of the code that trained a model ('unknown' outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        sha = out.stdout.strip()[: 12 if short else 40]
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown"


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour changes numbers."""
    out: dict[str, str] = {}
    for name in TRACKED_LIBRARIES:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def data_hash(*frames: pd.DataFrame) -> str:
    """Content hash of the training data, stable across processes (pandas row hashing)."""
    h = hashlib.sha256()
    for df in frames:
        h.update(",".join(map(str, df.columns)).encode())
        h.update(pd.util.hash_pandas_object(df, index=False).values.tobytes())
    return h.hexdigest()[:16]


def split_fingerprint(split: Any) -> str:
    """Hash of what a model trains on (train interactions + catalogue size) for a data split.

    Distinguishes the leave-last-out and cold-start splits of the same data set, so a cached
    checkpoint is only reused for exactly the data it was fitted on.
    """
    cols = split.train[["user_idx", "item_idx", "ts"]]
    return data_hash(cols, pd.DataFrame({"item_id": list(split.item_ids)}))


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def timed(label: str, sink: dict[str, float] | None = None) -> Iterator[None]:
    """Log (and optionally record) the wall time of a block."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        dt = time.perf_counter() - t0
        log.info("%s took %.1fs", label, dt)
        if sink is not None:
            sink[label] = dt


@dataclass
class EarlyStopping:
    """Stop when the validation metric has not improved for `patience` evaluations."""

    patience: int = 2
    mode: str = "max"
    min_delta: float = 0.0
    best: float | None = None
    best_step: int = -1
    bad: int = 0
    history: list[float] = field(default_factory=list)

    def step(self, value: float, step: int) -> bool:
        """Record a metric; returns True when this is a new best (caller saves the weights)."""
        self.history.append(value)
        better = (
            self.best is None
            or (self.mode == "max" and value > self.best + self.min_delta)
            or (self.mode == "min" and value < self.best - self.min_delta)
        )
        if better:
            self.best, self.best_step, self.bad = value, step, 0
        else:
            self.bad += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.bad >= self.patience


class CheckpointMeta(BaseModel):
    """Provenance stored next to every set of weights."""

    kind: str = Field(description="two_tower | ranker")
    config: dict[str, Any]
    data_hash: str
    metrics: dict[str, float] = Field(default_factory=dict)
    git_sha: str = Field(default_factory=git_sha)
    library_versions: dict[str, str] = Field(default_factory=library_versions)
    created_utc: str = Field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    extra: dict[str, Any] = Field(default_factory=dict)


def save_checkpoint(path: Path, tensors: dict[str, dict[str, torch.Tensor]], meta: CheckpointMeta) -> Path:
    """Write one safetensors file per named state dict plus meta.json (no pickles)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, state in tensors.items():
        flat = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(flat, str(path / f"{name}.safetensors"))
    # last, and whole: readers take a folder with meta.json as complete (caches compare its key)
    atomic_write_text(path / "meta.json", meta.model_dump_json(indent=2))
    return path


def load_checkpoint(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], CheckpointMeta]:
    """Inverse of save_checkpoint."""
    path = Path(path)
    meta = CheckpointMeta.model_validate_json((path / "meta.json").read_text())
    tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors"))}
    return tensors, meta


def read_meta(path: Path) -> CheckpointMeta | None:
    """The metadata of a checkpoint folder, or None when there is none."""
    f = Path(path) / "meta.json"
    return CheckpointMeta.model_validate_json(f.read_text()) if f.exists() else None


def ndcg_hit_at_k(scores: np.ndarray, targets: np.ndarray, k: int = 10) -> tuple[float, float]:
    """Mean NDCG@k and HR@k of one held-out target per row under full ranking.

    `scores` [n, n_items] must already have seen items set to -inf. Ties count against the
    target (pessimistic), so a constant scorer gets no credit.
    """
    tgt = scores[np.arange(len(targets)), targets]
    rank = (scores >= tgt[:, None]).sum(axis=1) - 1  # 0-based, ties pessimistic
    hit = rank < k
    ndcg = np.where(hit, 1.0 / np.log2(rank + 2.0), 0.0)
    return float(ndcg.mean()), float(hit.mean())


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, sort_keys=True))

"""The trained retrieval model as two servable parts: an item encoder and a session encoder.

`make train` fits the two-tower (recstream.models.two_tower) and splits it for serving:

* item encoder = the text tower (the packaged MiniLM, or a fine-tuned copy in `encoder/`) plus the
  per-item ID residual learned for every item that had training data. A known item's vector is
  normalise(text + residual); an item the model never saw borrows a residual from the known items
  whose text is nearest (`ColdItemRule`), so that a new item competes in recommendations before it
  has any data. This is what the catalog indexer writes to the vector store.
* session encoder = the causal transformer over the session's item vectors (oldest first, the
  vectors as stored), whose output is the retrieval query and the ranker's context.

Both are loaded by their Triton python-backend models (model.py in each version folder) and by the
in-process parity checks from the same classes here, so Triton and in-process outputs agree.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from pydantic import BaseModel, Field
from safetensors.torch import load_file, save_file

from recstream.contracts.models import ITEM_ENCODER, SESSION_ENCODER
from recstream.models.training import CheckpointMeta

DIM = 384


class ColdItemRule(BaseModel):
    """How an item without training data gets an ID residual: the softmax-weighted mean of the
    residuals of the known items whose text vectors are nearest, scaled by `strength`.

    A bare text vector is not competitive under a session tower trained on text + ID vectors (as
    served: cold-start NDCG@10 0.0000 on ml-100k). The defaults are the first candidate of
    `recstream.training.cold_rule.COLD_RULE_GRID`; `make train` ships the candidate that does best
    on the cold-start split's validation cases (bench/README.md, "Cold start")."""

    neighbours: int = Field(5, ge=0, description="Known items the residual is borrowed from (0: text alone)")
    strength: float = Field(2.0, ge=0.0, description="Scale of the borrowed residual (a mean is shorter)")
    temperature: float = Field(0.05, gt=0.0, description="Softmax temperature over the neighbours' cosines")


class ItemEncoder:
    """Text vectors plus the learned ID residual of known items, and a borrowed one for new items
    (see module docstring)."""

    RESIDUAL = "id_residual.safetensors"
    IDS = "item_ids.json"

    def __init__(
        self,
        residual: np.ndarray,
        item_ids: Sequence[str],
        max_text_len: int,
        text_model_dir: Path | None = None,
        known_text: np.ndarray | None = None,
        cold_rule: ColdItemRule | None = None,
    ) -> None:
        """known_text: the text vectors of the known items (rows as `residual`), which new items
        are matched against; without them a new item gets its text vector alone."""
        if residual.shape != (len(item_ids), DIM):
            raise ValueError(f"residual {residual.shape} does not match {len(item_ids)} item ids x {DIM}")
        if known_text is not None and known_text.shape != residual.shape:
            raise ValueError(f"known items' text vectors {known_text.shape} do not match the residual {residual.shape}")
        self.residual = np.asarray(residual, np.float32)
        self.row_of = {str(i): r for r, i in enumerate(item_ids)}
        self.max_text_len = max_text_len
        self.text_model_dir = text_model_dir
        # rounded as `save` stores them, so an encoder in memory and its saved copy agree exactly
        self.known_text = None if known_text is None else np.asarray(known_text, np.float16).astype(np.float32)
        self.cold_rule = cold_rule or ColdItemRule()
        self._text = None

    @property
    def text_encoder(self):
        if self._text is None:
            from recstream.models.encoder import TextEncoder

            self._text = TextEncoder(self.text_model_dir, max_seq_length=self.max_text_len)
        return self._text

    def knows(self, item_id: str) -> bool:
        return str(item_id) in self.row_of

    def borrowed_residual(self, text_vectors: np.ndarray) -> np.ndarray:
        """[n, DIM] residuals for items without training data, from their nearest known items."""
        rule = self.cold_rule
        n = len(text_vectors)
        if self.known_text is None or rule.neighbours == 0 or not len(self.known_text) or not n:
            return np.zeros((n, DIM), np.float32)
        k = min(rule.neighbours, len(self.known_text))
        sim = np.asarray(text_vectors, np.float32) @ self.known_text.T  # [n, n_known]
        top = np.argpartition(-sim, k - 1, axis=1)[:, :k]
        logits = np.take_along_axis(sim, top, axis=1) / rule.temperature
        weights = np.exp(logits - logits.max(1, keepdims=True))
        weights /= weights.sum(1, keepdims=True)
        return (rule.strength * np.einsum("nk,nkd->nd", weights, self.residual[top])).astype(np.float32)

    def combine(self, text_vectors: np.ndarray, item_ids: Sequence[str]) -> np.ndarray:
        """Final vectors from text vectors: + the item's residual (known) or a borrowed one (new),
        re-normalised."""
        out = np.array(text_vectors, dtype=np.float32, copy=True)
        rows = [self.row_of.get(str(i)) for i in item_ids]
        known = np.array([n for n, r in enumerate(rows) if r is not None], dtype=np.int64)
        new = np.array([n for n, r in enumerate(rows) if r is None], dtype=np.int64)
        extra = np.zeros_like(out)
        if len(known):
            extra[known] = self.residual[np.array([rows[n] for n in known])]
        if len(new):
            extra[new] = self.borrowed_residual(out[new])
        changed = np.abs(extra).sum(1) > 0
        mixed = out[changed] + extra[changed]
        out[changed] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True).clip(1e-12)
        return out

    def encode(self, texts: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        if len(texts) != len(item_ids):
            raise ValueError(f"{len(texts)} texts but {len(item_ids)} item ids")
        return self.combine(self.text_encoder.encode(list(texts)), item_ids)

    def save(self, path: Path, meta: CheckpointMeta) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {"weight": torch.from_numpy(self.residual).contiguous()}
        if self.known_text is not None:
            # half precision: only used to find neighbours, and it keeps a version under 5 MB
            tensors["known_text"] = torch.from_numpy(self.known_text).half().contiguous()
        save_file(tensors, str(path / self.RESIDUAL))
        (path / self.IDS).write_text(json.dumps(sorted(self.row_of, key=self.row_of.__getitem__)))
        meta.config.setdefault("max_text_len", self.max_text_len)
        meta.config["cold_rule"] = self.cold_rule.model_dump()
        (path / "meta.json").write_text(meta.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> ItemEncoder:
        path = Path(path)
        meta = CheckpointMeta.model_validate_json((path / "meta.json").read_text())
        tensors = load_file(str(path / cls.RESIDUAL))
        known_text = tensors["known_text"].float().numpy() if "known_text" in tensors else None
        ids = json.loads((path / cls.IDS).read_text())
        encoder_dir = path / "encoder"
        text_dir = encoder_dir if (encoder_dir / "config.json").is_file() else None
        rule = ColdItemRule.model_validate(meta.config.get("cold_rule", {}))
        max_len = int(meta.config.get("max_text_len", 32))
        return cls(tensors["weight"].numpy(), ids, max_len, text_dir, known_text, rule)

    @classmethod
    def from_two_tower(cls, model: object, cold_rule: ColdItemRule | None = None) -> ItemEncoder:
        """The residual and text vector of each item that had training data; the others borrow."""
        has_id = model.has_id.numpy()  # type: ignore[attr-defined]
        rows = np.flatnonzero(has_id)
        weight = model.id_residual.weight.detach().numpy()[rows]  # type: ignore[attr-defined]
        ids = [model.item_ids[r] for r in rows]  # type: ignore[attr-defined]
        text = model.text_vectors  # type: ignore[attr-defined]
        known_text = None if text is None else text.numpy()[rows]
        return cls(weight, ids, model.cfg.max_text_len, known_text=known_text, cold_rule=cold_rule)  # type: ignore[attr-defined]


def item_vectors_as_indexed(model_repo: Path | None, texts: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
    """Item vectors as the catalog indexer makes them: the newest `item_encoder` version in the
    repository (text + learned residual), or the text alone where the repository has none. For
    offline code that must see what serving saw (off-policy rescoring, the trainer's rebuilds)."""
    from recstream.models.repository import latest_version_dir, versions

    if model_repo is not None and versions(model_repo, ITEM_ENCODER):
        return ItemEncoder.load(latest_version_dir(model_repo, ITEM_ENCODER)).encode(texts, item_ids)
    from recstream.models.encoder import TextEncoder

    return TextEncoder().encode(list(texts))


class SessionEncoder:
    """The session tower on its own: item vectors of a session (oldest first) -> a unit vector."""

    WEIGHTS = "session_tower.safetensors"

    def __init__(self, tower: torch.nn.Module, cfg: object) -> None:
        self.tower = tower.eval()
        self.cfg = cfg

    @property
    def max_history(self) -> int:
        return int(self.cfg.max_history)  # type: ignore[attr-defined]

    @torch.inference_mode()
    def encode_padded(self, items: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """items [B, L, 384] left-padded (row b's history is its last lengths[b] rows) -> [B, 384].

        An empty history gives the tower's output for a zero vector (callers without history
        should not ask)."""
        from recstream.models.two_tower import ensure_nonempty

        x = torch.from_numpy(np.ascontiguousarray(items, dtype=np.float32))
        length = x.shape[1]
        lengths = np.clip(np.asarray(lengths, dtype=np.int64).reshape(-1), 0, length)
        valid = torch.from_numpy(np.arange(length)[None, :] >= (length - lengths)[:, None])
        x = x * valid[..., None]
        out = self.tower(x, ensure_nonempty(valid))
        return out[:, -1].numpy().astype(np.float32)

    def encode(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Per session an array [L_i, 384] of item vectors (oldest first) -> [B, 384]."""
        items, lengths = pad_left(histories, self.max_history)
        return self.encode_padded(items, lengths)

    def save(self, path: Path, meta: CheckpointMeta) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.tower.state_dict().items()}
        save_file(state, str(path / self.WEIGHTS))
        (path / "meta.json").write_text(meta.model_dump_json(indent=2))
        return path

    @classmethod
    def load(cls, path: Path) -> SessionEncoder:
        from recstream.models.two_tower import SessionTower, TwoTowerConfig

        path = Path(path)
        meta = CheckpointMeta.model_validate_json((path / "meta.json").read_text())
        cfg = TwoTowerConfig.model_validate(meta.config)
        tower = SessionTower(cfg)
        tower.load_state_dict(load_file(str(path / cls.WEIGHTS)))
        return cls(tower, cfg)


def pad_left(histories: Sequence[np.ndarray], max_history: int) -> tuple[np.ndarray, np.ndarray]:
    """[B, L, 384] float32 with each history's newest `max_history` vectors at the right end, and
    the lengths [B] int32 (L = the longest kept history, at least 1)."""
    kept = [np.asarray(h, np.float32).reshape(-1, DIM)[-max_history:] for h in histories]
    length = max(1, max((len(h) for h in kept), default=1))
    items = np.zeros((len(kept), length, DIM), np.float32)
    for r, h in enumerate(kept):
        if len(h):
            items[r, length - len(h) :] = h
    return items, np.array([len(h) for h in kept], np.int32)


class ServedRetrieval:
    """The exported item and session encoders as the retrieval model offline evaluation expects
    (`item_vectors`, `session_vectors_from_index`, `score_index`): the served models scored
    in-process over a catalogue exactly as the worker scores them (every item by the vector the
    catalog indexer stores), so a figure of what is in the model repository needs no training
    checkpoint."""

    def __init__(self, item: ItemEncoder, session: SessionEncoder, texts: Sequence[str], item_ids: Sequence[str]):
        self.cfg = session.cfg
        self.session = session
        text_vectors = item.text_encoder.encode(list(texts))
        self.text_vectors = torch.from_numpy(text_vectors)  # the text tower alone (bench-search's baseline)
        self.item_vectors = torch.from_numpy(item.combine(text_vectors, item_ids))

    @classmethod
    def from_repo(cls, model_repo: Path, texts: Sequence[str], item_ids: Sequence[str]) -> ServedRetrieval:
        from recstream.models.repository import latest_version_dir

        item = ItemEncoder.load(latest_version_dir(model_repo, ITEM_ENCODER))
        return cls(item, SessionEncoder.load(latest_version_dir(model_repo, SESSION_ENCODER)), texts, item_ids)

    def session_vectors_from_index(self, histories: Sequence[np.ndarray]) -> torch.Tensor:
        vecs = self.item_vectors.numpy()
        return torch.from_numpy(self.session.encode([vecs[np.asarray(h, dtype=np.int64)] for h in histories]))

    def score_index(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return (self.session_vectors_from_index(histories) @ self.item_vectors.T).numpy()

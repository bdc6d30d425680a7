"""TwoTowerModel: both towers, the per-item ID residual, the vector caches for full ranking, and
checkpoint save/load and export."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from recstream.models.training import CheckpointMeta, load_checkpoint, save_checkpoint
from recstream.models.two_tower.config import TwoTowerConfig
from recstream.models.two_tower.towers import ItemTower, SessionTower, ensure_nonempty, pad_histories

log = logging.getLogger(__name__)


class TwoTowerModel(nn.Module):
    """Both towers, the optional per-item ID residual and the vector caches for full ranking.

    An item's vector is normalise(text_vector + id_residual) for items seen in training and the
    plain text vector otherwise (new or cold items): collaborative signal where there is data,
    text where there is none. ID dropout during training keeps text-only vectors competitive.
    """

    def __init__(self, cfg: TwoTowerConfig, model_dir: Path | None = None, item_ids: Sequence[str] = ()) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_tower = ItemTower(cfg, model_dir)
        self.session_tower = SessionTower(cfg)
        self.item_ids: list[str] = [str(i) for i in item_ids]
        self.item_index = {it: i for i, it in enumerate(self.item_ids)}
        n = len(self.item_ids)
        self.id_residual = nn.Embedding(max(n, 1), cfg.dim) if cfg.id_residual else None
        if self.id_residual is not None:
            nn.init.zeros_(self.id_residual.weight)
        self.has_id = torch.zeros(max(n, 1), dtype=torch.bool)
        self.text_vectors: torch.Tensor | None = None  # [n_items, d] text-tower cache, no grad
        self.item_vectors: torch.Tensor | None = None  # [n_items, d] final vectors (text + ID), no grad

    def combine(self, text_vectors: torch.Tensor, keep_id: torch.Tensor | None = None) -> torch.Tensor:
        """Final item vectors from text vectors [n_items, d] (all catalogue rows, in index order)."""
        if self.id_residual is None:
            return text_vectors
        mask = self.has_id if keep_id is None else self.has_id & keep_id
        return F.normalize(text_vectors + self.id_residual.weight * mask[:, None], p=2, dim=-1)

    # serving API --------------------------------------------------------------------------------

    def embed_items(
        self, texts: Sequence[str], item_ids: Sequence[str] | None = None, batch_size: int = 256
    ) -> np.ndarray:
        """Item text -> float32 [n, 384] unit vectors as the model trains on them.

        With `item_ids`, items known from training get their ID residual added; unknown ids get the
        bare text vector. Not what the vector store holds: serving stores the exported item
        encoder's vectors (`recstream.models.served.ItemEncoder.combine`), where an unknown item
        borrows a residual from its text neighbours.
        """
        vecs = self.item_tower.encode(texts, batch_size)
        if item_ids is None or self.id_residual is None:
            return vecs
        with torch.no_grad():
            out = torch.from_numpy(vecs)
            for r, it in enumerate(item_ids):
                i = self.item_index.get(str(it))
                if i is not None and bool(self.has_id[i]):
                    out[r] = F.normalize(out[r] + self.id_residual.weight[i], dim=0)
        return out.numpy()

    def embed_query(self, text: str) -> np.ndarray:
        """Search text -> float32 [384] (same encoder as items)."""
        return self.item_tower.encode([text])[0]

    @torch.no_grad()
    def embed_sessions(self, histories: Sequence[np.ndarray], queries: np.ndarray | None = None) -> np.ndarray:
        """Session vectors [B, 384] from per-session item-vector arrays [L_i, 384] (oldest first).

        `queries` [B, 384] (zeros where a session has no query) adds search intent.
        """
        self.session_tower.eval()
        length = max(1, min(self.cfg.max_history, max((len(h) for h in histories), default=1)))
        x = np.zeros((len(histories), length, self.cfg.dim), dtype=np.float32)
        valid = np.zeros((len(histories), length), dtype=bool)
        for r, h in enumerate(histories):
            h = np.asarray(h, dtype=np.float32).reshape(-1, self.cfg.dim)[-length:]
            if len(h):
                x[r, length - len(h) :] = h
                valid[r, length - len(h) :] = True
        q = torch.from_numpy(np.asarray(queries, dtype=np.float32)) if queries is not None else None
        out = self.session_tower(torch.from_numpy(x), ensure_nonempty(torch.from_numpy(valid)), q)
        return out[:, -1].numpy().astype(np.float32)

    def embed_session(self, history: np.ndarray, query: np.ndarray | None = None) -> np.ndarray:
        """One session: item vectors [L, 384] (oldest first) -> [384]."""
        q = None if query is None else np.asarray(query, dtype=np.float32)[None]
        return self.embed_sessions([history], q)[0]

    # index-based helpers (training / offline evaluation) ---------------------------------------

    @torch.no_grad()
    def session_vectors_from_index(
        self, histories: Sequence[np.ndarray], item_vectors: torch.Tensor | None = None, batch_size: int = 512
    ) -> torch.Tensor:
        """Session vectors [B, d] for histories given as item indices into the cache."""
        vecs = self.item_vectors if item_vectors is None else item_vectors
        assert vecs is not None, "refresh_item_vectors() first"
        self.session_tower.eval()
        out = []
        for lo in range(0, len(histories), batch_size):
            x, valid = pad_histories(histories[lo : lo + batch_size], vecs, self.cfg.max_history)
            out.append(self.session_tower(x, ensure_nonempty(valid))[:, -1])
        return torch.cat(out) if out else torch.zeros(0, self.cfg.dim)

    @torch.no_grad()
    def refresh_item_vectors(self, tokens: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Re-encode the catalogue text (when tokens are given) and rebuild the final vectors."""
        if tokens is not None:
            self.text_vectors = self.item_tower.encode_tokens(tokens)
        assert self.text_vectors is not None
        self.item_vectors = self.combine(self.text_vectors).detach()
        return self.item_vectors

    def score_index(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Full-catalogue scores [B, n_items] (the retrieval stage, offline): cosine to the session
        vector, and for items without training data the cold-start path (`cold_item_scores`)."""
        s = self.session_vectors_from_index(histories)
        assert self.item_vectors is not None
        scores = (s @ self.item_vectors.T).numpy()
        if self.id_residual is not None and self.text_vectors is not None:
            cold = ~self.has_id.numpy()[: scores.shape[1]]
            if cold.any() and (~cold).any():
                scores[:, cold] = self.cold_item_scores(histories, scores, cold)
        return scores

    @torch.no_grad()
    def cold_item_scores(self, histories: Sequence[np.ndarray], scores: np.ndarray, cold: np.ndarray) -> np.ndarray:
        """Scores for items with no ID residual (new / cold items), on the warm items' scale.

        The session tower is trained against text+ID vectors, so a bare text vector is not
        competitive under it (measured: NDCG@10 = 0 on cold targets). Cold items are instead scored
        by content: cosine between their text vector and the mean text vector of the session's
        recent items, then mapped per session onto the mean/std of the warm items' scores, so
        that they compete evenly with warm items without any cold-specific boost.
        """
        assert self.text_vectors is not None
        tv = self.text_vectors
        prof = torch.stack(
            [
                tv[torch.as_tensor(np.asarray(h[-self.cfg.max_history :], dtype=np.int64))].mean(0)
                if len(h)
                else torch.zeros(tv.shape[1])
                for h in histories
            ]
        )
        content = (F.normalize(prof, dim=-1) @ tv.T).numpy()
        warm = ~cold
        mu_c, sd_c = content[:, warm].mean(1, keepdims=True), content[:, warm].std(1, keepdims=True) + 1e-6
        mu_w, sd_w = scores[:, warm].mean(1, keepdims=True), scores[:, warm].std(1, keepdims=True)
        return (content[:, cold] - mu_c) / sd_c * sd_w + mu_w

    # persistence -------------------------------------------------------------------------------

    def state_for_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        """Session tower always; text encoder only what was trained (adapters or all weights)."""
        out = {"session_tower": self.session_tower.state_dict()}
        if self.cfg.finetune == "lora":
            from peft import get_peft_model_state_dict

            out["item_adapter"] = get_peft_model_state_dict(self.item_tower.encoder)
        elif self.cfg.finetune == "full":
            out["item_encoder"] = self.item_tower.encoder.state_dict()
        if self.id_residual is not None:
            out["id_residual"] = {"weight": self.id_residual.weight, "has_id": self.has_id}
        if self.text_vectors is not None:
            out["item_vectors"] = {"text": self.text_vectors}
        return out

    def save(self, path: Path, meta: CheckpointMeta) -> Path:
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "item_ids.json").write_text(json.dumps(self.item_ids))
        # meta.json last (save_checkpoint): a save cut short is retrained, never reused
        return save_checkpoint(path, self.state_for_checkpoint(), meta)

    @classmethod
    def load(cls, path: Path, model_dir: Path | None = None) -> tuple[TwoTowerModel, CheckpointMeta]:
        tensors, meta = load_checkpoint(path)
        cfg = TwoTowerConfig.model_validate(meta.config)
        ids_file = Path(path) / "item_ids.json"
        model = cls(cfg, model_dir, json.loads(ids_file.read_text()) if ids_file.exists() else ())
        model.session_tower.load_state_dict(tensors["session_tower"])
        if cfg.finetune == "lora":
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(model.item_tower.encoder, tensors["item_adapter"])
        elif cfg.finetune == "full":
            model.item_tower.encoder.load_state_dict(tensors["item_encoder"])
        if model.id_residual is not None and "id_residual" in tensors:
            model.id_residual.weight.data.copy_(tensors["id_residual"]["weight"])
            model.has_id = tensors["id_residual"]["has_id"].bool()
        if "item_vectors" in tensors:
            model.text_vectors = tensors["item_vectors"]["text"]
            model.refresh_item_vectors()
        model.eval()
        return model, meta

    def export_item_encoder(self, out_dir: Path) -> Path:
        """A sentence-transformers-layout folder that `TextEncoder(out_dir)` serves unchanged."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.item_tower.merged_encoder().save_pretrained(str(out_dir), safe_serialization=True)
        self.item_tower.tokenizer.save_pretrained(str(out_dir))
        (out_dir / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": self.cfg.max_text_len, "do_lower_case": False})
        )
        (out_dir / "1_Pooling").mkdir(exist_ok=True)
        (out_dir / "1_Pooling" / "config.json").write_text(
            json.dumps({"word_embedding_dimension": self.cfg.dim, "pooling_mode_mean_tokens": True})
        )
        return out_dir

"""Baselines behind one small protocol, so the project's own models are judged against known points.

Protocol (`Recommender`): ``fit(split) -> self`` learns from ``split.train`` / ``split.train_seqs``
only (validation cases may be used for early stopping, test cases never), and
``score(users, histories) -> np.ndarray [batch, n_items]`` scores every catalogue item for a batch of
user indices given their time-ordered history of item indices. Higher is better; the evaluator
masks the history, so models need not.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from pydantic import BaseModel, Field
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from recstream.data.split import Split
from recstream.eval.metrics import evaluate
from recstream.models.co_visitation import binary_matrix, item_similarity
from recstream.models.sequence import SASRecNet
from recstream.models.sequence_fusion import left_pad

log = logging.getLogger(__name__)


@runtime_checkable
class Recommender(Protocol):
    """What the evaluator and the bench need from any model."""

    def fit(self, split: Split) -> Recommender: ...

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray: ...


class RandomScorer:
    """Uniform random scores: the floor every baseline must beat (used in tests)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.n_items = 0

    def fit(self, split: Split) -> RandomScorer:
        self.n_items = split.n_items
        self._rng = np.random.default_rng(self.seed)
        return self

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        return self._rng.random((len(users), self.n_items), dtype=np.float32)


class Popularity:
    """Training interaction count per item: the same list for everyone."""

    def fit(self, split: Split) -> Popularity:
        counts = np.bincount(split.train["item_idx"].to_numpy(), minlength=split.n_items)
        self.counts = counts.astype(np.float32)
        return self

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(users), len(self.counts))).copy()


class ItemKNNConfig(BaseModel):
    topk: int = Field(100, description="Neighbours kept per item (sparsifies the similarity)")
    shrink: float = Field(10.0, description="Shrinks similarities of items with few co-occurrences")


class ItemKNN:
    """Cosine item-item similarity over the binary user-item matrix; score = sum over history."""

    def __init__(self, config: ItemKNNConfig | None = None) -> None:
        self.config = config or ItemKNNConfig()

    def fit(self, split: Split) -> ItemKNN:
        # the ranker's co-visitation feature is this similarity (recstream.models.co_visitation)
        self.sim = item_similarity(split.train_matrix(binary=True), self.config.topk, self.config.shrink)
        self.n_items = split.n_items
        return self

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        h = binary_matrix(histories, self.n_items)
        return np.asarray((h @ self.sim).todense(), dtype=np.float32)


class EarlyStopConfig(BaseModel):
    """The budget rule every learned baseline shares: epochs until validation NDCG@10 stops rising.

    Not wall-clock: a time budget makes a row depend on the machine's speed. 40 epochs and patience
    5 let SASRec converge on ml-100k (with patience 3 one noisy epoch stopped it at epoch 8).
    """

    max_epochs: int = 40
    eval_every: int = 1
    patience: int = Field(5, description="Evaluations without a better validation NDCG@10 before stopping")
    seed: int = 0


def _train_with_early_stopping(
    model: nn.Module,
    run_epoch: Callable[[int], float],
    validate: Callable[[], float],
    cfg: EarlyStopConfig,
    desc: str,
) -> dict[str, Any]:
    """Run epochs, keep the weights with the best validation NDCG@10, stop after `patience` misses."""
    best, best_state, best_epoch, misses = -1.0, None, 0, 0
    bar = tqdm(range(1, cfg.max_epochs + 1), desc=desc, leave=False)
    loss = float("nan")
    for epoch in bar:
        loss = run_epoch(epoch)
        if epoch % cfg.eval_every and epoch != cfg.max_epochs:
            continue
        ndcg = validate()
        bar.set_postfix(loss=f"{loss:.4f}", val_ndcg10=f"{ndcg:.4f}")
        if ndcg > best:
            best, best_state, best_epoch, misses = ndcg, copy.deepcopy(model.state_dict()), epoch, 0
        else:
            misses += 1
            if misses >= cfg.patience:
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"best_val_ndcg10": best, "best_epoch": best_epoch, "epochs_run": epoch, "last_loss": loss}


class BPRConfig(EarlyStopConfig):
    max_epochs: int = 50
    dim: int = 64
    lr: float = 2e-3
    reg: float = Field(1e-4, description="L2 penalty on the embeddings used in a batch")
    batch_size: int = 1024


class _MF(nn.Module):
    def __init__(self, n_users: int, n_items: int, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.bias = nn.Embedding(n_items, 1)
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)
        nn.init.zeros_(self.bias.weight)


class BPRMF:
    """Matrix factorisation trained with the BPR pairwise loss on uniformly sampled negatives."""

    def __init__(self, config: BPRConfig | None = None, seed: int | None = None) -> None:
        self.config = config or BPRConfig()
        if seed is not None:
            self.config = self.config.model_copy(update={"seed": seed})
        self.info: dict[str, Any] = {}

    def fit(self, split: Split) -> BPRMF:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self.net = _MF(split.n_users, split.n_items, cfg.dim)
        opt = torch.optim.Adam(self.net.parameters(), lr=cfg.lr)
        users = torch.as_tensor(split.train["user_idx"].to_numpy(np.int64))
        pos = torch.as_tensor(split.train["item_idx"].to_numpy(np.int64))
        valid = split.cases("valid")

        def run_epoch(epoch: int) -> float:
            self.net.train()
            perm = torch.as_tensor(rng.permutation(len(users)))
            neg_all = torch.as_tensor(rng.integers(0, split.n_items, len(users)))
            total = 0.0
            for lo in range(0, len(perm), cfg.batch_size):
                idx = perm[lo : lo + cfg.batch_size]
                u, i, j = users[idx], pos[idx], neg_all[idx]
                eu, ei, ej = self.net.user(u), self.net.item(i), self.net.item(j)
                x = (eu * (ei - ej)).sum(-1) + (self.net.bias(i) - self.net.bias(j)).squeeze(-1)
                loss = -F.logsigmoid(x).mean() + cfg.reg * (eu.pow(2).sum() + ei.pow(2).sum() + ej.pow(2).sum()) / len(
                    idx
                )
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(idx)
            return total / max(1, len(perm))

        self.info = _train_with_early_stopping(
            self.net, run_epoch, lambda: evaluate(self, valid)["NDCG@10"], cfg, "bpr-mf"
        )
        return self

    @torch.no_grad()
    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        self.net.eval()
        u = self.net.user(torch.as_tensor(np.asarray(users, dtype=np.int64)))
        s = u @ self.net.item.weight.T + self.net.bias.weight.T
        return s.numpy()


class SASRecConfig(EarlyStopConfig):
    dim: int = 64
    layers: int = 2
    heads: int = 2
    max_len: int = 50
    dropout: float = 0.2
    lr: float = 3e-3
    weight_decay: float = 0.0
    batch_size: int = 128


class SASRecID:
    """ID-only SASRec-style next-item model trained with full softmax cross-entropy over all items."""

    name = "sasrec-id"

    def __init__(self, config: SASRecConfig | None = None, seed: int | None = None) -> None:
        self.config = config or SASRecConfig()
        if seed is not None:
            self.config = self.config.model_copy(update={"seed": seed})
        self.info: dict[str, Any] = {}

    def _text_vectors(self, split: Split) -> np.ndarray | None:
        return None

    def _windows(self, seqs: list[np.ndarray]) -> list[np.ndarray]:
        """Non-overlapping windows of max_len+1 from each sequence's end: every transition once."""
        w = self.config.max_len + 1
        out = []
        for s in seqs:
            end = len(s)
            while end >= 2:
                out.append(s[max(0, end - w) : end])
                end -= w - 1
        return out

    def fit(self, split: Split) -> SASRecID:
        cfg = self.config
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        self.net = SASRecNet(split.n_items, cfg, self._text_vectors(split))
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        windows = self._windows(split.train_seqs)
        seq_all = left_pad([w[:-1] for w in windows], cfg.max_len)
        tgt_all = left_pad([w[1:] for w in windows], cfg.max_len)  # 0 where no target
        valid = split.cases("valid")

        def run_epoch(epoch: int) -> float:
            self.net.train()
            perm = rng.permutation(len(seq_all))
            total, n = 0.0, 0
            for lo in range(0, len(perm), cfg.batch_size):
                idx = perm[lo : lo + cfg.batch_size]
                seq, tgt = torch.as_tensor(seq_all[idx]), torch.as_tensor(tgt_all[idx])
                h = self.net(seq)
                mask = tgt > 0
                loss = F.cross_entropy(self.net.logits(h[mask]), tgt[mask] - 1)
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * int(mask.sum())
                n += int(mask.sum())
            return total / max(1, n)

        self.info = _train_with_early_stopping(
            self.net, run_epoch, lambda: evaluate(self, valid)["NDCG@10"], cfg, self.name
        )
        return self

    @torch.no_grad()
    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        self.net.eval()
        seq = torch.as_tensor(left_pad(histories, self.config.max_len))
        h = self.net(seq)[:, -1]
        s = self.net.logits(h)
        empty = torch.as_tensor([len(x) == 0 for x in histories])
        s[empty] = 0.0  # nothing to go on: all ties, ranked pessimistically
        return s.numpy()


class TextEncoderLike(Protocol):
    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray: ...


_EMBED_CACHE: dict[str, np.ndarray] = {}


def text_vectors(texts: list[str], encoder: TextEncoderLike | None = None, batch_size: int = 64) -> np.ndarray:
    """Unit-length pretrained text vectors of `texts`, cached per process by the texts' hash."""
    key = hashlib.sha256(("\x1f".join(texts) + repr(type(encoder))).encode()).hexdigest()
    if key not in _EMBED_CACHE:
        if encoder is None:
            from recstream.models.encoder import TextEncoder  # optional heavy import, on first use

            encoder = TextEncoder()
        emb = np.asarray(encoder.encode(texts, batch_size=batch_size), dtype=np.float32)
        _EMBED_CACHE[key] = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    return _EMBED_CACHE[key]


class SASRecText(SASRecID):
    """SASRec whose item embedding adds a learned projection of the item's frozen MiniLM vector to
    its ID embedding (the UniSRec idea without its MoE adaptor): the ablation that says whether the
    pretrained language model helps a sequential recommender, under the same budget rule.
    Items without training data are scored by their text part alone."""

    name = "sasrec-text"

    def __init__(
        self, config: SASRecConfig | None = None, seed: int | None = None, encoder: TextEncoderLike | None = None
    ) -> None:
        super().__init__(config, seed)
        self.encoder = encoder

    def _text_vectors(self, split: Split) -> np.ndarray | None:
        return text_vectors(split.item_texts, self.encoder)

    def fit(self, split: Split) -> SASRecText:
        super().fit(split)
        # an item never trained keeps its random ID init: zero it, so text alone places it
        seen = np.zeros(split.n_items + 1, dtype=bool)
        seen[split.train["item_idx"].to_numpy(np.int64) + 1] = True
        with torch.no_grad():
            self.net.item.weight[torch.as_tensor(~seen)] = 0.0
        return self


class ZeroShotText:
    """Pretrained text embeddings of items, no training: user = mean of history item embeddings.

    It ranks items never seen in training, which is the point of the cold-start rows. Embeddings
    are cached per process by the hash of the item texts, so the cold-start run re-uses them.
    """

    def __init__(self, encoder: TextEncoderLike | None = None, batch_size: int = 64) -> None:
        self.encoder = encoder
        self.batch_size = batch_size

    def fit(self, split: Split) -> ZeroShotText:
        self.emb = text_vectors(split.item_texts, self.encoder, self.batch_size)
        return self

    def score(self, users: np.ndarray, histories: list[np.ndarray]) -> np.ndarray:
        h = binary_matrix(histories, len(self.emb))
        n = np.maximum(np.asarray(h.sum(axis=1)), 1.0)
        user_vec = np.asarray(h @ self.emb) / n
        return (user_vec @ self.emb.T).astype(np.float32)


BASELINES: dict[str, Callable[[], Recommender]] = {
    "popularity": Popularity,
    "item-knn": ItemKNN,
    "bpr-mf": BPRMF,
    "sasrec-id": SASRecID,
    "sasrec-text": SASRecText,
    "zero-shot-minilm": ZeroShotText,
}

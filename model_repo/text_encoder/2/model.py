"""Triton python-backend model ``text_encoder``: TEXT (bytes) -> EMBEDDING (float32[384]).

How the repository code is found: the python-backend stub runs an *isolated* interpreter, so
PYTHONPATH is ignored (the environment itself is inherited). infra/triton_env.py therefore
exports RECSTREAM_REPO_ROOT and we put it on sys.path here; without it (another launcher) we use the
repo root computed from this file (model_repo/text_encoder/<version>/model.py -> parents[3]), which
is right whenever the model repository is the one inside the checkout. site-packages (torch,
transformers) come from the venv because the launcher puts the venv's bin first on PATH.

Checkpoint choice (recstream.models.encoder.version_text_encoder): ``<version dir>/encoder/`` (a
full fine-tuned checkpoint), else the ``model_dir`` config parameter or the packaged all-MiniLM-L6-v2
weights, with ``<version dir>/adapter/`` (a LoRA query encoder from `make bench-search` / `make
train`) folded in when the version ships one. ``precision`` = int8 quantises the Linear layers.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _add_repo_root() -> None:
    for candidate in (os.environ.get("RECSTREAM_REPO_ROOT"), str(Path(__file__).resolve().parents[3])):
        if candidate and (Path(candidate) / "recstream" / "__init__.py").is_file():
            if candidate not in sys.path:
                sys.path.insert(0, candidate)
            return
    raise ImportError("cannot locate the recstream package: set RECSTREAM_REPO_ROOT for tritonserver")


_add_repo_root()
import recstream.models.encoder as encoder_mod  # noqa: E402 - needs the path set above


class TritonPythonModel:
    """Batches every request handed over by the dynamic batcher into one encoder call."""

    def initialize(self, args: dict) -> None:
        import torch

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        threads = int(params.get("torch_threads") or 2)
        torch.set_num_threads(threads)
        torch.set_num_interop_threads(1)

        version_dir = Path(args["model_repository"]) / args["model_version"]
        base = Path(params["model_dir"]) if params.get("model_dir") else None
        precision = params.get("precision") or "fp32"
        self.encoder = encoder_mod.version_text_encoder(version_dir, base, precision)
        self.max_batch = int(cfg.get("max_batch_size") or 64)
        self.logger = pb_utils.Logger
        adapter = f" + adapter {self.encoder.adapter_dir}" if self.encoder.adapter_dir else ""
        self.logger.log_info(
            f"text_encoder v{args['model_version']} loaded from {self.encoder.model_dir}{adapter} "
            f"({precision}, torch threads={threads}, recstream from {Path(encoder_mod.__file__).parent})"
        )

    def execute(self, requests: list) -> list:
        texts: list[str] = []
        spans: list[tuple[int, int] | None] = []
        errors: dict[int, str] = {}
        for i, request in enumerate(requests):
            raw = pb_utils.get_input_tensor_by_name(request, "TEXT").as_numpy().reshape(-1)
            try:
                decoded = [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in raw]
            except UnicodeDecodeError as exc:
                errors[i] = f"TEXT is not valid UTF-8: {exc}"
                spans.append(None)
                continue
            spans.append((len(texts), len(texts) + len(decoded)))
            texts.extend(decoded)

        vectors = self.encoder.encode(texts, batch_size=self.max_batch)
        responses = []
        for i, span in enumerate(spans):
            if span is None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(errors[i])))
                continue
            out = pb_utils.Tensor("EMBEDDING", np.ascontiguousarray(vectors[span[0] : span[1]]))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses

    def finalize(self) -> None:
        self.encoder = None

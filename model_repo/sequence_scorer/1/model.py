"""Triton python-backend model for recstream.models.sequence.SequenceScorer (written by recstream.models.export)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _import_recstream(params: dict, module: str):
    """`module` from PYTHONPATH, else from the first checkout found: the `recstream_root` parameter,
    RECSTREAM_REPO_ROOT (set by infra/triton_env.py), the checkout this file sits in
    (model_repo/<model>/<v>/model.py -> parents[3])."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        here = Path(__file__).resolve()
        roots = [
            params.get("recstream_root", ""),
            os.environ.get("RECSTREAM_REPO_ROOT", ""),
            str(here.parents[3]) if len(here.parents) > 3 else "",
        ]
        for root in roots:
            if root and (Path(root) / "recstream" / "__init__.py").is_file():
                sys.path.insert(0, root)
                break
        return importlib.import_module(module)


def _strings(request, name: str) -> list[str]:
    raw = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
    return [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in raw]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads") or 1))
        torch.set_num_interop_threads(1)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.model = _import_recstream(params, "recstream.models.sequence").SequenceScorer.load(version_dir)
        pb_utils.Logger.log_info(f"sequence_scorer v{args['model_version']} loaded from {version_dir}")

    def execute(self, requests: list) -> list:
        out = []
        for request in requests:  # one request = one batch of sessions, already padded alike
            try:
                history = pb_utils.get_input_tensor_by_name(request, "HISTORY").as_numpy()
                scores = self.model.score_padded(history)
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORES", scores)]))
            except Exception as exc:  # one bad request must not fail the others
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return out

"""Triton python-backend model: CONTEXT, CANDIDATES, CAND_FEATURES -> SCORES (written by
recstream.models.export; scoring code lives in recstream.models.ranker)."""

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


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        torch.set_num_threads(int(params.get("torch_threads") or 1))
        Ranker = _import_recstream(params, "recstream.models.ranker").Ranker
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.ranker = Ranker.load(version_dir)  # raises on a feature-schema mismatch
        pb_utils.Logger.log_info(f"ranker v{args['model_version']} loaded from {version_dir}")

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                ctx = pb_utils.get_input_tensor_by_name(request, "CONTEXT").as_numpy()
                cand = pb_utils.get_input_tensor_by_name(request, "CANDIDATES").as_numpy()
                feats = pb_utils.get_input_tensor_by_name(request, "CAND_FEATURES").as_numpy()
                scores = self.ranker.score_batch(ctx, cand, feats).astype(np.float32)
                out = pb_utils.Tensor("SCORES", scores)
                responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
            except Exception as exc:  # one bad request must not fail the others
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return responses

"""The ranker as a Triton python-backend model: config.pbtxt, a generic model.py that loads
recstream.models.ranker.Ranker, and the weights."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from recstream.atomic import atomic_publish_dir, atomic_write_text
from recstream.contracts.models import RANKER, REGISTRY_STATE_FILE
from recstream.models.export.common import IMPORT_RECSTREAM, keep_version_policy, next_version_dir, repo_extras
from recstream.models.ranker import CONTEXT_DIM, ITEM_DIM, N_CAND_FEATURES, Ranker

log = logging.getLogger(__name__)


CONFIG_TEMPLATE = """\
# Second-stage ranker (small MLP over precomputed vectors) on the Triton python backend (CPU).
# Written by recstream.models.export; model.py imports recstream.models.ranker, the same code the
# in-process scorer runs, so scores agree with in-process scoring.
name: "{name}"
backend: "python"

# One request = one recommendation: CONTEXT [1, {ctx}], CANDIDATES [1, n, {item}], CAND_FEATURES [1, n, {k}].
max_batch_size: {max_batch_size}

# The newest {serve_versions} version folder(s) are served; a client may pin one with model_version.
version_policy: {{ latest {{ num_versions: {serve_versions} }} }}

input [
  {{
    name: "CONTEXT"
    data_type: TYPE_FP32
    dims: [ {ctx} ]
  }},
  {{
    name: "CANDIDATES"
    data_type: TYPE_FP32
    dims: [ -1, {item} ]
  }},
  {{
    name: "CAND_FEATURES"
    data_type: TYPE_FP32
    dims: [ -1, {k} ]
  }}
]
output [
  {{
    name: "SCORES"
    data_type: TYPE_FP32
    dims: [ -1 ]
  }}
]

# Requests that arrive together are handed over in one execute() call; the MLP is cheap, so the
# delay is kept tiny (0.5 ms) against the 50 ms request budget.
dynamic_batching {{
  max_queue_delay_microseconds: 500
}}

instance_group [
  {{
    kind: KIND_CPU
    count: 1
  }}
]

# One thread: a [100, 1161] x [1161, 128] product gains nothing from more and would contend with
# the text encoder on this 2-core box.
parameters: {{
  key: "torch_threads"
  value: {{ string_value: "1" }}
}}
{extra}"""


MODEL_PY = (
    '''\
"""Triton python-backend model: CONTEXT, CANDIDATES, CAND_FEATURES -> SCORES (written by
recstream.models.export; scoring code lives in recstream.models.ranker)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


'''
    + IMPORT_RECSTREAM
    + """

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
"""
)


def export_ranker(
    ranker: Ranker,
    model_repo: Path,
    version: int | None = None,
    name: str = RANKER,
    max_batch_size: int = 8,
    overwrite: bool = False,
    serve_versions: int = 1,
) -> Path:
    """Write a version folder (complete or not at all) and config.pbtxt; returns the version folder.

    version None = one past the newest existing version (Triton serves the latest by default).
    Where the continual trainer's registry manages the model, its version_policy is kept: the new
    version is published, not served, until `models promote` (an export used to reset the policy,
    so Triton's next start served the ungated version and unloaded the rollback target).
    A repository outside this checkout gets a `recstream_root` parameter so model.py finds the code.
    """
    vdir, v = next_version_dir(model_repo, name, version)
    model_dir = vdir.parent
    if vdir.exists() and any(vdir.iterdir()) and not overwrite:
        raise FileExistsError(f"{vdir} exists; pass overwrite=True or another version")
    ranker.meta.extra["version"] = v

    def fill(staging: Path) -> None:
        ranker.save(staging)
        (staging / "model.py").write_text(MODEL_PY)

    if vdir.exists():  # empty, or overwrite asked for
        shutil.rmtree(vdir)
    atomic_publish_dir(vdir, fill)
    config = model_dir / "config.pbtxt"
    text = CONFIG_TEMPLATE.format(
        name=name,
        ctx=CONTEXT_DIM,
        item=ITEM_DIM,
        k=N_CAND_FEATURES,
        max_batch_size=max_batch_size,
        serve_versions=serve_versions,
        extra=repo_extras(model_dir, {"rerank_depth": str(int(ranker.meta.config.get("rerank_depth", 100)))}),
    )
    if (model_dir / REGISTRY_STATE_FILE).is_file() and config.is_file():
        text = keep_version_policy(text, config.read_text())
    atomic_write_text(config, text)
    size = sum(p.stat().st_size for p in vdir.iterdir())
    log.info("exported ranker v%d to %s (%.1f kB)", v, vdir, size / 1024)
    return vdir

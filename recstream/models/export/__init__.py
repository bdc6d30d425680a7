"""Export versions into the Triton model repository: the ranker, the item and session encoders, the
query encoder (reading it back: recstream.models.repository).

Layout (python backend: it is the only backend in the pytriton-shipped tritonserver):

    model_repo/ranker/config.pbtxt
    model_repo/ranker/<version>/model.py            generic loader (this file writes it)
    model_repo/ranker/<version>/ranker.safetensors  tensors only
    model_repo/ranker/<version>/meta.json           git SHA, data hash, feature schema + hash, versions

model.py imports `recstream.models.ranker` (infra/triton_env.py exports the repo root as RECSTREAM_REPO_ROOT;
model.py also falls back to the root computed from its own path) and scores with the same
`RankerNet.forward` as in-process code, so Triton and in-process scores agree to float rounding.
The loader refuses weights whose feature-schema hash differs from the code's.
"""

from recstream.models.export.common import ROOT_PARAM, set_config_param
from recstream.models.export.encoders import (
    export_item_encoder,
    export_query_encoder,
    export_sequence_scorer,
    export_session_encoder,
)
from recstream.models.export.ranker import MODEL_PY, export_ranker

__all__ = [
    "MODEL_PY",
    "ROOT_PARAM",
    "export_item_encoder",
    "export_query_encoder",
    "export_ranker",
    "export_sequence_scorer",
    "export_session_encoder",
    "set_config_param",
]

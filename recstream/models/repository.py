"""The Triton model repository as serving and tools read it: a model's version folders, the newest
one, the exported ranker and sequence model loaded back, and one ranker call over Triton HTTP. Writing versions is
recstream.models.export."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from recstream.contracts.models import RANKER, SEQUENCE_SCORER
from recstream.models.ranker import Ranker
from recstream.models.sequence import SequenceScorer


def versions(model_repo: Path, name: str = RANKER) -> list[int]:
    """Numeric version folders present for a model, ascending."""
    d = Path(model_repo) / name
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def latest_version_dir(model_repo: Path, name: str) -> Path:
    """The newest version folder of a model; FileNotFoundError says how to make one."""
    vs = versions(model_repo, name)
    if not vs:
        raise FileNotFoundError(f"no version of {name} under {model_repo}: run `make train`")
    return Path(model_repo) / name / str(vs[-1])


def load_exported(model_repo: Path, name: str = RANKER, version: int | None = None) -> Ranker:
    """The exported ranker (latest version by default), for in-process scoring or checks."""
    vs = versions(model_repo, name)
    if not vs:
        raise FileNotFoundError(f"no versions of {name} under {model_repo}")
    v = version if version is not None else vs[-1]
    return Ranker.load(Path(model_repo) / name / str(v))


def load_sequence_scorer(model_repo: Path) -> SequenceScorer | None:
    """The newest exported sequence model (None: the repository has none, lists go without it)."""
    if not versions(model_repo, SEQUENCE_SCORER):
        return None
    return SequenceScorer.load(latest_version_dir(model_repo, SEQUENCE_SCORER))


def triton_score(
    url: str,
    context: np.ndarray,
    candidates: np.ndarray,
    cand_features: np.ndarray,
    model_name: str = RANKER,
    model_version: str = "",
    client: object | None = None,
    timeout_s: float | None = None,
) -> np.ndarray:
    """Score one request through Triton HTTP: [768], [n, 384], [n, K] -> [n] float32."""
    import tritonclient.http as httpclient

    own = client is None
    cl = client or httpclient.InferenceServerClient(url=url, network_timeout=timeout_s or 60.0)
    try:
        arrays = {
            "CONTEXT": np.ascontiguousarray(context, dtype=np.float32)[None],
            "CANDIDATES": np.ascontiguousarray(candidates, dtype=np.float32)[None],
            "CAND_FEATURES": np.ascontiguousarray(cand_features, dtype=np.float32)[None],
        }
        inputs = []
        for key, arr in arrays.items():
            inp = httpclient.InferInput(key, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr, binary_data=True)
            inputs.append(inp)
        out = [httpclient.InferRequestedOutput("SCORES", binary_data=True)]
        res = cl.infer(model_name, inputs, outputs=out, model_version=model_version)  # type: ignore[attr-defined]
        return res.as_numpy("SCORES")[0]
    finally:
        if own:
            cl.close()  # type: ignore[attr-defined]

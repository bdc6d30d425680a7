"""The retrieval model's servable parts (recstream.models.served: item and session encoders), the
sequence model (recstream.models.sequence) and the fine-tuned query encoder as Triton
python-backend versions."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from recstream.atomic import atomic_publish_dir, atomic_write_text
from recstream.contracts.models import ITEM_ENCODER, SEQUENCE_SCORER, SESSION_ENCODER, TEXT_ENCODER
from recstream.models.export.common import IMPORT_RECSTREAM, next_version_dir, repo_extras, set_config_param
from recstream.models.ranker import ITEM_DIM
from recstream.models.repository import versions

log = logging.getLogger(__name__)


ENCODER_CONFIG = """\
# {what} on the Triton python backend (CPU). Written by recstream.models.export; model.py loads
# {module}.{cls}, the class the in-process parity checks use.
name: "{name}"
backend: "python"
max_batch_size: {max_batch_size}
# Two versions stay loaded: {two_versions}
version_policy: {{ latest {{ num_versions: 2 }} }}

input [
{inputs}
]
output [
  {{
    name: "{output}"
    data_type: TYPE_FP32
    dims: [ {out_dims} ]
  }}
]

# Concurrent callers (catalog batches, request batches of several partitions) are merged.
dynamic_batching {{
  max_queue_delay_microseconds: {delay_us}
}}

instance_group [
  {{
    kind: KIND_CPU
    count: 1
  }}
]

parameters: {{
  key: "torch_threads"
  value: {{ string_value: "{threads}" }}
}}
{extra}"""

#: Why a model keeps two versions loaded (the config comment; the worker moves between them).
ENCODER_PINNING = """the worker pins the one its item vectors came from while it re-embeds
# the catalog with a new one (streams.catalog_indexer.EncoderFollower)."""
SEQUENCE_PINNING = """the worker keeps calling the one whose item rows it read until it has
# read the next one's (streams.inference.TritonSequenceScorer.follow_version)."""

_INPUT = """  {{
    name: "{name}"
    data_type: {dtype}
    dims: [ {dims} ]
  }}"""

SERVED_MODEL_PY = '''\
"""Triton python-backend model for {module}.{cls} (written by recstream.models.export)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


{helper}


def _strings(request, name: str) -> list[str]:
    raw = pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)
    return [b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in raw]


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        import torch

        cfg = json.loads(args["model_config"])
        params = {{k: v.get("string_value", "") for k, v in cfg.get("parameters", {{}}).items()}}
        torch.set_num_threads(int(params.get("torch_threads") or 1))
        torch.set_num_interop_threads(1)
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self.model = _import_recstream(params, "{module}").{cls}.load(version_dir)
        pb_utils.Logger.log_info(f"{name} v{{args['model_version']}} loaded from {{version_dir}}")

    def execute(self, requests: list) -> list:
{execute}
'''

ITEM_EXECUTE = """\
        texts: list[str] = []
        ids: list[str] = []
        spans: list[tuple[int, int] | str] = []
        for request in requests:
            try:
                t, i = _strings(request, "TEXT"), _strings(request, "ITEM_ID")
            except UnicodeDecodeError as exc:
                spans.append(f"TEXT/ITEM_ID is not valid UTF-8: {exc}")
                continue
            if len(t) != len(i):
                spans.append(f"{len(t)} texts but {len(i)} item ids")
                continue
            spans.append((len(texts), len(texts) + len(t)))
            texts += t
            ids += i
        vectors = self.model.encode(texts, ids) if texts else np.zeros((0, 384), np.float32)
        out = []
        for span in spans:
            if isinstance(span, str):
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(span)))
            else:
                emb = np.ascontiguousarray(vectors[span[0] : span[1]])
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("EMBEDDING", emb)]))
        return out"""

SESSION_EXECUTE = """\
        out = []
        for request in requests:  # one request = one batch of sessions, already padded alike
            try:
                items = pb_utils.get_input_tensor_by_name(request, "ITEMS").as_numpy()
                lengths = pb_utils.get_input_tensor_by_name(request, "LENGTH").as_numpy().reshape(-1)
                session = self.model.encode_padded(items, lengths)
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SESSION", session)]))
            except Exception as exc:  # one bad request must not fail the others
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return out"""


def _export_served(
    part: object,
    meta: object,
    model_repo: Path,
    version: int | None,
    *,
    name: str,
    cls: str,
    what: str,
    inputs: list[tuple[str, str, str]],
    output: str,
    execute: str,
    max_batch_size: int,
    delay_us: int,
    threads: int,
    params: dict[str, str] | None = None,
    module: str = "recstream.models.served",
    out_dims: str = str(ITEM_DIM),
    two_versions: str = ENCODER_PINNING,
) -> Path:
    vdir, v = next_version_dir(model_repo, name, version)
    model_dir = vdir.parent
    meta.extra["version"] = v  # type: ignore[attr-defined]

    def fill(staging: Path) -> None:
        part.save(staging, meta)  # type: ignore[attr-defined]
        (staging / "model.py").write_text(
            SERVED_MODEL_PY.format(
                cls=cls, name=name, execute=execute, helper=IMPORT_RECSTREAM.rstrip("\n"), module=module
            )
        )

    # complete or not at all: an export killed half-way left a torn version that Triton's next
    # start (or the worker's pinned load) tried to serve
    if vdir.exists():
        shutil.rmtree(vdir)
    atomic_publish_dir(vdir, fill)
    atomic_write_text(
        model_dir / "config.pbtxt",
        ENCODER_CONFIG.format(
            what=what,
            cls=cls,
            module=module,
            name=name,
            max_batch_size=max_batch_size,
            inputs=",\n".join(_INPUT.format(name=n, dtype=t, dims=d) for n, t, d in inputs),
            output=output,
            out_dims=out_dims,
            delay_us=delay_us,
            threads=threads,
            extra=repo_extras(model_dir, params or {}),
            two_versions=two_versions,
        ),
    )
    size = sum(p.stat().st_size for p in vdir.iterdir())
    log.info("exported %s v%d to %s (%.1f kB)", name, v, vdir, size / 1024)
    return vdir


def export_item_encoder(encoder: object, meta: object, model_repo: Path, version: int | None = None) -> Path:
    """TEXT, ITEM_ID -> EMBEDDING: what the catalog indexer writes to the vector store."""
    return _export_served(
        encoder,
        meta,
        model_repo,
        version,
        name=ITEM_ENCODER,
        cls="ItemEncoder",
        what="Item encoder (MiniLM text tower + learned ID residual of known items)",
        inputs=[("TEXT", "TYPE_STRING", "1"), ("ITEM_ID", "TYPE_STRING", "1")],
        output="EMBEDDING",
        execute=ITEM_EXECUTE,
        max_batch_size=64,
        delay_us=2000,
        threads=2,
    )


def export_session_encoder(encoder: object, meta: object, model_repo: Path, version: int | None = None) -> Path:
    """ITEMS [L, 384] (left-padded), LENGTH [1] -> SESSION [384]: one call per request batch."""
    return _export_served(
        encoder,
        meta,
        model_repo,
        version,
        name=SESSION_ENCODER,
        cls="SessionEncoder",
        what="Session encoder (causal transformer over the session's item vectors)",
        inputs=[("ITEMS", "TYPE_FP32", f"-1, {ITEM_DIM}"), ("LENGTH", "TYPE_INT32", "1")],
        output="SESSION",
        execute=SESSION_EXECUTE,
        max_batch_size=64,
        delay_us=500,
        threads=1,
        params={"max_history": str(encoder.max_history)},  # type: ignore[attr-defined]
    )


SEQUENCE_EXECUTE = """\
        out = []
        for request in requests:  # one request = one batch of sessions, already padded alike
            try:
                history = pb_utils.get_input_tensor_by_name(request, "HISTORY").as_numpy()
                scores = self.model.score_padded(history)
                out.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("SCORES", scores)]))
            except Exception as exc:  # one bad request must not fail the others
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))))
        return out"""


def export_sequence_scorer(scorer: object, meta: object, model_repo: Path, version: int | None = None) -> Path:
    """HISTORY [L] (catalogue rows + 1, left-padded with 0) -> SCORES [n_items] (NaN: no training
    data); the rows are those of the version's item_ids.json. One call per request batch."""
    return _export_served(
        scorer,
        meta,
        model_repo,
        version,
        name=SEQUENCE_SCORER,
        cls="SequenceScorer",
        what="ID sequence model (SASRec over the session's item ids, the second candidate source)",
        inputs=[("HISTORY", "TYPE_INT64", "-1")],
        output="SCORES",
        execute=SEQUENCE_EXECUTE,
        max_batch_size=64,
        delay_us=500,
        threads=1,
        params={"max_history": str(scorer.max_len)},  # type: ignore[attr-defined]
        module="recstream.models.sequence",
        out_dims="-1",
        two_versions=SEQUENCE_PINNING,
    )


def export_query_encoder(
    adapter_dir: Path, meta: object, model_repo: Path, weights: object, version: int | None = None
) -> Path:
    """A new `text_encoder` version serving the fine-tuned query encoder: its LoRA adapter in
    `<v>/adapter/` over the packaged MiniLM, the model.py of the newest version (the text_encoder
    code is the same for every version), and meta.json (data, the item encoder version whose
    vectors it was trained into, validation figures). Only search queries use text_encoder while
    an item_encoder is served, so the vector store keeps its item vectors. `weights`
    (recstream.search.served.SearchWeights) go into the model's config as `search_weights`, which
    the worker reads to answer searches with the hybrid search."""
    model_dir = Path(model_repo) / TEXT_ENCODER
    existing = versions(model_repo, TEXT_ENCODER)
    if not existing:
        raise FileNotFoundError(f"{model_dir} has no version to take model.py from")
    v = version if version is not None else max(existing) + 1
    vdir = model_dir / str(v)
    if vdir.exists():
        shutil.rmtree(vdir)
    meta.extra["version"] = v  # type: ignore[attr-defined]

    def fill(staging: Path) -> None:
        shutil.copy(model_dir / str(max(existing)) / "model.py", staging / "model.py")
        # the adapter without peft's blank model card
        shutil.copytree(adapter_dir, staging / "adapter", ignore=shutil.ignore_patterns("README.md"))
        (staging / "meta.json").write_text(meta.model_dump_json(indent=2))  # type: ignore[attr-defined]

    # staged and renamed: the trainer writes versions while Triton serves this folder, and a crash
    # mid-write must not leave a half-written highest version for Triton's next start to load
    atomic_publish_dir(vdir, fill)
    set_config_param(model_dir / "config.pbtxt", "search_weights", weights.model_dump_json())  # type: ignore[attr-defined]
    log.info("exported %s v%d (LoRA adapter) to %s", TEXT_ENCODER, v, vdir)
    return vdir

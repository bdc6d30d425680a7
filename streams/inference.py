"""Model calls the agents make on Triton: query/item text embedding, session encoding and the
sequence model's scores (the ranker backends: streams.rankers).

All calls here are blocking (tritonclient gRPC); agents run them in a thread pool so a slow model
never blocks the event loop that also applies behaviour events. Every failure becomes
ModelUnavailable, which the agents turn into degraded answers.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import numpy as np

from recstream.config import Settings
from recstream.contracts.models import ITEM_ENCODER, SEQUENCE_SCORER, SESSION_ENCODER, TEXT_ENCODER
from recstream.recommend.breaker import CircuitBreaker
from recstream.telemetry import TRITON_ERRORS, TRITON_LATENCY

log = logging.getLogger(__name__)

#: Seconds between checks of which text_encoder version Triton serves (TritonTextEmbedder.follow_version).
VERSION_CHECK_S = 30.0
#: "Not read yet" (None means: read, and the version carries no search weights).
UNKNOWN = object()
_ZEROS = np.zeros(384, np.float32)


class ModelUnavailable(RuntimeError):
    """A model call failed or missed its deadline; the caller answers degraded."""


class ModelRefused(ModelUnavailable):
    """Triton rejected the request itself (malformed input, or a worker and model that disagree on
    the inputs): asking again gets the same answer until one of them changes."""


class TextEmbedder(Protocol):
    def encode(self, texts: Sequence[str], timeout_s: float, use_breaker: bool = True) -> np.ndarray: ...


class TritonTextEmbedder:
    """text_encoder on Triton with a small LRU for repeated queries and a circuit breaker."""

    def __init__(self, settings: Settings, cache_size: int = 4096, model: str = TEXT_ENCODER) -> None:
        from recstream.serving.triton_client import TritonEncoderClient

        self.model = model
        self._client = TritonEncoderClient(
            settings.triton_grpc_url, timeout_s=settings.triton_timeout_s, model_name=model
        )
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.breaker = CircuitBreaker()
        #: '<model>-v<N>' last seen served; a new version (the continual trainer's) empties the cache.
        self.version = ""
        self._version_checked = 0.0
        #: The hybrid-search weights read with the last version change (UNKNOWN until then).
        self.weights_seen: object = UNKNOWN

    def served_tag(self) -> str:
        """'<model>-v<N>' of the newest version Triton serves, '' when it cannot say (the store's
        vectors are then left as they are)."""
        tag = served_version(self._client._client, self.model)
        return tag if "-v" in tag else ""

    def search_weights(self):
        """The hybrid-search weights the served version's config carries (None: no hybrid search);
        raises ModelUnavailable when Triton cannot say (the caller asks again later)."""
        from recstream.search.served import SearchWeights

        cfg = model_config(self._client._client, self.model)
        if not cfg:
            raise ModelUnavailable(f"{self.model}: config unavailable")
        try:
            return SearchWeights.from_model_config(cfg)
        except ValueError as exc:
            log.error("%s: unreadable search weights, searches go through the ranker: %s", self.model, exc)
            return None

    def follow_version(self, every_s: float = VERSION_CHECK_S) -> None:
        """At most every `every_s`, ask Triton (in a background thread: a hung server must not hold
        a request) which version it serves; when it changed, cached query vectors are dropped."""
        now = time.monotonic()
        if now - self._version_checked < every_s:
            return
        self._version_checked = now

        def check() -> None:
            tag = self.served_tag()
            if tag and tag != self.version:
                try:
                    weights = self.search_weights()  # the config may have changed with the version
                except ModelUnavailable:
                    return  # asked again at the next check
                with self._lock:
                    if self.version:
                        log.info("%s now serves %s (was %s): query cache cleared", self.model, tag, self.version)
                    self._cache.clear()
                    self.version, self.weights_seen = tag, weights

        threading.Thread(target=check, name=f"{self.model}-version", daemon=True).start()

    def cached(self, text: str) -> np.ndarray | None:
        with self._lock:
            vec = self._cache.get(text)
            if vec is not None:
                self._cache.move_to_end(text)
            return vec

    def encode(
        self,
        texts: Sequence[str],
        timeout_s: float,
        use_breaker: bool = True,
        item_ids: Sequence[str] | None = None,
    ) -> np.ndarray:
        """[n, 384] normalised; raises ModelUnavailable (fast, while the breaker is open).

        Bulk callers (catalog indexing) pass use_breaker=False: they retry on their own schedule
        and must not be refused because online requests recently failed. `item_ids` is for the
        item_encoder model (known items get their learned residual)."""
        from recstream.serving.triton_client import TritonError, TritonUnavailable

        if not texts:
            return np.zeros((0, 384), np.float32)
        if use_breaker and not self.breaker.allow():
            raise ModelUnavailable(f"{self.model}: circuit open after a recent failure")
        t0 = time.perf_counter()
        try:
            ids = None if item_ids is None else list(item_ids)
            out = self._client.encode_texts(list(texts), timeout_s=timeout_s, item_ids=ids)
        except TritonError as exc:
            if use_breaker:  # a slow bulk batch must not open (or close) the breaker online queries use
                self.breaker.failure()
            TRITON_ERRORS.labels(model=self.model, kind=type(exc).__name__).inc()
            kind = ModelUnavailable if isinstance(exc, TritonUnavailable) else ModelRefused
            raise kind(f"{self.model}: {exc}") from exc
        if use_breaker:
            self.breaker.success()
        TRITON_LATENCY.labels(model=self.model).observe(time.perf_counter() - t0)
        if item_ids is None and len(texts) <= 8:  # queries, not catalog batches, are worth caching
            with self._lock:
                for text, vec in zip(texts, out, strict=True):
                    self._cache[text] = vec
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
        return out

    def close(self) -> None:
        self._client.close()


@contextmanager
def guarded_call(model: str, breaker: CircuitBreaker, report: bool = True) -> Iterator[None]:
    """One model call behind its circuit breaker: a failure opens it, is counted in
    triton_errors_total and raised as ModelUnavailable; a success is timed in triton_latency.
    `report=False` (background work) backs off while the breaker is open but neither takes its
    probe nor tells it the outcome: live requests' breaker follows live requests' calls."""
    refused = not breaker.allow() if report else breaker.refusing()
    if refused:
        raise ModelUnavailable(f"{model}: circuit open after a recent failure")
    t0 = time.perf_counter()
    try:
        yield
    except Exception as exc:
        if report:
            breaker.failure()
        TRITON_ERRORS.labels(model=model, kind=type(exc).__name__).inc()
        raise ModelUnavailable(f"{model}: {exc}") from exc
    if report:
        breaker.success()
    TRITON_LATENCY.labels(model=model).observe(time.perf_counter() - t0)


def model_ready(settings: Settings, model: str) -> bool:
    """One readiness probe at start-up (2 s: a loaded server answers in ~1 ms); False when unknown."""
    try:
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(settings.triton_grpc_url)
        try:
            return bool(client.is_model_ready(model, client_timeout=2.0))
        finally:
            client.close()
    except Exception as exc:
        log.info("%s readiness probe failed: %s", model, exc)
        return False


def served_version(client: object, model: str) -> str:
    """'<model>-v<highest served version>' from Triton's metadata, or the bare name. Versions change
    live (promotion, rollback), so callers also read the version of each response."""
    try:
        # Metadata is one small RPC at start-up; 2 s covers a busy server.
        versions = list(client.get_model_metadata(model, client_timeout=2.0).versions)  # type: ignore[attr-defined]
        return f"{model}-v{max(versions, key=int)}" if versions else model
    except Exception as exc:
        log.warning("%s metadata unavailable (%s); version reported as %r", model, exc, model)
        return model


def model_config(client: object, model: str) -> dict:
    """The model's config.pbtxt as Triton serves it (JSON form), {} when it cannot be read."""
    try:
        return client.get_model_config(model, as_json=True, client_timeout=2.0)["config"]  # type: ignore[attr-defined]
    except Exception as exc:
        log.warning("%s config unavailable (%s)", model, exc)
        return {}


def config_param(cfg: dict, key: str, default: int) -> int:
    """An integer `parameters` entry of a model config (export writes rerank_depth, max_history)."""
    return int(cfg.get("parameters", {}).get(key, {}).get("string_value") or default)


def matching_session_version(store_tag: str) -> str | None:
    """The session-encoder version that belongs to the store's item vectors: the same number as the
    item encoder that made them (`make train` writes both together). None when the vectors are not
    a trained item encoder's (zero-shot text vectors): the session encoder must not be used then."""
    prefix = f"{ITEM_ENCODER}-v"
    return store_tag[len(prefix) :] if store_tag.startswith(prefix) else None


class TritonSessionEncoder:
    """The trained session transformer on Triton (model 'session_encoder'): the item vectors of a
    batch of sessions in ONE call -> one unit vector per session (retrieval query, ranker context)."""

    def __init__(self, settings: Settings, model: str = SESSION_ENCODER) -> None:
        import tritonclient.grpc as grpcclient

        self._tc = grpcclient
        self._client = grpcclient.InferenceServerClient(settings.triton_grpc_url)
        self.model = model
        self.breaker = CircuitBreaker()
        self.version = served_version(self._client, model)
        cfg = model_config(self._client, model)
        self.max_history = config_param(cfg, "max_history", 50)
        self.max_batch = max(1, int(cfg.get("max_batch_size", 0) or 64))

    def ready(self, version: str) -> bool:
        """Whether Triton has `version` loaded (False when it cannot be asked)."""
        try:
            return bool(self._client.is_model_ready(self.model, version, client_timeout=2.0))
        except Exception as exc:
            log.info("%s v%s readiness unknown: %s", self.model, version, exc)
            return False

    def encode(
        self, histories: Sequence[np.ndarray], timeout_s: float, version: str = "", background: bool = False
    ) -> np.ndarray:
        """[B, 384] for per-session item vectors [L_i, 384] (oldest first); raises ModelUnavailable.

        `version` pins the session encoder trained with the item encoder whose vectors these are.
        `background` (the session-vector refresh: up to 128 sessions a call, every 50 ms) backs off
        while the breaker is open but does not report to it: its large batches missing the
        request deadline on a busy box opened the breaker for live requests, which then answered
        degraded although their own small calls would have fit."""
        from recstream.models.served import pad_left

        out = []
        with guarded_call(self.model, self.breaker, report=not background):
            for lo in range(0, len(histories), self.max_batch):
                items, lengths = pad_left(histories[lo : lo + self.max_batch], self.max_history)
                inputs = []
                for name, arr, dtype in (("ITEMS", items, "FP32"), ("LENGTH", lengths[:, None], "INT32")):
                    inp = self._tc.InferInput(name, list(arr.shape), dtype)
                    inp.set_data_from_numpy(arr)
                    inputs.append(inp)
                res = self._client.infer(self.model, inputs, model_version=version, client_timeout=timeout_s)
                out.append(res.as_numpy("SESSION").astype(np.float32))
                served = res.get_response().model_version
                if served:
                    self.version = f"{self.model}-v{served}"
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


class SequenceScores:
    """One batch's answer of the sequence model: a score per row of its catalogue (NaN: untrained),
    the row of each item id, and how the version's lists use it."""

    def __init__(self, scores: np.ndarray, ids: list[str], row_of: dict[str, int], fusion: object) -> None:
        self.scores = scores
        self.ids = ids
        self.row_of = row_of
        self.fusion = fusion  # recstream.models.sequence.SequenceFusion

    def of(self, r: int, item_ids: Sequence[str]) -> np.ndarray:
        """Request r's scores of `item_ids` (NaN for items the model does not know)."""
        rows = np.array([self.row_of.get(i, -1) for i in item_ids], dtype=np.int64)
        out = np.full(len(rows), np.nan, np.float32)
        known = rows >= 0
        out[known] = self.scores[r, rows[known]]
        return out


class TritonSequenceScorer:
    """The ID sequence model on Triton (model 'sequence_scorer', recstream.models.sequence): the
    recent item ids of a batch of sessions in ONE call -> a score per catalogue item each.

    Its item ids and fusion (how many candidates it adds, how much its score weighs) are read from
    the served version's folder in the model repository once per version, and calls pin that
    version, so the rows sent and the scores returned are of one catalogue."""

    def __init__(self, settings: Settings, model: str = SEQUENCE_SCORER) -> None:
        import tritonclient.grpc as grpcclient

        self._tc = grpcclient
        self._client = grpcclient.InferenceServerClient(settings.triton_grpc_url)
        self._model_repo = settings.model_repo
        self.model = model
        self.breaker = CircuitBreaker()
        cfg = model_config(self._client, model)
        self.max_history = config_param(cfg, "max_history", 50)
        self.max_batch = max(1, int(cfg.get("max_batch_size", 0) or 64))
        self._checked: float | None = None
        self._files: tuple[str, list[str], dict[str, int], object] = ("", [], {}, None)
        self.version = ""
        self.follow_version()

    def follow_version(self, every_s: float = VERSION_CHECK_S) -> None:
        """Move to the newest version Triton serves, checked at most every `every_s`: the first time
        before the worker answers, later in a background thread (each check asks Triton and may read
        the repository; a slow server must not hold a request batch). Calls keep the version last
        read until the new one is complete."""
        now = time.monotonic()
        first = self._checked is None
        if not first and now - self._checked < every_s:
            return
        self._checked = now
        if first:
            self._follow()
        else:
            threading.Thread(target=self._follow, name=f"{self.model}-version", daemon=True).start()

    def _follow(self) -> None:
        version = served_version(self._client, self.model)
        if version == self.version:
            return
        from recstream.models.sequence_fusion import ITEM_IDS_FILE, SequenceFusion
        from recstream.models.training import read_meta

        number = version.rsplit("-v", 1)[-1]
        folder = self._model_repo / self.model / number
        try:
            ids = json.loads((folder / ITEM_IDS_FILE).read_text())
            meta = read_meta(folder)
            fusion = SequenceFusion.model_validate((meta.config if meta else {}).get("fusion", {}))
        except (OSError, ValueError) as exc:
            log.warning("%s: cannot read %s (%s); lists go without the sequence model", version, folder, exc)
            return
        ids = [str(i) for i in ids]
        self._files = (number, ids, {i: r for r, i in enumerate(ids)}, fusion)
        self.version = version
        log.info("%s: %d items, %s", version, len(ids), fusion)

    @property
    def fusion(self):
        """The served version's SequenceFusion (None: no version could be read)."""
        return self._files[3]

    def score(self, recent: Sequence[Sequence[str]], timeout_s: float) -> SequenceScores:
        """Scores [B, n_items] for each session's recent item ids (oldest first) from the version
        last followed; ids the model does not know are left out of the history. Raises
        ModelUnavailable."""
        from recstream.models.sequence_fusion import left_pad

        number, ids, row_of, fusion = self._files
        if not number:
            raise ModelUnavailable(f"{self.model}: no readable version")
        rows = [np.array([row_of[i] for i in session if i in row_of], dtype=np.int64) for session in recent]
        out = []
        with guarded_call(self.model, self.breaker):
            for lo in range(0, len(rows), self.max_batch):
                history = left_pad(rows[lo : lo + self.max_batch], self.max_history)
                inp = self._tc.InferInput("HISTORY", list(history.shape), "INT64")
                inp.set_data_from_numpy(history)
                res = self._client.infer(self.model, [inp], model_version=number, client_timeout=timeout_s)
                out.append(res.as_numpy("SCORES").astype(np.float32))
        scores = np.concatenate(out) if out else np.zeros((0, len(row_of)), np.float32)
        return SequenceScores(scores, ids, row_of, fusion)

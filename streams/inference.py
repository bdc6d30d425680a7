"""Model calls the agents make: query/item text embedding and ranking, on Triton or in-process.

All calls here are blocking (tritonclient gRPC); agents run them in a thread pool so a slow model
never blocks the event loop that also applies behaviour events. Every failure becomes
TritonUnavailable (or the ranker's own error), which the agents turn into degraded answers.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np

from recstream.config import Settings
from recstream.contracts.models import ITEM_ENCODER, RANKER, SESSION_ENCODER, TEXT_ENCODER
from recstream.models.co_visitation import CoVisitation
from recstream.recommend.breaker import CircuitBreaker
from recstream.recommend.scoring import Candidate, HeuristicRanker, RankContext
from recstream.telemetry import TRITON_ERRORS, TRITON_LATENCY

log = logging.getLogger(__name__)

#: Candidates a ranker without a configured depth reorders (5x a typical k).
RERANK_DEPTH = 50
#: Seconds between checks of which text_encoder version Triton serves (TritonTextEmbedder.follow_version).
VERSION_CHECK_S = 30.0
#: "Not read yet" (None means: read, and the version carries no search weights).
UNKNOWN = object()
_ZEROS = np.zeros(384, np.float32)


class ModelUnavailable(RuntimeError):
    """A model call failed or missed its deadline; the caller answers degraded."""


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
        from recstream.serving.triton_client import TritonError

        if not texts:
            return np.zeros((0, 384), np.float32)
        if use_breaker and not self.breaker.allow():
            raise ModelUnavailable(f"{self.model}: circuit open after a recent failure")
        t0 = time.perf_counter()
        try:
            ids = None if item_ids is None else list(item_ids)
            out = self._client.encode_texts(list(texts), timeout_s=timeout_s, item_ids=ids)
        except TritonError as exc:
            self.breaker.failure()
            TRITON_ERRORS.labels(model=self.model, kind=type(exc).__name__).inc()
            raise ModelUnavailable(f"{self.model}: {exc}") from exc
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

    def encode(self, histories: Sequence[np.ndarray], timeout_s: float, version: str = "") -> np.ndarray:
        """[B, 384] for per-session item vectors [L_i, 384] (oldest first); raises ModelUnavailable.

        `version` pins the session encoder trained with the item encoder whose vectors these are."""
        from recstream.models.served import pad_left

        if not self.breaker.allow():
            raise ModelUnavailable(f"{self.model}: circuit open after a recent failure")
        out = []
        t0 = time.perf_counter()
        try:
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
        except Exception as exc:
            self.breaker.failure()
            TRITON_ERRORS.labels(model=self.model, kind=type(exc).__name__).inc()
            raise ModelUnavailable(f"{self.model}: {exc}") from exc
        self.breaker.success()
        TRITON_LATENCY.labels(model=self.model).observe(time.perf_counter() - t0)
        return np.concatenate(out) if out else np.zeros((0, 384), np.float32)


class Ranker(Protocol):
    version: str
    rerank_depth: int  # retrieved candidates it reorders
    co_visitation_candidates: int  # of those, slots filled from its co-visitation statistic

    def score(self, ctx: RankContext, candidates: list[Candidate], timeout_s: float) -> np.ndarray: ...


class InProcessRanker:
    """The heuristic ranker from recstream.recommend, behind the same interface as Triton's."""

    rerank_depth = RERANK_DEPTH
    co_visitation_candidates = 0

    def __init__(self) -> None:
        self.impl = HeuristicRanker()
        self.version = self.impl.version

    def score(self, ctx: RankContext, candidates: list[Candidate], timeout_s: float) -> np.ndarray:
        return self.impl.score(ctx, candidates)


class TritonRanker:
    """The learned ranker served by Triton as model 'ranker' (recstream.models.ranker's wire form).

    CONTEXT [B, 768] = session vector ++ query vector (zeros = none), CANDIDATES [B, n, 384],
    CAND_FEATURES [B, n, K] from recstream.models.ranker.candidate_features (the one function
    training uses too), SCORES [B, n]; B requests per call (up to the model's max_batch_size).

    The co-visitation feature's statistic is read from the served version's folder in the model
    repository (`settings.model_repo`, which a worker container mounts read-only), once per version.
    """

    version = "ranker"

    def __init__(self, settings: Settings, model: str = RANKER) -> None:
        import tritonclient.grpc as grpcclient

        from recstream.models.ranker import candidate_features

        self._features = candidate_features
        self._model_repo = settings.model_repo
        self._version_cache: tuple[str, CoVisitation | None, int] = ("", None, 0)
        self._tc = grpcclient
        self._client = grpcclient.InferenceServerClient(settings.triton_grpc_url)
        self.model = model
        self.breaker = CircuitBreaker()
        self.version = served_version(self._client, model)
        cfg = model_config(self._client, model)
        # Rows one call may carry (1 if the model does not batch, or its config is unreadable) and
        # how many retrieved candidates the ranker was trained to reorder.
        self.max_batch = max(1, int(cfg.get("max_batch_size", 0)))
        self.rerank_depth = config_param(cfg, "rerank_depth", RERANK_DEPTH)

    def score(self, ctx: RankContext, candidates: list[Candidate], timeout_s: float) -> np.ndarray:
        return self.score_versioned(ctx, candidates, timeout_s)[0]

    def score_versioned(
        self, ctx: RankContext, candidates: list[Candidate], timeout_s: float
    ) -> tuple[np.ndarray, str]:
        """Scores and the version Triton says produced them: versions change live (promotion,
        rollback), so each answer reports the version of its own response, not one read at start."""
        scores, version = self.score_many([(ctx, candidates)], timeout_s)
        return scores[0], version

    def inputs(self, ctx: RankContext, candidates: list[Candidate]) -> tuple[np.ndarray, np.ndarray]:
        """One request's CONTEXT [768] and CAND_FEATURES [n, K] as served: what a ranking log records
        so that another model version can rescore the candidates offline (with the item vectors)."""
        zeros = _ZEROS
        context = np.concatenate(
            [
                ctx.session_vec if ctx.session_vec is not None else zeros,
                ctx.query_vec if ctx.query_vec is not None else zeros,
            ]
        ).astype(np.float32)
        feats = self._features(
            np.array([c.retrieval_score for c in candidates], np.float32),
            np.array([c.popularity for c in candidates], np.float64),
            [c.category or "" for c in candidates],
            ctx.recent_categories,
            ctx.max_popularity,
            np.array([c.trending for c in candidates], np.float64),
            self._co_visit_scores(ctx, candidates),
        )
        return context, feats

    def _co_visit_scores(self, ctx: RankContext, candidates: list[Candidate]) -> np.ndarray | None:
        stat = self.co_visitation()
        return stat.scores(ctx.recent_items, [c.item_id for c in candidates]) if stat is not None else None

    def co_visitation(self) -> CoVisitation | None:
        """The co-visitation statistic of the version last served (read once per version)."""
        return self._version_files()[0]

    @property
    def co_visitation_candidates(self) -> int:
        """Slots of each list the served version fills from its co-visitation statistic (chosen on
        validation when it was trained; 0 = the vector search's candidates alone)."""
        return self._version_files()[1]

    def _version_files(self) -> tuple[CoVisitation | None, int]:
        """What the served version's folder holds beside its weights, read once per version."""
        version = self.version
        if self._version_cache[0] != version:
            from recstream.models.ranker import co_visited_slots
            from recstream.models.training import read_meta

            number = version.rsplit("-v", 1)[-1] if "-v" in version else ""
            stat, slots = None, 0
            if number.isdigit():
                folder = self._model_repo / self.model / number
                stat = CoVisitation.load(folder)
                if stat is None:
                    log.warning("%s: no %s in %s; its co_visitation feature is 0", version, CoVisitation.FILE, folder)
                else:
                    slots = co_visited_slots(read_meta(folder), stat)
                    log.info(
                        "%s: co-visitation statistic of %d items loaded, %d co-visited candidates per list",
                        version,
                        len(stat.item_ids),
                        slots,
                    )
            self._version_cache = (version, stat, slots)
        return self._version_cache[1], self._version_cache[2]

    def _rows(self, ctx: RankContext, candidates: list[Candidate]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One request's CONTEXT [768], CANDIDATES [n, 384], CAND_FEATURES [n, K]."""
        context, feats = self.inputs(ctx, candidates)
        items = np.stack([c.vector if c.vector is not None else _ZEROS for c in candidates]).astype(np.float32)
        return context, items, feats

    def score_many(
        self, jobs: Sequence[tuple[RankContext, list[Candidate]]], timeout_s: float
    ) -> tuple[list[np.ndarray], str]:
        """Scores for up to `max_batch` requests in ONE Triton call (rows of a batch, candidates padded
        to the longest list; the ranker scores each candidate on its own, so padding changes nothing).

        On a busy 2-core box each call costs ~1-2 ms of gRPC and python-backend overhead, far more
        than the MLP itself; one call per batch of requests instead of one per request."""
        if not self.breaker.allow():
            raise ModelUnavailable("ranker: circuit open after a recent failure")
        if len(jobs) > self.max_batch:
            raise ValueError(f"{len(jobs)} requests in one ranker call; the model takes at most {self.max_batch}")
        sizes = [len(c) for _, c in jobs]
        out: list[np.ndarray] = [np.zeros(0, np.float32) for _ in jobs]
        live = [i for i, n in enumerate(sizes) if n]
        if not live:
            return out, self.version
        width = max(sizes)
        rows = [self._rows(*jobs[i]) for i in live]
        n_feat = rows[0][2].shape[1]
        context = np.stack([r[0] for r in rows])
        items = np.zeros((len(rows), width, _ZEROS.size), np.float32)
        feats = np.zeros((len(rows), width, n_feat), np.float32)
        for j, (_, it, ft) in enumerate(rows):
            items[j, : len(it)] = it
            feats[j, : len(ft)] = ft
        inputs = []
        for name, arr in (("CONTEXT", context), ("CANDIDATES", items), ("CAND_FEATURES", feats)):
            inp = self._tc.InferInput(name, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        t0 = time.perf_counter()
        try:
            res = self._client.infer(self.model, inputs, client_timeout=timeout_s)
            scores = res.as_numpy("SCORES").reshape(len(rows), width)
            served = res.get_response().model_version
        except Exception as exc:
            self.breaker.failure()
            TRITON_ERRORS.labels(model=self.model, kind=type(exc).__name__).inc()
            raise ModelUnavailable(f"ranker: {exc}") from exc
        self.breaker.success()
        TRITON_LATENCY.labels(model=self.model).observe(time.perf_counter() - t0)
        if served:
            self.version = f"{self.model}-v{served}"
        for j, i in enumerate(live):
            out[i] = scores[j, : sizes[i]].astype(np.float32)
        return out, self.version


#: The ranker backends by the worker's `--ranker` name (`auto` = `triton` when Triton serves the
#: ranker model, else `inprocess`). A new backend implements `Ranker` and is added here.
RANKERS: dict[str, Callable[[Settings], Ranker]] = {
    "inprocess": lambda settings: InProcessRanker(),
    "triton": TritonRanker,
}

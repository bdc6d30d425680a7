"""The ranker backends behind one protocol: the heuristic in-process ranker and the learned ranker
on Triton. The worker's `--ranker` picks one from RANKERS; adding a backend is a class here that
implements `Ranker` plus its entry in RANKERS.
"""

from __future__ import annotations

import logging
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from recstream.config import Settings
from recstream.contracts.models import RANKER
from recstream.models.co_visitation import CoVisitation
from recstream.recommend.breaker import CircuitBreaker
from recstream.recommend.scoring import Candidate, HeuristicRanker, RankContext
from streams.inference import ModelUnavailable, config_param, guarded_call, model_config, served_version

log = logging.getLogger(__name__)

#: Candidates a ranker without a configured depth reorders (5x a typical k).
RERANK_DEPTH = 50
_ZEROS = np.zeros(384, np.float32)


class Ranker(Protocol):
    version: str
    rerank_depth: int  # retrieved candidates it reorders
    co_visitation_candidates: int  # of those, slots filled from its co-visitation statistic
    follows_candidates: int  # and slots filled from what followed the session's last items

    def score(self, ctx: RankContext, candidates: list[Candidate], timeout_s: float) -> np.ndarray: ...


class InProcessRanker:
    """The heuristic ranker from recstream.recommend, behind the same interface as Triton's."""

    rerank_depth = RERANK_DEPTH
    co_visitation_candidates = 0
    follows_candidates = 0

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
        self._version_cache: tuple[str, CoVisitation | None, int, int, bool] = ("", None, 0, 0, True)
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
            *self._co_occurrence(ctx, candidates),
        )
        return context, feats

    def _co_occurrence(
        self, ctx: RankContext, candidates: list[Candidate]
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """The co_visitation and follows features' raw values, from the served version's statistic."""
        stat = self.co_visitation()
        if stat is None:
            return None, None
        ids = [c.item_id for c in candidates]
        return stat.scores(ctx.recent_items, ids), stat.follow_scores(ctx.recent_items, ids)

    def co_visitation(self) -> CoVisitation | None:
        """The co-visitation statistic of the version last served (read once per version)."""
        return self._version_files()[0]

    @property
    def co_visitation_candidates(self) -> int:
        """Slots of each list the served version fills from its co-visitation statistic (chosen on
        validation when it was trained; 0 = the vector search's candidates alone)."""
        return self._version_files()[1]

    @property
    def follows_candidates(self) -> int:
        """Slots of each list the served version fills with what followed the session's last items."""
        return self._version_files()[2]

    @property
    def places_new_items(self) -> bool:
        """Whether the served version's lists place items nobody has interacted with by retrieval
        (recstream.training.new_items; a version that does not say, places them)."""
        return self._version_files()[3]

    def _version_files(self) -> tuple[CoVisitation | None, int, int, bool]:
        """What the served version's folder holds beside its weights, read once per version."""
        version = self.version
        if self._version_cache[0] != version:
            number = version.rsplit("-v", 1)[-1] if "-v" in version else ""
            files = version_files(self._model_repo / self.model / number, version) if number.isdigit() else None
            self._version_cache = (version, *(files or NO_VERSION_FILES))
        return self._version_cache[1:]

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
        if self.breaker.refusing():  # before building the rows (guarded_call asks it for the call)
            raise ModelUnavailable(f"{self.model}: circuit open after a recent failure")
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
        with guarded_call(self.model, self.breaker):
            res = self._client.infer(self.model, inputs, client_timeout=timeout_s)
            scores = res.as_numpy("SCORES").reshape(len(rows), width)
            served = res.get_response().model_version
        # chunks of a batch run at once in the thread pool: answer with the version that scored
        # these rows, not whatever another chunk has stored in self.version meanwhile
        label = f"{self.model}-v{served}" if served else self.version
        self.version = label
        for j, i in enumerate(live):
            out[i] = scores[j, : sizes[i]].astype(np.float32)
        return out, label


#: The ranker backends by the worker's `--ranker` name (`auto` = `triton` when Triton serves the
#: ranker model, else `inprocess`). A new backend implements `Ranker` and is added here.
RANKERS: dict[str, Callable[[Settings], Ranker]] = {
    "inprocess": lambda settings: InProcessRanker(),
    "triton": TritonRanker,
}


#: What a served ranker version falls back to when its files cannot be read: no co-visitation
#: statistic (those features are 0), no co-visited or follows slots, new items placed apart.
NO_VERSION_FILES: tuple[CoVisitation | None, int, int, bool] = (None, 0, 0, True)


def version_files(folder: Path, version: str) -> tuple[CoVisitation | None, int, int, bool]:
    """A ranker version folder's statistic, its co-visited and follows slots per list and whether its
    lists place new items (`recstream.models.ranker.places_new_items`). A version whose files are
    broken (truncated, invalid meta.json, a corrupt .npz) is still served, without them: every
    request reads these, so an exception here would fail every answer until the version changed."""
    from recstream.models.ranker import co_visited_slots, follow_slots, places_new_items
    from recstream.models.training import read_meta

    try:
        meta = read_meta(folder)
        stat = CoVisitation.load(folder)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        log.error(
            "%s: cannot read its files in %s (%s); served without co-visitation and follows", version, folder, exc
        )
        return NO_VERSION_FILES
    places = places_new_items(meta)
    if not places:
        log.info("%s: its lists let the ranker order items nobody has interacted with", version)
    if stat is None:
        log.warning("%s: no %s in %s; its co_visitation and follows features are 0", version, CoVisitation.FILE, folder)
        return None, 0, 0, places
    slots, follows = co_visited_slots(meta, stat), follow_slots(meta, stat)
    log.info(
        "%s: co-visitation statistic of %d items loaded (follows: %s), %d co-visited and %d follows candidates "
        "per list",
        version,
        len(stat.item_ids),
        "yes" if stat.follows is not None else "no",
        slots,
        follows,
    )
    return stat, slots, follows, places

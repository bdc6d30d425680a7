"""The continual fine-tuning worker: training-examples topic -> replay buffer -> LoRA round -> gate ->
new version in model_repo/ranker/ -> Triton load_model; and rollback when online CTR drops.

Search clicks (training examples that carry their search's query) also feed the served query
encoder: every `search_every_clicks` of them, a round continues training its LoRA adapter
(recstream.search.continual) and a candidate the gate accepts becomes the next text_encoder version.

Loop (one thread, so no locking): poll the catalog (item texts -> vectors) and training examples;
every `train_every_examples` new examples or `train_every_s` seconds (whichever first, given at
least `min_examples`), run one round on the replay buffer with the newest `holdout` examples held
back for the gate. A promoted candidate is published atomically, becomes live in the registry
(live + previous stay loaded) and Triton reloads; the CTR monitor can roll it back later.

Off-policy check: while a stochastic policy is live, the worker's ranking logs say what each answer
was drawn from. The trainer keeps the newest `ope.window` of them joined with their outcomes, and a
candidate the held-back window accepts is also reranked on those logged pools (recstream.ope.logs)
against the live version: a candidate whose doubly robust paired CTR difference lies entirely below
0 is refused. Too few logged answers (effective sample size < `ope.min_ess`) skip the check, and
the round says so.

Offsets of the training-examples topic are committed after the examples are in the buffer
(at-least-once). The buffer is memory only: on start it is refilled from the topic with the newest
examples already committed (up to the buffer's capacity, as retention allows), so a restart does
not empty the recent window or the reservoir that keeps rounds from forgetting older traffic. The
refill does not count as new examples (no round is due because of it) nor towards online CTR.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from recstream.client import ConsumedEvent, EventConsumer
from recstream.client.consumer import end_offsets, read_committed_tail
from recstream.config import Settings
from recstream.continual import Example, ModelRegistry, ReplayBuffer, TritonModelControl, decide, fine_tune
from recstream.continual.monitor import CtrMonitor
from recstream.continual.registry import LiveChanged
from recstream.contracts.events import ItemDelete, ItemUpsert, RankingLog, TrainingExample
from recstream.models.ranker import ITEM_DIM, Ranker
from recstream.ope.logs import evaluate
from recstream.ope.rescoring import PoolRescorer
from recstream.ope.window import LogWindow
from recstream.search.continual import SearchClick, update_query_encoder
from recstream.telemetry import (
    OFF_POLICY_CHECKS,
    OFF_POLICY_DIFF,
    PROMOTIONS,
    REGISTRY_LIVE_VERSION,
    TRAINING_INPUTS,
    TRAINING_RUNS,
)
from services.trainer.config import TrainerConfig
from services.trainer.examples import CatalogFeatures, ServedInputs, example_from_event

log = logging.getLogger(__name__)

#: The CTR monitor's counts per served version, in the model's folder beside registry.json.
CTR_FILE = "ctr.json"
#: How often a Triton reload that failed (Triton busy, restarting) is tried again.
RELOAD_RETRY_S = 10.0
#: Ranking logs read back per partition at a restart beyond one per refilled answer (answers
#: without examples yet, logged within the feedback window before the restart).
LOG_REFILL_MARGIN = 1000


@dataclass
class RoundResult:
    accepted: bool
    reason: str
    version: int | None
    seconds: float
    stats: dict[str, Any]


class TrainerService:
    """State and steps of the worker; `run` drives them from Kafka, tests may call steps directly."""

    def __init__(
        self,
        settings: Settings,
        cfg: TrainerConfig | None = None,
        features: CatalogFeatures | None = None,
        triton_url: str | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = cfg or TrainerConfig()
        self.features = features or CatalogFeatures(model_repo=settings.model_repo)
        self.registry = ModelRegistry(settings.model_repo, self.cfg.model_name)
        self.buffer: ReplayBuffer[Example] = ReplayBuffer(self.cfg.replay)
        self.monitor = CtrMonitor(self.cfg.monitor)
        self.monitor.load(self.ctr_path)
        self.triton_url = triton_url if triton_url is not None else settings.triton_url
        self.control: TritonModelControl | None = None
        self.reload_due_at: float | None = None  # a failed Triton reload, tried again from then on
        # Rounds wait until the catalog read at start has reached the topic's end: before it, most
        # items had no vector yet, and both the candidate and the gate saw zero vectors for them.
        self.catalog_ready = True
        self.new_since_round = 0
        self.last_round = time.monotonic()
        self.rounds: list[RoundResult] = []
        self.logged = LogWindow(self.cfg.ope.window)  # what stochastic answers drew from, with outcomes
        self.served = ServedInputs(self.cfg.served_inputs_ttl_s, self.cfg.served_inputs_capacity)
        self.live_since: dict[int, float] = {}
        self.search_clicks: deque[SearchClick] = deque(maxlen=self.cfg.search_clicks_kept)
        self.new_search_clicks = 0
        self.query_rounds: list[RoundResult] = []
        self.stop_event = threading.Event()
        self.registry.init_live()
        self._set_live_gauge()

    # ---- Triton ------------------------------------------------------------------------------------
    def _control(self) -> TritonModelControl | None:
        if self.control is None and self.triton_url:
            try:
                self.control = TritonModelControl(self.triton_url, self.cfg.model_name)
            except Exception as exc:  # Triton down: the version is on disk, it loads at the next start
                log.warning("Triton at %s unreachable (%s); model reload deferred", self.triton_url, exc)
        return self.control

    def reload_triton(self) -> bool:
        """Ask Triton to load the registry's served set. One that fails is tried again every
        RELOAD_RETRY_S (`retry_reload`): after a rollback, the bad version kept answering until
        Triton's next start, while the registry and the live gauge said it was gone."""
        control = self._control()
        if control is None:
            self.reload_due_at = time.monotonic() + RELOAD_RETRY_S if self.triton_url else None
            return False
        try:
            control.reload()
        except Exception as exc:
            log.error("Triton load_model(%s) failed: %s; retrying in %g s", self.cfg.model_name, exc, RELOAD_RETRY_S)
            self.reload_due_at = time.monotonic() + RELOAD_RETRY_S
            return False
        self.reload_due_at = None
        return True

    def retry_reload(self, now: float | None = None) -> bool:
        """Retry a failed reload once it is due; True when one was retried and succeeded."""
        now = time.monotonic() if now is None else now
        if self.reload_due_at is None or now < self.reload_due_at:
            return False
        return self.reload_triton()

    @property
    def ctr_path(self) -> Path:
        """Impressions and clicks per served version, beside the registry's state."""
        return self.registry.model_dir / CTR_FILE

    def save_ctr(self) -> None:
        """Keep the served versions' CTR counts across restarts (before offsets are committed)."""
        try:
            self.monitor.save(self.ctr_path, keep=set(self.registry.served()))
        except OSError as exc:  # losing a snapshot delays a rollback decision, never the trainer
            log.error("could not save CTR counts to %s: %s", self.ctr_path, exc)

    def triton_refused(self, version: int) -> bool:
        """True when Triton answers and `version` is not ready after a reload; False when it is, or
        when Triton cannot be asked (unreachable: the version loads at its next start)."""
        control = self._control()
        if control is None:
            return False
        try:
            return not control.client.is_model_ready(self.cfg.model_name, str(version))
        except Exception as exc:
            log.warning("cannot ask Triton whether %s v%d is ready: %s", self.cfg.model_name, version, exc)
            return False

    def _set_live_gauge(self) -> None:
        REGISTRY_LIVE_VERSION.clear()
        live = self.registry.live
        if live is not None:
            REGISTRY_LIVE_VERSION.labels(model=self.cfg.model_name, version=str(live)).set(1)

    # ---- steps -------------------------------------------------------------------------------------
    def handle(self, events: Sequence[Any]) -> int:
        """Fold consumed events in; returns how many training examples were added."""
        added = 0
        for ev in events:
            if isinstance(ev, ItemUpsert):
                self.features.upsert(ev)
            elif isinstance(ev, ItemDelete):
                self.features.delete(ev.item_id)
            elif isinstance(ev, RankingLog):
                self.logged.add_log(ev)
                self.served.add(ev)
            elif isinstance(ev, TrainingExample):
                self.logged.add_example(ev)
                ex = example_from_event(ev)
                TRAINING_INPUTS.labels(inputs="served" if self.served.attach(ex) else "rebuilt").inc()
                self.monitor.observe(ev.model_version, ev.clicked)
                self.features.observe(ex)
                self.buffer.add(ex)
                added += 1
                if ex.query and ex.label > 0:
                    self.search_clicks.append(SearchClick(ex.query, ex.item, ex.ts_ms))
                    self.new_search_clicks += 1
        self.new_since_round += added
        return added

    def due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if not self.catalog_ready:
            return False
        if len(self.buffer.recent) < max(self.cfg.min_examples, self.cfg.holdout + 1):
            return False
        return self.new_since_round >= self.cfg.train_every_examples or (
            self.new_since_round > 0 and now - self.last_round >= self.cfg.train_every_s
        )

    def train_round(self) -> RoundResult:
        """Fine-tune the live ranker on the buffer, gate it, and promote + load a winner."""
        t0 = time.monotonic()
        self.last_round = t0
        self.new_since_round = 0
        live_v = self.registry.live
        window = self.buffer.latest(self.cfg.holdout)
        try:
            # inside: a live folder that cannot be read (deleted, truncated) fails this round, it
            # does not stop the trainer (which would restart into the same failure)
            live = Ranker.load(self.registry.model_dir / str(live_v))
            cand, stats = fine_tune(
                live.net,
                [],
                self.features,
                self.cfg.learner,
                sample=lambda n: self.buffer.sample(n, exclude_latest=self.cfg.holdout),
            )
            d = decide(cand, live.net, window, self.features, self.cfg.gate)
            if d.accepted:
                refused, why, ope_stats = self.off_policy_check(cand, live.net, live_v)
                stats.update(ope_stats)
                if refused:
                    d = replace(d, accepted=False, reason=why)
        except Exception as exc:
            log.exception("training round failed")
            return self._not_promoted(f"failed: {exc}", "failed", t0, {})
        stats.update({f"cand_{k}": v for k, v in d.candidate.items()})
        stats.update({f"live_{k}": v for k, v in d.live.items()})
        if not d.accepted:
            log.info("candidate refused: %s", d.reason)
            return self._not_promoted(d.reason, "rejected", t0, stats)
        # the derived version keeps its parent's co-visitation statistic (the feature it was tuned on)
        new = Ranker(cand, live.meta.model_copy(deep=True), live.co_visitation)
        new.meta.extra.update(parent_version=live_v, trained_on=len(self.buffer), learner=self.cfg.learner.mode)
        try:
            v = self.registry.publish(new, {"gate_auc": d.candidate["auc"], "gate_live_auc": d.live["auc"]})
        except OSError as exc:  # e.g. a `make train` export took the version number meanwhile
            log.error("candidate not published: %s", exc)
            return self._not_promoted(f"not published: {exc}", "failed", t0, stats)
        before = (self.registry.live, self.registry.previous)
        try:
            self.registry.promote(v, d.reason, parent=live_v)
        except LiveChanged as exc:  # e.g. `models rollback` while this round trained: it stands
            log.warning("candidate v%d not promoted: %s", v, exc)
            return self._not_promoted(f"not promoted: {exc}", "live_changed", t0, stats)
        loaded = self.reload_triton()
        if self.triton_refused(v):
            # Triton answered but did not load it (a corrupt or unloadable folder): the registry
            # goes back to what Triton serves, so the next round, the rollback target and the CTR
            # monitor all follow the versions users actually get
            why = f"v{v} did not load in Triton"
            self.registry.revert(before[0], before[1], why)
            self.reload_triton()
            self._set_live_gauge()
            log.error("%s %s; live stays v%s", self.cfg.model_name, why, before[0])
            return self._not_promoted(why, "load_failed", t0, stats)
        self.live_since[v] = time.monotonic()
        self.registry.prune(self.cfg.keep_versions)
        TRAINING_RUNS.labels(model=self.cfg.model_name, result="promoted").inc()
        PROMOTIONS.labels(model=self.cfg.model_name, action="promote").inc()
        self._set_live_gauge()
        log.info("promoted %s v%d (%s); triton reloaded=%s", self.cfg.model_name, v, d.reason, loaded)
        res = RoundResult(True, d.reason, v, time.monotonic() - t0, {**stats, "triton_loaded": loaded})
        self.rounds.append(res)
        return res

    def _not_promoted(self, reason: str, result: str, t0: float, stats: dict[str, float]) -> RoundResult:
        """A ranker round that ends without a new live version, counted under `result`."""
        TRAINING_RUNS.labels(model=self.cfg.model_name, result=result).inc()
        res = RoundResult(False, reason, None, time.monotonic() - t0, stats)
        self.rounds.append(res)
        return res

    # ---- the search query encoder ------------------------------------------------------------------
    def _served_query_encoder(self) -> tuple[Path, Any] | None:
        """(version dir, its meta) of the served text_encoder when it is a hybrid-search query
        encoder (an adapter with search weights); None otherwise: then there is nothing to update."""
        from recstream.contracts.models import ITEM_ENCODER, TEXT_ENCODER
        from recstream.models.repository import latest_version_dir, versions
        from recstream.models.training import read_meta

        # without a served item encoder the catalog is embedded by text_encoder itself: a query
        # adapter must not move the item vectors
        if not versions(self.settings.model_repo, TEXT_ENCODER) or not versions(self.settings.model_repo, ITEM_ENCODER):
            return None
        vdir = latest_version_dir(self.settings.model_repo, TEXT_ENCODER)
        meta = read_meta(vdir)
        if meta is None or "search_weights" not in meta.extra or not (vdir / "adapter").is_dir():
            return None
        return vdir, meta

    def query_round_due(self) -> bool:
        return (
            self.catalog_ready
            and self.new_search_clicks >= self.cfg.search_every_clicks
            and len(self.search_clicks) >= self.cfg.search.min_clicks
            and self._served_query_encoder() is not None
        )

    def query_round(self) -> RoundResult:
        """Continue training the served query encoder on live search clicks; publish and load a new
        text_encoder version when the gate accepts it (recstream.search.continual)."""
        import tempfile

        from recstream.contracts.models import TEXT_ENCODER
        from recstream.models.encoder import version_text_encoder
        from recstream.models.export import export_query_encoder
        from recstream.search.query_encoder import save_adapter
        from recstream.search.served import SearchWeights

        t0 = time.monotonic()
        self.new_search_clicks = 0
        served = self._served_query_encoder()
        if served is None:
            return RoundResult(False, "no fine-tuned query encoder is served", None, 0.0, {})
        vdir, meta = served
        self.features.flush()
        ids = list(self.features.vectors)
        try:
            update = update_query_encoder(
                vdir / "adapter",
                version_text_encoder(vdir).encode,
                list(self.search_clicks),
                ids,
                np.stack([self.features.vectors[i] for i in ids]) if ids else np.zeros((0, ITEM_DIM), np.float32),
                self.cfg.search,
            )
        except Exception as exc:
            TRAINING_RUNS.labels(model=TEXT_ENCODER, result="failed").inc()
            log.exception("query encoder round failed")
            res = RoundResult(False, f"failed: {exc}", None, time.monotonic() - t0, {})
            self.query_rounds.append(res)
            return res
        if update is None:
            res = RoundResult(False, "too few search clicks on catalogue items", None, time.monotonic() - t0, {})
            self.query_rounds.append(res)
            return res
        d = update.decision
        stats = {
            **{f"cand_{k}": v for k, v in d.candidate.items()},
            **{f"live_{k}": v for k, v in d.live.items()},
            "trained_on": update.trained_on,
        }
        if not d.accepted:
            TRAINING_RUNS.labels(model=TEXT_ENCODER, result="rejected").inc()
            log.info("query encoder candidate refused: %s", d.reason)
            res = RoundResult(False, d.reason, None, time.monotonic() - t0, stats)
            self.query_rounds.append(res)
            return res
        new_meta = meta.model_copy(deep=True)
        new_meta.extra.update(parent_version=int(vdir.name), trained_on_clicks=update.trained_on, gate=d.reason)
        new_meta.metrics.update({"gate_mrr": d.candidate["mrr"], "gate_live_mrr": d.live["mrr"]})
        with tempfile.TemporaryDirectory() as tmp:
            adapter = save_adapter(update.tower, Path(tmp) / "adapter")
            weights = SearchWeights.from_bench(meta.extra["search_weights"])
            new_dir = export_query_encoder(adapter, new_meta, self.settings.model_repo, weights)
        loaded = False
        try:
            if self.triton_url:
                control = TritonModelControl(self.triton_url, TEXT_ENCODER)
                control.reload()
                control.close()
                loaded = True
        except Exception as exc:  # the version is on disk: Triton loads it at its next start
            log.error("Triton load_model(%s) failed: %s", TEXT_ENCODER, exc)
        TRAINING_RUNS.labels(model=TEXT_ENCODER, result="promoted").inc()
        PROMOTIONS.labels(model=TEXT_ENCODER, action="promote").inc()
        log.info("promoted %s v%s (%s); triton reloaded=%s", TEXT_ENCODER, new_dir.name, d.reason, loaded)
        res = RoundResult(True, d.reason, int(new_dir.name), time.monotonic() - t0, {**stats, "triton_loaded": loaded})
        self.query_rounds.append(res)
        return res

    def off_policy_check(self, cand: Any, live: Any, live_version: int | None) -> tuple[bool, str, dict[str, Any]]:
        """(refuse, reason, stats): the candidate against the live version on the logged pools, both
        reranking them from the logged inputs (the logs may span several earlier versions)."""
        refused, why, stats = self._off_policy_check(cand, live, live_version)
        if self.cfg.ope.enabled:
            OFF_POLICY_CHECKS.labels(model=self.cfg.model_name, result=stats["ope"].split(":")[0]).inc()
        if "ope_dr_diff" in stats:
            low, high = stats["ope_dr_diff_ci"]
            for bound, value in (("estimate", stats["ope_dr_diff"]), ("low", low), ("high", high)):
                OFF_POLICY_DIFF.labels(model=self.cfg.model_name, bound=bound).set(value)
        return refused, why, stats

    def _off_policy_check(self, cand: Any, live: Any, live_version: int | None) -> tuple[bool, str, dict[str, Any]]:
        cfg = self.cfg.ope
        requests = self.logged.requests() if cfg.enabled else []
        if not requests:
            return False, "", {"ope": "skipped: no logged answers" if cfg.enabled else "disabled"}
        self.features.flush()
        vectors = self.features.vectors
        try:
            report = evaluate(
                requests,
                cfg.target,
                cfg.confidence,
                rescore=PoolRescorer(cand, vectors),
                candidate_model="candidate",
                baseline=PoolRescorer(live, vectors),
                baseline_model=str(live_version),
            )
        except ValueError as exc:  # no usable logged answer (e.g. logged by the heuristic ranker)
            return False, "", {"ope": f"skipped: {exc}"}
        dr = report.versus_logging_model[-1]
        stats = {
            "ope_requests": report.requests,
            "ope_ess": report.effective_sample_size,
            "ope_dr_diff": dr.ctr,
            "ope_dr_diff_ci": [dr.low, dr.high],
        }
        if report.effective_sample_size < cfg.min_ess:
            return False, "", {**stats, "ope": f"skipped: effective sample size {report.effective_sample_size:.0f}"}
        if dr.high < 0:
            why = (
                f"off-policy: on {report.requests} logged answers the candidate's {cfg.target} CTR is "
                f"{dr.ctr:+.4f} [{dr.low:+.4f}, {dr.high:+.4f}] vs live v{live_version} (doubly robust, paired)"
            )
            return True, why, {**stats, "ope": "refused"}
        return False, "", {**stats, "ope": "passed"}

    def rollback(self, reason: str) -> int:
        v = self.registry.rollback(reason)
        self.reload_triton()
        PROMOTIONS.labels(model=self.cfg.model_name, action="rollback").inc()
        self._set_live_gauge()
        log.warning("rolled back %s to v%d: %s", self.cfg.model_name, v, reason)
        return v

    def check_rollback(self) -> int | None:
        live, prev = self.registry.live, self.registry.previous
        if live is None:
            return None
        bad, why = self.monitor.should_rollback(live, prev)
        return self.rollback(f"automatic: {why}") if bad else None

    def fold(self, consumed: Sequence[ConsumedEvent], source: EventConsumer) -> int:
        """`handle` one event at a time: one it cannot use goes to the dead-letter topic with the
        reason. Raised out of the loop it would stop the trainer, which would restart at the same
        offset and stop again."""
        added = 0
        for c in consumed:
            try:
                added += self.handle([c.event])
            except Exception as exc:
                log.exception("%s[%d]@%d could not be used; dead-lettered", c.topic, c.partition, c.offset)
                source.refuse(c, f"{type(exc).__name__}: {exc}", "unusable")
        return added

    def refill(self) -> int:
        """Put the newest committed examples back into the replay buffer (see the module's doc),
        with the ranker inputs they were served with: the committed tail of the ranking log is
        read back too. Without it every refilled example was rebuilt from the catalogue, and so
        were the examples of answers logged just before the restart whose feedback window closed
        after it."""
        capacity = self.cfg.replay.recent_capacity + self.cfg.replay.reservoir_capacity
        events = read_committed_tail(self.settings, "training-examples", self.cfg.group_id, capacity)
        examples = sorted(
            (example_from_event(ev) for ev in events if isinstance(ev, TrainingExample)), key=lambda ex: ex.ts_ms
        )[-capacity:]
        if examples:
            # Only the answers refilled examples came from, and those logged in the last feedback
            # window (their examples are still to come); each partition's tail is bounded by them.
            requests = {ex.request_id for ex in examples}
            recent_ms = examples[-1].ts_ms - int(self.cfg.served_inputs_ttl_s * 1000)
            try:
                logs = read_committed_tail(
                    self.settings,
                    "ranking-log",
                    self.cfg.group_id,
                    len(requests) + LOG_REFILL_MARGIN,
                    keep=lambda rl: rl.request_id in requests or rl.ts_ms >= recent_ms,
                )
            except Exception as exc:  # the examples still come back, rebuilt from the catalogue
                log.warning("ranking log not read back (%s); refilled examples are rebuilt", exc)
                logs = []
            for rl in sorted((rl for rl in logs if isinstance(rl, RankingLog)), key=lambda rl: rl.ts_ms):
                self.served.add(rl)
        served = 0
        for ex in examples:
            served += self.served.attach(ex)
            self.features.observe(ex)
            self.buffer.add(ex)
        if examples:
            log.info("replay buffer refilled with %d committed examples (%d with served inputs)", len(examples), served)
        return len(examples)

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self, max_seconds: float | None = None) -> None:
        """Consume until stopped (stop_event or max_seconds)."""
        if self.buffer.seen == 0:  # once: a second run() in this process has them in its buffer
            try:
                self.refill()
            except Exception as exc:  # Kafka not up yet: learn from new traffic, as without a refill
                log.warning("replay buffer not refilled: %s: %s", type(exc).__name__, exc)
        examples = EventConsumer(
            self.settings, ["training-examples", "ranking-log"], self.cfg.group_id, worker="trainer"
        )
        # The catalog is read from the start on every run (fresh group): item vectors live in memory.
        catalog = EventConsumer(
            self.settings, ["catalog"], f"{self.cfg.group_id}-catalog-{uuid.uuid4().hex[:8]}", worker="trainer"
        )
        try:
            catalog_ends = end_offsets(self.settings, "catalog")
        except Exception as exc:  # Kafka not up yet: nothing to wait for that can be known
            log.warning("catalog end offsets unknown (%s); rounds do not wait for the catalog", exc)
            catalog_ends = {}
        self.catalog_ready = False
        t_end = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            while not self.stop_event.is_set() and (t_end is None or time.monotonic() < t_end):
                self.fold(catalog.poll(500, 0.05), catalog)
                if not self.catalog_ready and catalog.reached("catalog", catalog_ends):
                    self.catalog_ready = True
                    log.info("catalog read to where it ended at start; training rounds may run")
                batch = examples.poll(1000, 0.5)
                if batch:
                    self.fold(batch, examples)
                    self.save_ctr()
                    examples.commit()
                if self.due():
                    self.train_round()
                if self.query_round_due():
                    self.query_round()
                self.check_rollback()
                self.retry_reload()
        finally:
            examples.close()
            catalog.close()
            if self.control is not None:
                self.control.close()

"""What every stream processor shares: settings, store and model handles, the consumer threads, and
the one produce and dead-letter path for outputs nobody checkpoints (answers, logs, dead letters).

Processors import this module; streams.app builds the context and wires the processors to it, so
imports run one way (app -> processors -> context).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Producer

from recstream.client.producer import count_delivery, produce_or_wait, producer_config
from recstream.config import Settings
from recstream.contracts.topics import TOPICS, TopicSpec
from recstream.kafka.dead_letters import DeadLetterSink, RefusedMessage
from recstream.kafka.serde import InvalidEvent, decode
from recstream.telemetry import EVENTS_IN
from streams.consumer_threads import CURRENT_BATCH, Consumed
from streams.naming import app_id

log = logging.getLogger(__name__)


#: Seconds between attempts to read the text_encoder's search weights while Triton cannot say.
HYBRID_RETRY_S = 10.0
#: Linger of the producer for records nobody waits for (ranking logs).
BULK_LINGER_MS = 50


@dataclass
class StreamContext:
    """Shared I/O handles of one worker process; agents get everything they touch from here."""

    settings: Settings
    worker: str
    agents: tuple[str, ...]
    ranker_mode: str = "auto"
    tables: dict[str, Any] = field(default_factory=dict)
    _producer: Producer | None = None
    _bulk_producer: Producer | None = None
    _store: Any = None
    _embedder: Any = None
    _item_embedder: Any = None
    _session_encoder: Any = None
    _sequence_scorer: Any = None
    _session_vectors: Any = None
    _hybrid_search: Any = None
    _hybrid_retry_at: float = 0.0
    _lexical_search: Any = None
    _ranker: Any = None
    _policy: Any = None
    _rng: Any = None
    _policy_feedback: Any = None
    catalog: Any = None  # streams.catalog.CatalogLoop when the catalog indexer runs here
    behaviour: Any = None  # streams.behaviour.BehaviourLoop when features or feedback run here
    requests: Any = None  # streams.requests.RequestLoop when the recommender runs here
    # 8 threads: the concurrent ranker calls of a request batch (32 / max_batch_size) and catalog
    # encodes; the calls release the GIL.
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(8, thread_name_prefix="infer"))
    _open_locks: dict[str, threading.Lock] = field(default_factory=dict, repr=False)
    _open_locks_guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- lazily opened handles (opened in the worker process, never at import/app-build time) --

    def _opened(self, attr: str, build: Callable[[], Any]) -> Any:
        """The handle kept in `attr`, built once. Start-up (streams.registry.open_handles) and the
        consumer threads may ask for a handle at the same moment; a second build would open a second
        Qdrant local client on the same folder (refused), leak a producer whose messages are never
        flushed, or start a second session-vector thread. One lock per handle: a slow model probe
        holds up only the callers of that handle."""
        value = getattr(self, attr)
        if value is not None:
            return value
        with self._open_locks_guard:
            lock = self._open_locks.setdefault(attr, threading.Lock())
        with lock:
            value = getattr(self, attr)
            if value is None:
                value = build()
                setattr(self, attr, value)
            return value

    @property
    def producer(self) -> Producer:
        # Outputs (recommendations, examples, dead letters) go through librdkafka: produce() is a
        # non-blocking C call, far cheaper per message than aiokafka on 2 cores; 1 ms linger batches
        # bursts without visible latency.
        return self._opened("_producer", lambda: Producer(producer_config(self.settings, **{"linger.ms": 1})))

    @property
    def bulk_producer(self) -> Producer:
        # Records nobody waits for (ranking logs): 50 ms linger puts a second's worth into ~20 broker
        # requests. On the answer producer each log cost the broker one produce request (built
        # after its answer's 1 ms linger had closed): measured 0.9 per answer.
        return self._opened(
            "_bulk_producer", lambda: Producer(producer_config(self.settings, **{"linger.ms": BULK_LINGER_MS}))
        )

    @property
    def store(self):
        return self._opened("_store", self._open_store)

    def _open_store(self):
        from recstream.vectorstore import VectorStore

        return VectorStore(self.settings)

    @property
    def embedder(self):
        return self._opened("_embedder", self._open_embedder)

    def _open_embedder(self):
        from streams.inference import TritonTextEmbedder

        return TritonTextEmbedder(self.settings)

    @property
    def item_embedder(self):
        """What the catalog indexer embeds items with: the trained `item_encoder` (text + learned ID
        residual) when Triton serves one, else the plain `text_encoder` (a repository without
        trained models). Chosen once at start-up."""
        return self._opened("_item_embedder", self._pick_item_embedder)

    def _pick_item_embedder(self):
        from recstream.contracts.models import ITEM_ENCODER
        from streams.inference import TritonTextEmbedder, model_ready

        if model_ready(self.settings, ITEM_ENCODER):
            return TritonTextEmbedder(self.settings, model=ITEM_ENCODER)
        log.info("no '%s' model on Triton; items are embedded by their text alone", ITEM_ENCODER)
        return self.embedder

    @property
    def session_encoder(self):
        """The trained session transformer on Triton, or None (sessions are then the decayed sum
        of their item vectors, as before a model was trained). Chosen once at start-up."""
        return self._opened("_session_encoder", self._pick_session_encoder) or None

    def _pick_session_encoder(self):
        from recstream.contracts.models import SESSION_ENCODER
        from streams.inference import TritonSessionEncoder, model_ready

        if self.ranker_mode != "inprocess" and model_ready(self.settings, SESSION_ENCODER):
            return TritonSessionEncoder(self.settings)
        log.info("no '%s' model on Triton; session vectors are decayed sums", SESSION_ENCODER)
        return False

    @property
    def sequence_scorer(self):
        """The ID sequence model on Triton (streams.inference.TritonSequenceScorer), or None: lists
        then come from the vector search and the ranker's statistic alone. Chosen once at start-up,
        with the learned ranker only (its fusion was chosen against it), unless SEQUENCE_MODEL=false."""
        return self._opened("_sequence_scorer", self._pick_sequence_scorer) or None

    def _pick_sequence_scorer(self):
        from recstream.contracts.models import SEQUENCE_SCORER
        from streams.inference import TritonSequenceScorer, model_ready

        if not self.settings.sequence_model:
            log.info("SEQUENCE_MODEL=false: lists go without the sequence model")
            return False
        if self.ranker_mode != "inprocess" and model_ready(self.settings, SEQUENCE_SCORER):
            return TritonSequenceScorer(self.settings)
        log.info("no '%s' model on Triton; lists go without the sequence model", SEQUENCE_SCORER)
        return False

    @property
    def hybrid_search(self):
        """streams.hybrid_search.LiveHybridSearch when the served text_encoder ships search weights
        (a fine-tuned query encoder from `make bench-search --export`), else None. Chosen once."""
        self._follow_search_weights()
        if self._hybrid_search is None and time.monotonic() >= self._hybrid_retry_at:
            from streams.hybrid_search import LiveHybridSearch
            from streams.inference import ModelUnavailable

            try:
                weights = self.embedder.search_weights()
            except ModelUnavailable as exc:
                self._hybrid_retry_at = time.monotonic() + HYBRID_RETRY_S
                log.warning("search weights unknown for now (%s); searches go through the ranker", exc)
                return None
            self._hybrid_search = LiveHybridSearch(self, weights, self.embedder.served_tag()) if weights else False
            if weights:
                log.info("searches are answered by the hybrid search (%s, %s)", self._hybrid_search.version, weights)
        return self._hybrid_search or None

    @property
    def lexical_search(self):
        """BM25 over a catalogue snapshot, for searches without a query vector (the text encoder
        cannot be reached): the hybrid search's own snapshot where it has a lexical weight, else
        one built for this alone on the first such search. It never asks the encoder."""
        live = self._hybrid_search
        if live and live.weights.lexical:
            return live
        if self._lexical_search is None:
            from recstream.search.served import SearchWeights
            from streams.hybrid_search import LiveHybridSearch

            self._lexical_search = LiveHybridSearch(self, SearchWeights(lexical=1.0), "bm25")
        return self._lexical_search

    def _follow_search_weights(self) -> None:
        """A new text_encoder version may bring other weights, or none (a rollback to the zero-shot
        encoder): the hybrid search follows what the embedder read with the version change."""
        from streams.inference import UNKNOWN

        seen = self.embedder.weights_seen
        if seen is UNKNOWN or self._hybrid_search is None:
            return
        current = self._hybrid_search.weights if self._hybrid_search else None
        if seen == current:
            return
        from streams.hybrid_search import LiveHybridSearch

        log.info("search weights changed with %s: %s -> %s", self.embedder.version, current, seen)
        self._hybrid_search = LiveHybridSearch(self, seen, self.embedder.version) if seen else False

    @property
    def session_vectors(self):
        """Session vectors of active users, refreshed in the background (streams.session_vectors);
        None without a session encoder."""
        if self.session_encoder is None:
            return None
        return self._opened("_session_vectors", self._start_session_vectors)

    def _start_session_vectors(self):
        from streams.session_vectors import SessionVectors

        return SessionVectors(self, self.session_encoder).start()

    @property
    def policy(self):
        """The exploration policy that orders each answer (settings.exploration_policy), with its rng."""
        return self._opened("_policy", self._make_policy)

    def _make_policy(self):
        from recstream.explore import make_policy

        self._rng = np.random.default_rng(self.settings.exploration_seed)  # before the policy shows
        return make_policy(self.settings.exploration_policy)

    @property
    def rng(self):
        self.policy  # noqa: B018 - builds the rng together with the policy
        return self._rng

    @property
    def policy_feedback(self):
        """Shown-slot memory of a policy that learns online (ts:/lift:), None for fixed policies.
        The recommender ranks through it and the feedback joiner reports closed windows to it."""
        feedback = self._opened("_policy_feedback", self._make_policy_feedback)
        return None if feedback is False else feedback  # not `or`: an empty memory has len 0

    def _make_policy_feedback(self):
        from recstream.explore.feedback import CLIENT_DELAY_GRACE_S, PolicyFeedback, learns_online

        if not learns_online(self.policy):
            return False
        feedback = PolicyFeedback(
            self.policy,
            self.settings.policy_feedback_slots,
            max_age_s=self.settings.feedback_window_s + CLIENT_DELAY_GRACE_S,
        )
        feedback.load(self.policy_state_path)
        return feedback

    def save_policy_state(self) -> None:
        """Snapshot the policy's evidence; a failed write is logged and retried at the next snapshot
        (losing a snapshot costs a little learning, never the worker)."""
        try:
            self._policy_feedback.save(self.policy_state_path)
        except OSError as exc:
            log.error("could not save the policy state to %s: %s", self.policy_state_path, exc)

    @property
    def policy_state_path(self) -> Path:
        """Where this worker keeps what its policy learned (one file per app and worker name)."""
        return self.settings.run_dir / "policy" / f"{app_id(self.settings)}-{self.worker}.npz"

    @property
    def ranker(self):
        return self._opened("_ranker", self._pick_ranker)

    def _pick_ranker(self):
        from recstream.contracts.models import RANKER
        from streams.inference import model_ready
        from streams.rankers import RANKERS

        mode = self.ranker_mode
        if mode == "auto":
            mode = "triton" if model_ready(self.settings, RANKER) else "inprocess"
        if mode not in RANKERS:
            raise ValueError(f"unknown ranker {self.ranker_mode!r}; choose auto or one of {sorted(RANKERS)}")
        log.info("ranking with the %s ranker", mode)
        return RANKERS[mode](self.settings)

    # --- helpers the agents share ----------------------------------------------------------------

    def send(self, logical: str, key: bytes | None, value: bytes, bulk: bool = False) -> None:
        """`bulk`: nobody waits for the record (logs), so it may linger and share broker requests."""
        topic = TOPICS[logical].name(self.settings.topic_prefix)
        self.produce(topic, key, value, self.bulk_producer if bulk else self.producer)

    def produce(self, topic: str, key: bytes | None, value: bytes, producer: Producer | None = None) -> None:
        """Answers and dead letters produced while a request or catalog batch is handled join that
        batch's outputs: its offsets are committed only once the broker has them (at least once)."""
        if producer is None:
            producer = self.producer
        on_delivery = self._on_delivery
        batch = CURRENT_BATCH.get()
        if batch is not None and producer is self._producer:  # ranking logs (bulk) hold no offsets back
            on_delivery = batch.track(on_delivery)
        produce_or_wait(producer, topic, key, value, on_delivery)
        producer.poll(0)

    def _on_delivery(self, err: Any, msg: Any) -> None:
        count_delivery(err, msg, self.worker)
        if err is not None:
            log.error("delivery to %s failed: %s", msg.topic(), err)

    @property
    def dead_letters(self) -> DeadLetterSink:
        return DeadLetterSink(lambda topic, key, value: self.produce(topic, key, value), self.worker)

    def decode_events(self, spec: TopicSpec, events: Iterable[Consumed]) -> list[tuple[Any, Any]]:
        """(event, model) for valid messages; invalid ones go to the dead-letter topic, logged with
        topic[partition]@offset, and never stop the stream."""
        out = []
        for ev in events:
            EVENTS_IN.labels(topic=ev.topic, worker=self.worker).inc()
            try:
                out.append((ev, decode(spec, ev.value, self.settings.max_message_bytes, ev.key, ev.partition)))
            except InvalidEvent as exc:
                self.dead_letter(ev, exc.detail, exc.reason)
        return out

    def dead_letter(self, ev: Consumed, error: str, error_type: str) -> None:
        source = RefusedMessage(ev.topic, ev.partition, ev.offset, ev.key, ev.value)
        self.dead_letters.publish(source, error=error, error_type=error_type)

    async def in_thread(self, fn, *args):
        """Run a blocking model/store call off the event loop. A caller cancelled meanwhile (a stop
        abandoning a catalog batch) still waits for the call to end: the thread cannot be
        interrupted, and closing the store under a write (or a collection swap) could lose the index."""
        call = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            await asyncio.wait([call])
            raise

    def close(self) -> None:
        if self._session_vectors is not None:
            self._session_vectors.stop()
        if self.requests is not None:
            self.requests.stop()
        if self.catalog is not None:
            self.catalog.stop()
        if self.behaviour is not None:
            self.behaviour.stop()  # commits what it folded (after flushing the changelog)
        if self._policy_feedback not in (None, False) and self._policy_feedback.unsaved:
            self.save_policy_state()
        for producer in (self._producer, self._bulk_producer):
            if producer is not None:
                producer.flush(10)  # 10 s: enough for a local broker to ack what is queued
        if self._store is not None:
            self._store.close()
        if self._embedder is not None:
            self._embedder.close()
        if self._item_embedder is not None and self._item_embedder is not self._embedder:
            self._item_embedder.close()
        self.executor.shutdown(wait=False, cancel_futures=True)

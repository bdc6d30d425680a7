"""Prometheus metrics shared by every service and worker: one name and label set per concept.

Names follow `recstream_<subsystem>_<what>_<unit>`; labels are low-cardinality (topic, stage,
reason, model_version, arm) so dashboards can aggregate across workers.
"""

from __future__ import annotations

import sys

from prometheus_client import Counter, Gauge, Histogram, start_http_server
from prometheus_client.metrics import MetricWrapperBase

# Latency buckets in seconds, dense under 50 ms: the request budget the system is built for.
LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)

EVENTS_IN = Counter("recstream_events_in_total", "Messages consumed", ["topic", "worker"])
EVENTS_OUT = Counter("recstream_events_out_total", "Messages produced", ["topic", "worker"])
DEAD_LETTERS = Counter(
    "recstream_dead_letters_total", "Messages sent to a dead-letter topic", ["topic", "reason", "worker"]
)
PRODUCE_ERRORS = Counter("recstream_produce_errors_total", "Messages the broker did not acknowledge", ["topic"])
CONSUMER_ERRORS = Counter(
    "recstream_consumer_errors_total",
    "Errors a consumer reported in place of a message (e.g. a subscribed topic deleted); consuming goes on",
    ["worker", "error"],
)
CONSUMER_LAG = Gauge(
    "recstream_consumer_lag",
    "Messages behind the log end: committed offsets of the consumer groups with members, from the broker",
    ["topic", "partition", "group"],
)
STAGE_LATENCY = Histogram(
    "recstream_stage_latency_seconds", "Time spent per processing stage", ["stage"], buckets=LATENCY_BUCKETS
)
TRITON_LATENCY = Histogram(
    "recstream_triton_request_seconds", "Triton call latency", ["model"], buckets=LATENCY_BUCKETS
)
TRITON_ERRORS = Counter("recstream_triton_errors_total", "Failed or timed-out Triton calls", ["model", "kind"])
DEGRADED = Counter("recstream_degraded_answers_total", "Answers served from retrieval scores alone", ["reason"])
MODEL_VERSION_LIVE = Gauge(
    "recstream_model_version_live",
    "1 for the highest READY version of each model, as Triton reports it",
    ["model", "version"],
)
# The continual trainer's view, kept apart: when the trainer exported Triton's gauge too, an alert on
# "no model live in Triton" could never fire while the trainer ran.
REGISTRY_LIVE_VERSION = Gauge(
    "recstream_registry_live_version",
    "1 for the version the continual trainer's registry has made live, per model",
    ["model", "version"],
)


def serve_metrics(port: int) -> None:
    """Expose /metrics on `port` (0 = don't), for Prometheus to scrape this process."""
    if port:
        start_http_server(port)


# Event produce (Kafka CreateTime) -> session features updated; dense up to 1 s for the 100 ms target.
FEATURE_FRESHNESS = Histogram(
    "recstream_feature_freshness_seconds",
    "Behaviour event produce to session features updated",
    buckets=(0.002, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
FEATURE_EVENTS = Counter("recstream_feature_events_total", "Behaviour events folded into session features", ["result"])
# Online quality: CTR = rate(clicks) / rate(impressions) in PromQL, per model version and exploration arm.
IMPRESSIONS = Counter(
    "recstream_impressions_total",
    "Items shown to users (CTR = rate of clicks / rate of these)",
    ["model_version", "arm"],
)
CLICKS = Counter("recstream_clicks_total", "Clicks on shown items", ["model_version", "arm"])
POLICY_FEEDBACK = Counter(
    "recstream_policy_feedback_total",
    "Closed impression windows handed to an online-learning exploration policy, by outcome",
    ["outcome"],  # clicked | not_clicked | unknown (slot not remembered) | evicted (memory full) | expired (too old)
)
# Exported at 0 from the start, as Prometheus advises.
for _outcome in ("clicked", "not_clicked", "unknown", "evicted", "expired"):
    POLICY_FEEDBACK.labels(outcome=_outcome)
# Continual learning: a run ends with result=promoted|rejected|failed; promotions/rollbacks move the live version.
TRAINING_RUNS = Counter("recstream_training_runs_total", "Continual-learning training runs", ["model", "result"])
PROMOTIONS = Counter("recstream_model_promotions_total", "Live model version changes", ["model", "action"])
# Training examples by where their ranker inputs come from: served (logged at scoring time) or rebuilt.
TRAINING_INPUTS = Counter(
    "recstream_training_examples_total", "Training examples the trainer took in, by ranker inputs", ["inputs"]
)
for _inputs in ("served", "rebuilt"):
    TRAINING_INPUTS.labels(inputs=_inputs)
# The trainer's off-policy check of a gated candidate on the logged pools: result=passed|refused|skipped,
# and the last paired doubly robust CTR difference candidate - live (bound=estimate|low|high).
OFF_POLICY_CHECKS = Counter(
    "recstream_off_policy_checks_total",
    "Trainer off-policy checks of candidates against the live version",
    ["model", "result"],
)
OFF_POLICY_DIFF = Gauge(
    "recstream_off_policy_ctr_difference",
    "Last checked candidate's CTR minus the live version's on the logged pools (doubly robust, paired)",
    ["model", "bound"],
)
# HTTP gateway: route is the path template (low cardinality), status the response code.
HTTP_REQUESTS = Counter(
    "recstream_http_requests_total",
    "Gateway HTTP requests (route: the path template; method: a standard one, else other; status 499: "
    "the client went away before an answer)",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "recstream_http_request_seconds", "Gateway HTTP request latency", ["route"], buckets=LATENCY_BUCKETS
)
INDEXED_ITEMS = Gauge("recstream_indexed_items", "Items in the vector store, as seen by the catalog indexer")
REEMBEDS = Counter(
    "recstream_catalog_reembeds_total", "Catalog re-embeddings after a new item-encoder version went live"
)


def metrics_table() -> str:
    """README's metrics table, made from the metrics themselves (tests/ops/test_metrics_doc.py keeps
    the README equal to it): `python -m recstream.telemetry` prints it."""
    rows = ["| metric | type | labels | what it measures |", "| --- | --- | --- | --- |"]
    for metric in vars(sys.modules[__name__]).values():
        if isinstance(metric, MetricWrapperBase):
            name = metric._name + ("_total" if metric._type == "counter" else "")
            labels = ", ".join(metric._labelnames) or "-"
            rows.append(f"| `{name}` | {metric._type} | {labels} | {metric._documentation} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(metrics_table(), end="")

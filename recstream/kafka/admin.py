"""Create the registry's topics and check existing ones match it.

A topic that exists with fewer partitions than the registry declares would silently break
per-user ordering assumptions and the tables' co-partitioning, so it is a named error; so is a
keyed topic with more (producers would place keys by the real count, consumers check placement by
the registry's, and refuse about half the events). An existing topic's cleanup policy and
retention are compared with the registry's: provisioning (`topics`, `stack up`) sets them, each
change logged (a topic created before a retention change kept the old one for ever); a worker's
start only warns, so an operator's deliberate setting, or a cluster that does not let workers
describe or alter configs, never stops it.
"""

from __future__ import annotations

import logging

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, NewTopic
from tenacity import Retrying, retry_if_exception_type, retry_if_result, stop_after_delay, wait_fixed

from recstream.config import Settings
from recstream.contracts.topics import DEAD_LETTERS, TOPICS, TopicSpec, dead_letter_topic

log = logging.getLogger(__name__)

# Admin calls are rare and happen at start-up; 30 s covers a broker still electing its controller.
ADMIN_TIMEOUT_S = 30.0


class TopicMismatch(RuntimeError):
    """An existing topic disagrees with the registry (e.g. partition count)."""


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap})


def desired_topics(prefix: str = "") -> dict[str, TopicSpec]:
    """Full topic name -> spec, dead-letter topics included."""
    out: dict[str, TopicSpec] = {}
    for spec in TOPICS.values():
        out[spec.name(prefix)] = spec
        out[dead_letter_topic(spec.name(prefix))] = DEAD_LETTERS
    return out


def ensure_topics(settings: Settings, extra: dict[str, int] | None = None, align: bool = False) -> list[str]:
    """Create missing topics, verify partition counts of existing ones; returns the names created.
    `align`: set existing topics' retention and cleanup policy to the registry's (else: warn)."""
    admin = admin_client(settings)
    wanted = desired_topics(settings.topic_prefix)
    existing = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
    new: list[NewTopic] = []
    kept: dict[str, TopicSpec] = {}
    for name, spec in wanted.items():
        if name in existing:
            have = len(existing[name].partitions)
            if have < spec.partitions or (spec.keyed_placement and have != spec.partitions):
                raise TopicMismatch(
                    f"topic {name} has {have} partitions, registry declares {spec.partitions}"
                    + (" (its events are placed by key over exactly that many)" if spec.keyed_placement else "")
                )
            kept[name] = spec
            continue
        # replication: the broker's default.replication.factor (1 on the dev broker, 3 on a cluster)
        new.append(NewTopic(name, num_partitions=spec.partitions, replication_factor=-1, config=spec.config()))
    for name, partitions in (extra or {}).items():
        if name not in existing:
            new.append(NewTopic(name, num_partitions=partitions, replication_factor=-1))
    align_topic_configs(admin, kept, apply=align)
    if not new:
        return []
    futures = admin.create_topics(new, operation_timeout=ADMIN_TIMEOUT_S, request_timeout=ADMIN_TIMEOUT_S)
    created = []
    for name, fut in futures.items():
        try:
            fut.result()
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won the race
                raise
    log.info("created topics: %s", ", ".join(sorted(created)))
    wait_until_visible(admin, [t.topic for t in new])
    return created


def align_topic_configs(
    admin: AdminClient, topics: dict[str, TopicSpec], apply: bool = True
) -> dict[str, dict[str, str]]:
    """Existing topics' cleanup policy and retention against the registry's: set where they differ
    (`apply`), else warned about; returns the differences, per topic: {key: "old -> new"}. A
    cluster that refuses to describe or alter configs is warned about, never an error."""
    if not topics:
        return {}
    resources = [ConfigResource(ConfigResource.Type.TOPIC, name) for name in topics]
    changes: dict[str, dict[str, str]] = {}
    try:
        described = admin.describe_configs(resources, request_timeout=ADMIN_TIMEOUT_S)
        current_of = {resource.name: fut.result() for resource, fut in described.items()}
    except KafkaException as exc:
        log.warning("cannot compare topic configs with the registry's (%s); left as they are", exc)
        return {}
    for name, entries in current_of.items():
        current = {key: entry.value for key, entry in entries.items()}
        wanted = topics[name].config()
        differ = {k: v for k, v in wanted.items() if current.get(k) != v}
        if differ:
            changes[name] = {k: f"{current.get(k)} -> {v}" for k, v in differ.items()}
    if not changes:
        return {}
    if not apply:
        for name, diff in changes.items():
            log.warning(
                "topic %s differs from the registry (%s); `python -m recstream.ops.cli topics` sets it",
                name,
                ", ".join(f"{k} {v}" for k, v in diff.items()),
            )
        return changes
    updates = [
        ConfigResource(
            ConfigResource.Type.TOPIC,
            name,
            incremental_configs=[
                ConfigEntry(k, topics[name].config()[k], incremental_operation=AlterConfigOpType.SET) for k in diff
            ],
        )
        for name, diff in changes.items()
    ]
    try:
        for fut in admin.incremental_alter_configs(updates, request_timeout=ADMIN_TIMEOUT_S).values():
            fut.result()
    except KafkaException as exc:
        log.warning("cannot set topic configs to the registry's (%s): %s", exc, changes)
        return changes
    for name, diff in changes.items():
        log.warning("topic %s set to the registry's config: %s", name, ", ".join(f"{k} {v}" for k, v in diff.items()))
    return changes


def wait_until_visible(admin: AdminClient, topics: list[str], timeout_s: float = ADMIN_TIMEOUT_S) -> None:
    """Block until broker metadata shows every topic with a leader for each partition.

    CreateTopics returns once the controller has committed the topic; the broker's metadata cache
    may lag for a moment, and a client asking right then hears UNKNOWN_TOPIC_OR_PART (a readiness
    probe did, right after provisioning)."""

    def missing() -> list[str]:
        meta = admin.list_topics(timeout=ADMIN_TIMEOUT_S).topics
        return [
            t
            for t in topics
            if t not in meta
            or meta[t].error is not None
            or not meta[t].partitions
            or any(p.leader < 0 for p in meta[t].partitions.values())
        ]

    retrying = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(0.05),
        retry=retry_if_result(bool) | retry_if_exception_type(KafkaException),  # a metadata call may fail
        retry_error_callback=lambda state: state.outcome.result(),  # give back what is still missing
    )
    left = retrying(missing)
    if left:
        raise TopicMismatch(f"topics not visible in broker metadata after {timeout_s}s: {sorted(left)}")

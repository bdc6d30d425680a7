"""The one command-line entry point: `python -m recstream.ops.cli --help`.

Applications' helpers (produce, tail, replay) and operators' commands (stack, demo) live here;
each command only wires settings to library functions.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import typer
from tqdm import tqdm

from recstream.config import Settings, get_settings
from recstream.contracts.topics import TOPICS, dead_letter_topic
from recstream.ops.models_cli import models_app, setup_logging, train

app = typer.Typer(help="recstream: real-time search and recommendation on Kafka", no_args_is_help=True)


@app.command()
def topics() -> None:
    """Create the registry's topics (and dead-letter topics) on the broker; verify existing ones and set
    their retention and cleanup policy to the registry's."""
    from recstream.kafka.admin import ensure_topics

    created = ensure_topics(get_settings(), align=True)
    typer.echo(f"created {len(created)} topics" + (f": {', '.join(sorted(created))}" if created else ""))


@app.command()
def produce(
    topic: str = typer.Argument(..., help=f"logical topic: {', '.join(TOPICS)}"),
    event: str = typer.Argument("-", help="event JSON, or - to read JSON lines from stdin"),
) -> None:
    """Validate and send events to a topic."""
    from recstream.client import EventProducer

    _known_topic(topic)
    lines = sys.stdin if event == "-" else [event]
    with EventProducer(get_settings(), worker="cli") as producer:
        n = 0
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                producer.send(topic, json.loads(line))
            except ValueError as exc:  # not JSON, or not a valid event (pydantic's error is a ValueError)
                where = f"line {number}" if event == "-" else "EVENT"
                typer.echo(f"error: {where} is not a valid {topic} event ({n} sent before it):\n{exc}", err=True)
                raise typer.Exit(2) from exc
            n += 1
    typer.echo(f"sent {n} events to {topic}", err=True)


def _known_topic(topic: str) -> None:
    if topic not in TOPICS:
        raise typer.BadParameter(f"unknown topic {topic!r}; known: {', '.join(TOPICS)}", param_hint="TOPIC")


@app.command()
def tail(
    topic: str = typer.Argument(..., help="logical topic, or a full topic name such as behaviour.dlq"),
    from_beginning: bool = typer.Option(False, "--from-beginning", help="start at the oldest message"),
    limit: int = typer.Option(0, help="stop after N messages (0 = follow forever)"),
    timeout_s: float = typer.Option(0, help="stop after this many idle seconds (0 = never)"),
) -> None:
    """Print a topic's messages as JSON lines (raw, so dead letters and bad input show as they are)."""
    from confluent_kafka import Consumer, KafkaError

    settings = get_settings()
    name = TOPICS[topic].name(settings.topic_prefix) if topic in TOPICS else topic
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"recstream-tail-{time.time_ns()}",
            "auto.offset.reset": "earliest" if from_beginning else "latest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([name])
    seen, idle_since = 0, time.monotonic()
    try:
        while not limit or seen < limit:
            msg = consumer.poll(0.5)
            if msg is not None and (err := msg.error()) is not None:
                if err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                    raise typer.BadParameter(f"no topic {name} on {settings.kafka_bootstrap}", param_hint="TOPIC")
                typer.echo(f"{name}: {err}", err=True)  # the broker's news (down, a leader moving)
                if err.fatal():
                    raise typer.Exit(1)
            if msg is None or msg.error():
                if timeout_s and time.monotonic() - idle_since > timeout_s:
                    break
                continue
            idle_since = time.monotonic()
            value = msg.value() or b""
            try:
                payload = json.loads(value)
            except ValueError:
                payload = value.decode("utf-8", "replace")
            key = msg.key().decode("utf-8", "replace") if msg.key() else None
            typer.echo(json.dumps({"partition": msg.partition(), "offset": msg.offset(), "key": key, "value": payload}))
            seen += 1
    finally:
        consumer.close()


@app.command()
def replay(
    source: str = typer.Argument(..., help="a .jsonl file of {topic, event} lines, or a data set (ml-100k or path)"),
    rate: float = typer.Option(1000.0, help="events per second (0 = as fast as possible)"),
    limit: int = typer.Option(
        0, help="send at most N events (a data set: N behaviour events after its catalog; 0 = all)"
    ),
    catalog: bool = typer.Option(True, help="for a data set: send its catalog first"),
) -> None:
    """Replay recorded events, or a real data set as catalog + behaviour events, at a given rate."""
    from itertools import islice

    from recstream.client import EventProducer
    from recstream.data.events import behaviour_events, catalog_events
    from recstream.ops.replay import paced, read_jsonl

    setup_logging()
    settings = get_settings()
    path = Path(source)
    if path.suffix == ".jsonl":
        if not path.is_file():
            raise typer.BadParameter(f"no file {path}", param_hint="SOURCE")
        if not catalog:
            raise typer.BadParameter(
                "is for a data set; a .jsonl file is replayed as recorded", param_hint="--no-catalog"
            )
        stream = islice(read_jsonl(path), limit or None)
    else:
        from recstream.data.datasets import DataFormatError, load_dataset

        try:
            data = load_dataset(source)
        except DataFormatError as exc:
            raise typer.BadParameter(str(exc), param_hint="SOURCE") from exc
        items = [("catalog", e) for e in catalog_events(data.items)] if catalog else []
        events = (("behaviour", e) for e in behaviour_events(data.interactions))
        stream = iter(items + list(islice(events, limit or None)))
    sent = 0
    with EventProducer(settings, worker="replay") as producer:
        try:
            for topic, event in tqdm(paced(stream, rate), desc="replay", unit="ev"):
                producer.send(topic, event)
                sent += 1
        except ValueError as exc:  # a bad line of the file, or an invalid event in it
            typer.echo(f"error: {exc}\n({sent} events sent before it)", err=True)
            raise typer.Exit(2) from exc
    typer.echo("replay done", err=True)


@app.command("dead-letters")
def dead_letters(topic: str = typer.Argument("behaviour")) -> None:
    """Show the dead-letter topic of a logical topic from the beginning (stops when idle)."""
    _known_topic(topic)
    name = TOPICS[topic].name(get_settings().topic_prefix)
    tail(dead_letter_topic(name), from_beginning=True, limit=0, timeout_s=3)


def _pool_rescorer(settings: Settings, version: int, logs: list[Any], timeout_s: float) -> Any:
    """Model `version` from the registry, ready to rescore the logged pools: item vectors are the
    catalog texts' embeddings (the encoder the catalog indexer uses), only for pooled items."""
    from recstream.client.consumer import read_to_end
    from recstream.contracts.events import ItemUpsert
    from recstream.models.repository import load_exported, versions
    from recstream.models.served import item_vectors_as_indexed
    from recstream.ope.rescoring import PoolRescorer

    available = versions(settings.model_repo)
    if version not in available:
        raise ValueError(f"no model version {version} in {settings.model_repo} (versions: {available})")
    ranker = load_exported(settings.model_repo, version=version)
    pooled = {c.item_id for rl in logs for c in rl.pool}
    upserts, _ = read_to_end(
        settings, "catalog", timeout_s, keep=lambda ev: isinstance(ev, ItemUpsert) and ev.item_id in pooled
    )
    latest = {ev.item_id: ev for ev in upserts}  # type: ignore[attr-defined]
    if not latest:
        return PoolRescorer(ranker.net, {})  # every pool is reported unusable: its items are not in the catalog
    vectors = item_vectors_as_indexed(settings.model_repo, [ev.text() for ev in latest.values()], list(latest))
    return PoolRescorer(ranker.net, dict(zip(latest, vectors, strict=True)))


@app.command()
def ope(
    target: str = typer.Argument(..., help="candidate policy: greedy | pl:T[:HEAD] | eps:E[:SLOTS]"),
    model_version: int | None = typer.Option(
        None,
        "--model-version",
        help="rank the logged pools with this version from the model registry (e.g. one not yet live) "
        "and compare it with the logging model",
    ),
    timeout_s: float = typer.Option(120.0, help="give up reading the logs after this many seconds"),
    confidence: float = typer.Option(0.95, help="confidence level of the intervals"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
) -> None:
    """Estimate a candidate ranking policy's click-through rate from the live policy's logs
    (ranking-log joined with training-examples; IPS, SNIPS and doubly robust, 95% CIs); with
    --model-version, the policy acting on another model version's order of the logged pools."""
    from recstream.client.consumer import read_to_end
    from recstream.ope.logs import check_target, evaluate_logs

    settings = get_settings()
    try:
        check_target(target)
        logs, bad_logs = read_to_end(settings, "ranking-log", timeout_s)
        logged = {rl.request_id for rl in logs}  # type: ignore[attr-defined]
        # Only the examples of logged answers: training examples of greedy answers may be most of the topic.
        examples, bad_examples = read_to_end(
            settings, "training-examples", timeout_s, keep=lambda ex: ex.request_id in logged
        )
        rescore = None if model_version is None else _pool_rescorer(settings, model_version, logs, timeout_s)
        report = evaluate_logs(
            logs,  # type: ignore[arg-type]
            examples,  # type: ignore[arg-type]
            target,
            confidence,
            rescore,
            None if model_version is None else str(model_version),
        )
    except (ValueError, TimeoutError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc
    if bad_logs or bad_examples:
        report.warnings.append(f"skipped {bad_logs} invalid ranking logs and {bad_examples} invalid training examples")
    if as_json:
        typer.echo(report.model_dump_json(indent=2))
        return
    typer.echo(
        f"target {report.target}: {report.requests} logged requests ({report.impressions} impressions; "
        f"{report.requests_incomplete} left out with missing outcomes), logged by {report.logging_policies}"
    )
    typer.echo(f"logged CTR {report.logged_ctr:.4f}; effective sample size {report.effective_sample_size:.0f}")
    typer.echo(f"{'method':<8} {'CTR':>8}  {report.confidence:.0%} CI")
    for e in report.estimates:
        typer.echo(f"{e.method:<8} {e.ctr:>8.4f}  [{e.low:.4f}, {e.high:.4f}]")
    if report.candidate_model is not None:
        typer.echo(f"model version {report.candidate_model} - logging model, same policy over the same pools:")
        for e in report.versus_logging_model:
            typer.echo(f"{e.method:<8} {e.ctr:>+8.4f}  [{e.low:+.4f}, {e.high:+.4f}]")
    for w in report.warnings:
        typer.echo(f"warning: {w}", err=True)


stack_app = typer.Typer(help="The embedded local stack: Kafka + Triton + stream worker")
app.add_typer(stack_app, name="stack")


@stack_app.command("up")
def stack_up(worker: bool = typer.Option(True, help="also start the stream worker")) -> None:
    """Start the local stack in the background (state, logs and PIDs under RUN_DIR)."""
    from recstream.ops.stack import LocalStack

    setup_logging()
    stack = LocalStack(get_settings())
    stack.up(with_worker=worker)
    typer.echo(json.dumps(stack.status()))


@stack_app.command("down")
def stack_down() -> None:
    """Stop everything `stack up` started."""
    from recstream.ops.stack import LocalStack

    LocalStack(get_settings()).down()


@stack_app.command("status")
def stack_status() -> None:
    from recstream.ops.stack import LocalStack

    typer.echo(json.dumps(LocalStack(get_settings()).status()))


@app.command()
def demo(
    events: int = typer.Option(20_000, help="real behaviour events to replay first"),
    keep_running: bool = typer.Option(False, help="leave the stack up afterwards"),
) -> None:
    """Run the live demo on the embedded default, replaying MovieLens-100k."""
    from recstream.ops.demo import run

    setup_logging()
    run(get_settings(), events=events, keep_running=keep_running)


@app.command()
def bench(name: str = typer.Argument(..., help="benchmark name: runs `python -m bench.bench_NAME`")) -> None:
    """Run one benchmark (writes bench/results/NAME.json and prints its table)."""
    import subprocess

    from recstream.config import REPO_ROOT

    available = sorted(p.stem.removeprefix("bench_") for p in (REPO_ROOT / "bench").glob("bench_*.py"))
    if name not in available:
        raise typer.BadParameter(f"unknown benchmark {name!r}; available: {', '.join(available)}")
    # A child process, so a benchmark runs exactly as `make bench-NAME` runs it (its own settings, logging).
    raise typer.Exit(subprocess.call([sys.executable, "-m", f"bench.bench_{name}"], cwd=REPO_ROOT))


@app.command()
def gateway(
    host: str = typer.Option("127.0.0.1", help="interface to bind"),
    port: int = typer.Option(8080, help="HTTP port (/metrics and the playground at / too)"),
) -> None:
    """Run the HTTP gateway (API keys from GATEWAY_API_KEYS); same as `python -m services.gateway`."""
    from services.gateway.__main__ import main
    from services.gateway.schemas import GatewayLimits

    limits = GatewayLimits()
    main(
        host=host,
        port=port,
        max_batch=limits.max_batch,
        max_body_bytes=limits.max_body_bytes,
        request_timeout_s=limits.request_timeout_s,
    )


app.command()(train)
app.add_typer(models_app, name="models")

if __name__ == "__main__":
    app()

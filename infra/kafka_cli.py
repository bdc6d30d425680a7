"""`python -m infra.kafka_cli install|start|stop|status [--run-dir run/kafka] [--port 9092]`: the
local broker for operators (`make setup` installs, `make up`/`make down` go through recstream.ops)."""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

import typer

from infra.kafka_broker import DEFAULT_RUN_DIR, KafkaBroker, broker_answers
from infra.kafka_install import KAFKA_VERSION, BrokerError, dir_size, install

cli = typer.Typer(add_completion=False, help="Local Apache Kafka broker (KRaft) for the recstream stack.")
RunDirOpt = typer.Option(DEFAULT_RUN_DIR, "--run-dir", help="Config, data, log and PID file of the broker")


@cli.command("install")
def _cli_install(
    version: str = typer.Option(KAFKA_VERSION, help="Kafka release"),
    force: bool = typer.Option(False, help="Re-download even if the cache is complete"),
) -> None:
    """Fetch the broker jars into $RECSTREAM_CACHE_DIR (once)."""
    started = time.monotonic()
    libs = install(version, force=force)
    size = dir_size(libs)
    print(f"Kafka {version} jars at {libs}: {size / 1e6:.1f} MB (checked in {time.monotonic() - started:.1f} s)")


@cli.command("start")
def _cli_start(
    run_dir: Path = RunDirOpt,
    port: int = typer.Option(9092, help="Client port; 0 = pick a free one"),
    controller_port: int = typer.Option(9093, help="KRaft controller port; 0 = pick a free one"),
    version: str = typer.Option(KAFKA_VERSION, help="Kafka release"),
    timeout_s: float = typer.Option(30.0, help="Seconds to wait for the broker to answer"),
) -> None:
    """Start the broker detached and wait until clients can use it."""
    started = time.monotonic()
    broker = KafkaBroker(run_dir, port=port, controller_port=controller_port, version=version)
    existing = KafkaBroker.from_run_dir(run_dir)
    if existing.is_running():  # idempotent: report the broker this run dir already has
        broker = existing
    try:
        bootstrap = broker.start(timeout_s=timeout_s)
    except BrokerError as exc:
        print(exc, file=sys.stderr)
        raise typer.Exit(1) from None
    print(f"Kafka {version} ready at {bootstrap} (pid {broker.pid}) in {time.monotonic() - started:.1f} s")


@cli.command("stop")
def _cli_stop(run_dir: Path = RunDirOpt, grace_s: float = typer.Option(20.0, help="SIGTERM grace period")) -> None:
    """Stop the broker started from this run dir (by PID file)."""
    stopped = KafkaBroker.from_run_dir(run_dir).stop(grace_s=grace_s)
    print("Kafka stopped" if stopped else "Kafka was not running")


@cli.command("status")
def _cli_status(run_dir: Path = RunDirOpt) -> None:
    """Exit 0 when the broker runs and answers, 1 otherwise."""
    broker = KafkaBroker.from_run_dir(run_dir)
    if not broker.is_running():
        print(f"Kafka not running (run dir {broker.run_dir})")
        raise typer.Exit(1)
    ready = broker_answers(broker.bootstrap)
    print(f"Kafka {broker.version} pid {broker.pid} at {broker.bootstrap}: {'ready' if ready else 'NOT answering'}")
    raise typer.Exit(0 if ready else 1)


def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    cli()


if __name__ == "__main__":
    main()

"""`python -m services.gateway`: run the gateway with uvicorn (settings from the environment)."""

from __future__ import annotations

import logging

import typer
import uvicorn

from recstream.config import get_settings, model_option
from services.gateway.app import create_app
from services.gateway.middleware import RedactKeysFilter
from services.gateway.schemas import GatewayLimits

cli = typer.Typer(add_completion=False, help=__doc__)


@cli.command()
def main(
    host: str = typer.Option("127.0.0.1", help="Interface to bind (0.0.0.0 in a container)"),
    port: int = typer.Option(8080, help="HTTP port; /metrics is served on it too"),
    max_batch: int = model_option(GatewayLimits, "max_batch"),
    max_body_bytes: int = model_option(GatewayLimits, "max_body_bytes"),
    request_timeout_s: float = model_option(GatewayLimits, "request_timeout_s"),
) -> None:
    settings = get_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("uvicorn.access").addFilter(RedactKeysFilter())
    limits = GatewayLimits(max_batch=max_batch, max_body_bytes=max_body_bytes, request_timeout_s=request_timeout_s)
    uvicorn.run(create_app(settings, limits), host=host, port=port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    cli()

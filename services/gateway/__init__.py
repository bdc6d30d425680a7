"""HTTP gateway for applications that don't speak Kafka: `create_app(settings)` builds the FastAPI app."""

from services.gateway.app import GatewayLimits, create_app

__all__ = ["GatewayLimits", "create_app"]

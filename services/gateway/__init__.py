"""HTTP gateway for applications that don't speak Kafka: `create_app(settings)` builds the FastAPI app."""

from services.gateway.app import create_app
from services.gateway.schemas import GatewayLimits

__all__ = ["GatewayLimits", "create_app"]

"""Offline training: the served models (`make train`), their training loops and the training CLI.

Nothing here is imported by serving code (streams, the gateway, the Triton backends); see the
import contracts in pyproject.toml."""

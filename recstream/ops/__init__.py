"""Operator tools: the CLI, the local stack, the live demo and event replay."""

"""Long-running services around the stream processors (HTTP gateway, continual learner)."""

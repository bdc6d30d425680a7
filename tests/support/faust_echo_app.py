"""A minimal faust-streaming app for the platform test: read behaviour, write a tally per event.

Run as a worker: python tests/support/faust_echo_app.py worker (env: KAFKA_BOOTSTRAP, TOPIC_PREFIX, FAUST_DATA_DIR).
"""

from __future__ import annotations

import json
import os

import faust


def create_app() -> faust.App:
    prefix = os.environ["TOPIC_PREFIX"]
    app = faust.App(
        f"{prefix}echo",
        broker=f"kafka://{os.environ['KAFKA_BOOTSTRAP']}",
        datadir=os.environ["FAUST_DATA_DIR"],
        store="memory://",
        topic_replication_factor=1,
        topic_allow_declare=False,
        web_enabled=False,
    )
    source = app.topic(f"{prefix}behaviour", value_serializer="raw", key_serializer="raw")
    sink = app.topic(f"{prefix}training-examples", value_serializer="raw", key_serializer="raw")

    @app.agent(source)
    async def echo(stream):
        async for key, value in stream.items():
            event = json.loads(value)
            await sink.send(key=key, value=json.dumps({"seen": event["event_id"], "by": "faust"}).encode())

    return app


if __name__ == "__main__":
    create_app().main()

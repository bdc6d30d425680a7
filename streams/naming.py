"""Names the stream state depends on: the app id, the consumer groups and (through
streams.changelog.changelog_topic) every table's changelog topic.

Tables recover from their changelogs after a restart, so the id and APP_VERSION are part of the
state contract: changing either starts from empty tables and re-consumes the source topics from the
beginning; changing a table's value encoding without bumping APP_VERSION would make a restarted
worker read old bytes with new code.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from recstream.config import Settings

APP_NAME = "recstream-streams"
APP_VERSION = 1


def app_id(settings: Settings) -> str:
    return f"{settings.topic_prefix}{APP_NAME}-v{APP_VERSION}"


def catalog_group(settings: Settings) -> str:
    """The catalog indexer's consumer group (the id the worker's faust app had, so an index resumes).
    Workers sharing a Qdrant server share one index, so they split the catalog in one group. In local
    mode every worker fills its own index, which needs the whole catalog: the group is named after
    the index (host name and folder), so N workers each read every catalog partition, and a restarted
    worker resumes where its index stopped (a new folder, or a new host, reads the compacted topic
    from the beginning)."""
    if settings.qdrant_url:
        return app_id(settings)
    where = f"{socket.gethostname()}:{Path(settings.qdrant_path).resolve()}"
    return f"{app_id(settings)}-catalog-{hashlib.sha1(where.encode()).hexdigest()[:12]}"

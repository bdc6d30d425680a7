"""Token-overlap scoring: how a search is answered when the text encoder cannot be reached."""

from __future__ import annotations

import re

_TOKEN = re.compile(r"[a-z0-9]+")


def tokens(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.lower()) if len(t) > 1}


def lexical_score(query: str, payload: dict) -> float:
    """Share of query tokens found in the item's title, category and tags (0..1)."""
    q = tokens(query)
    if not q:
        return 0.0
    doc = tokens(
        " ".join(
            [str(payload.get("title", "")), str(payload.get("category", ""))]
            + [str(t) for t in payload.get("tags", []) or []]
        )
    )
    return len(q & doc) / len(q)

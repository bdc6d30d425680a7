"""Token-overlap scoring: how a search is answered when the text encoder cannot be reached."""

from __future__ import annotations

import re

#: Letters and digits of any script ("Amélie" is one word, and so is "東京"), not only ASCII.
_TOKEN = re.compile(r"[^\W_]+")


def tokens(text: str) -> set[str]:
    return {t for t in _TOKEN.findall(text.casefold()) if len(t) > 1 or not t.isascii()}


def lexical_score(query: str, payload: dict) -> float:
    """Share of query tokens found in the item's title, category, tags and description (0..1)."""
    q = tokens(query)
    if not q:
        return 0.0
    doc = tokens(
        " ".join(
            [str(payload.get("title", "")), str(payload.get("category", "")), str(payload.get("description") or "")]
            + [str(t) for t in payload.get("tags", []) or []]
        )
    )
    return len(q & doc) / len(q)

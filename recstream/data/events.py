"""An interaction data set as contract events: the catalog as item upserts, ratings as behaviour.

MovieLens-style ratings become behaviour: every rating is a `view`, a rating of 4+ also a
`click` and a 5 an `add_to_cart` + `purchase`; a user's session is one calendar day. The demo
replays these events; training encodes the same `ItemUpsert.text()` the catalog indexer will.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

from recstream.contracts.events import BehaviourEvent, BehaviourType, ItemUpsert

#: A text's last "|" segment of at most this many words is read as tags (MovieLens' genres);
#: longer, the text after the title is the item's description, whole.
MAX_TAG_WORDS = 16


def catalog_events(items) -> list[ItemUpsert]:
    """Items table (item_id, title, category, text, ...) -> catalog upserts. A short last "|"
    segment of the text becomes the tags ("Toy Story (1995) | Animation Children's Comedy"), a
    longer one the description (a text cut to its last 16 words lost the rest); an item without
    a category has none (""), which matches nothing in the session's category affinity, served
    as in training (it was served as "unknown", which every such item shared)."""
    out = []
    for row in items.itertuples(index=False):
        title, text = str(row.title), str(getattr(row, "text", "") or "")
        words = [w for w in text.split("|")[-1].split() if w]
        long_text = len(words) > MAX_TAG_WORDS
        rest = text[len(title) + 3 :] if text.startswith(f"{title} | ") else text
        price = getattr(row, "price", None)
        out.append(
            ItemUpsert(
                item_id=str(row.item_id),
                title=title,
                category=str(row.category or ""),
                tags=[] if long_text else words,
                description=rest.strip()[:8192] if long_text else "",
                price=None if price is None or price != price else float(price),  # NaN: none; 0: free
            )
        )
    return out


#: Namespace of replayed events' ids (uuid5): the same row of the same file is the same event.
REPLAY_NAMESPACE = uuid.UUID("8f0b3c1e-5a7d-4c2b-9e61-2d4f7a9b0c13")


def behaviour_events(interactions) -> Iterator[BehaviourEvent]:
    """Interactions table (user_id, item_id, ts, rating) in time order -> behaviour events.

    Each event's id is derived from its row (position in time order, user, item, time, kind), so a
    replay rerun after an interruption resends the same ids and the worker's dedupe drops what
    already arrived (random ids folded every resent interaction into the features twice)."""
    df = interactions.sort_values(["ts"], kind="stable")
    for n, row in enumerate(df.itertuples(index=False)):
        user, item, ts = str(row.user_id), str(row.item_id), int(row.ts)
        session = f"{user}-{ts // 86400}"
        rating = float(getattr(row, "rating", 0) or 0)
        kinds = [BehaviourType.view]
        if rating >= 4:
            kinds.append(BehaviourType.click)
        if rating >= 5:
            kinds += [BehaviourType.add_to_cart, BehaviourType.purchase]
        for kind in kinds:
            event_id = uuid.uuid5(REPLAY_NAMESPACE, f"{n}|{user}|{item}|{ts}|{kind.value}").hex
            yield BehaviourEvent(
                event_id=event_id, type=kind, user_id=user, session_id=session, item_id=item, ts_ms=ts * 1000
            )

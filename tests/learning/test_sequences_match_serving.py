"""Training sees what serving sees: on data with repeated (user, item) interactions, the offline
split's sequences and popularity equal what the worker's session fold keeps from the same events."""

from __future__ import annotations

import numpy as np
import pandas as pd

from recstream.data.datasets import InteractionData, tiny_synthetic
from recstream.data.events import behaviour_events
from recstream.data.split import leave_last_out
from recstream.models.ranker import RankingContext
from recstream.recommend.session import MAX_RECENT, SessionState, apply_event


def _with_repeats(seed: int = 0) -> InteractionData:
    """tiny_synthetic plus, for every user, revisits of earlier items later in time."""
    base = tiny_synthetic(n_users=40, seed=seed)
    rng = np.random.default_rng(seed)
    inter = base.interactions
    revisits = []
    for _, rows in inter.groupby("user_id"):
        picks = rows.sample(n=min(4, len(rows)), random_state=int(rng.integers(1 << 30)))
        for row in picks.itertuples(index=False):
            later = int(rng.integers(row.ts, rows["ts"].max() + 2_000))
            revisits.append(row._replace(ts=later))
    data = pd.concat([inter, pd.DataFrame(revisits, columns=inter.columns)], ignore_index=True)
    return InteractionData(name="repeats", interactions=data, items=base.items)


def test_repeats_are_kept_once_at_the_first_interaction_as_the_worker_keeps_them() -> None:
    data = _with_repeats()
    assert data.interactions.duplicated(["user_id", "item_id"]).sum() > 50  # the data has repeats
    split = leave_last_out(data)

    states: dict[str, SessionState] = {}
    for offset, event in enumerate(behaviour_events(data.interactions)):
        state = states.setdefault(event.user_id, SessionState())
        apply_event(state, offset=offset, event_type=event.type.value, item_id=event.item_id, ts_ms=event.ts_ms)

    valid = dict(zip(split.valid["user_idx"], split.valid["item_idx"], strict=True))
    test = dict(zip(split.test["user_idx"], split.test["item_idx"], strict=True))
    revisited_users = 0
    for u, user_id in enumerate(split.user_ids):
        tail = [valid[u], test[u]] if u in test else []
        offline = [split.item_ids[i] for i in [*split.train_seqs[u].tolist(), *tail]]
        assert len(offline) == len(set(offline))
        assert states[user_id].recent == offline[-MAX_RECENT:], user_id
        raw = data.interactions[data.interactions["user_id"] == user_id].sort_values("ts", kind="stable")
        revisited_users += raw["item_id"].iloc[-1] in set(raw["item_id"].iloc[:-1])
    assert revisited_users > 0  # some users' last event is a revisit: no served answer could show it

    # popularity counts users (the worker counts an item at each user's first touch), not events
    pairs = data.interactions.drop_duplicates(["user_id", "item_id"])
    assert len(split.train) + len(split.valid) + len(split.test) == len(pairs)
    ctx = RankingContext(data.items["category"].tolist(), split.train_seqs, split.n_items)
    users_per_item = split.train.groupby("item_idx")["user_idx"].nunique()
    np.testing.assert_array_equal(ctx.counts[users_per_item.index], users_per_item.to_numpy())
    assert ctx.counts.sum() == len(split.train)

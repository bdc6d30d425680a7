"""Offline evaluation splits: leave-last-out in time order, and an item cold-start variant.

Both return a `Split` holding integer id maps, the training interactions, per-user training
sequences and the validation / test cases, so that every model and the evaluator index items the
same way. Ties between equal timestamps are broken by the original row order, so the split is
deterministic.

A user's sequence holds each item once, at its first interaction: repeats (a view, then a click,
then a purchase of one item; a second visit) are dropped before splitting. That is the task the
served recommender solves, since it hides what a session has seen, and the statistics it keeps:
the worker counts an item's popularity and trend at a user's first touch and appends to the
session's recent items only on a first touch (`recstream.recommend.session`). Kept, a repeat would
be a target no served answer can show and a history entry serving never sees. Every item of the
history is excluded from the ranking.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from recstream.data.datasets import DataFormatError, InteractionData

log = logging.getLogger(__name__)


@dataclass
class EvalCases:
    """One stage's cases: user indices, their history (time-ordered item indices) and the target."""

    users: np.ndarray
    histories: list[np.ndarray]
    targets: np.ndarray

    def __len__(self) -> int:
        return len(self.users)


@dataclass
class Split:
    """A leave-last-out split with integer id maps (items indexed over the whole catalogue)."""

    data: InteractionData
    user_ids: list[str]
    item_ids: list[str]
    train: pd.DataFrame  # user_idx, item_idx, ts, event, rating; sorted by user then time
    valid: pd.DataFrame  # user_idx, item_idx, ts: one row per evaluated user
    test: pd.DataFrame
    train_seqs: list[np.ndarray] = field(repr=False)  # per user: train item indices in time order
    user_index: dict[str, int] = field(repr=False, default_factory=dict)
    item_index: dict[str, int] = field(repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.user_index:
            self.user_index = {u: i for i, u in enumerate(self.user_ids)}
        if not self.item_index:
            self.item_index = {it: i for i, it in enumerate(self.item_ids)}

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def train_items(self) -> list[np.ndarray]:
        """Per user, the unique items seen in training (for exclusion and co-occurrence)."""
        return [np.unique(s) for s in self.train_seqs]

    @property
    def item_texts(self) -> list[str]:
        """Item texts aligned with the item index (what a text encoder sees)."""
        text = self.data.items.set_index("item_id")["text"]
        return text.loc[self.item_ids].tolist()

    def train_matrix(self, binary: bool = True) -> sp.csr_matrix:
        """The user x item training matrix (binary by default; counts otherwise)."""
        vals = np.ones(len(self.train), dtype=np.float32)
        m = sp.csr_matrix(
            (vals, (self.train["user_idx"].to_numpy(), self.train["item_idx"].to_numpy())),
            shape=(self.n_users, self.n_items),
        )
        m.sum_duplicates()
        if binary:
            m.data[:] = 1.0
        return m

    def cases(self, stage: str) -> EvalCases:
        """Validation ("valid") or test ("test") cases; the test history includes the valid item."""
        if stage not in ("valid", "test"):
            raise ValueError(
                f"stage must be 'valid' or 'test' (a cold-start split also has 'cold_valid'), got {stage!r}"
            )
        df = self.valid if stage == "valid" else self.test
        users = df["user_idx"].to_numpy(dtype=np.int64)
        targets = df["item_idx"].to_numpy(dtype=np.int64)
        histories = [self.train_seqs[u] for u in users]
        if stage == "test":
            valid_item = dict(zip(self.valid["user_idx"].tolist(), self.valid["item_idx"].tolist(), strict=True))
            histories = [
                np.append(h, valid_item[u]).astype(np.int64) if u in valid_item else h
                for h, u in zip(histories, users.tolist(), strict=True)
            ]
        return EvalCases(users=users, histories=histories, targets=targets)


@dataclass
class ColdStartSplit(Split):
    """A split whose held-out items never occur in train or in any history; test = cold targets only."""

    cold_items: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    n_test_all: int = 0  # test cases before keeping only those with a cold target
    # validation cases whose target is cold: where anything about cold items is tuned, never on test
    cold_valid: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["user_idx", "item_idx", "ts"]))

    def cases(self, stage: str) -> EvalCases:
        """As `Split.cases`, plus "cold_valid": validation cases whose target is a cold item."""
        if stage != "cold_valid":
            return super().cases(stage)
        users = self.cold_valid["user_idx"].to_numpy(dtype=np.int64)
        return EvalCases(
            users=users,
            histories=[self.train_seqs[u] for u in users],
            targets=self.cold_valid["item_idx"].to_numpy(dtype=np.int64),
        )


def _indexed(data: InteractionData) -> tuple[pd.DataFrame, list[str], list[str]]:
    user_ids = sorted(data.interactions["user_id"].unique().tolist())
    item_ids = data.items["item_id"].tolist()
    u_map = {u: i for i, u in enumerate(user_ids)}
    i_map = {it: i for i, it in enumerate(item_ids)}
    inter = data.interactions
    df = pd.DataFrame(
        {
            "user_idx": inter["user_id"].map(u_map).to_numpy(np.int64),
            "item_idx": inter["item_id"].map(i_map).to_numpy(np.int64),
            "ts": inter["ts"].to_numpy(np.int64),
            "event": inter["event"].to_numpy(),
            "rating": inter["rating"].to_numpy(),
        }
    )
    order = np.lexsort((np.arange(len(df)), df["ts"].to_numpy(), df["user_idx"].to_numpy()))
    df = df.iloc[order]
    repeat = df.duplicated(["user_idx", "item_idx"], keep="first").to_numpy()
    if repeat.any():
        log.info(
            "%s: %d of %d interactions repeat a (user, item) pair; each pair is kept at its first interaction",
            data.name,
            int(repeat.sum()),
            len(df),
        )
    df = df[~repeat].reset_index(drop=True)
    return df, user_ids, item_ids


def _sequences(train: pd.DataFrame, n_users: int) -> list[np.ndarray]:
    users = train["user_idx"].to_numpy()
    items = train["item_idx"].to_numpy(np.int64)
    bounds = np.searchsorted(users, np.arange(n_users + 1))
    return [items[bounds[u] : bounds[u + 1]] for u in range(n_users)]


def leave_last_out(data: InteractionData) -> Split:
    """Per user in time order: last -> test, second to last -> valid, rest -> train (< 3: all train)."""
    df, user_ids, item_ids = _indexed(data)
    users = df["user_idx"].to_numpy()
    counts = np.bincount(users, minlength=len(user_ids))
    pos = np.arange(len(df)) - np.searchsorted(users, users)  # position within the user's sequence
    n = counts[users]
    eligible = n >= 3
    if not eligible.any():
        # every choice (epochs, weights, the cold rule) is made on validation: without a case
        # each would be made on NaN, silently
        where = data.sources.get("interactions", data.name)
        raise DataFormatError(
            f"{where}: no user has 3 or more interactions, so leave-last-out has no validation or test "
            "case (each user's last interaction is the test case, the one before the validation case)"
        )
    is_test = eligible & (pos == n - 1)
    is_valid = eligible & (pos == n - 2)
    train = df[~(is_test | is_valid)].reset_index(drop=True)
    cols = ["user_idx", "item_idx", "ts"]
    valid = df.loc[is_valid, cols].reset_index(drop=True)
    test = df.loc[is_test, cols].reset_index(drop=True)
    return Split(
        data=data,
        user_ids=user_ids,
        item_ids=item_ids,
        train=train,
        valid=valid,
        test=test,
        train_seqs=_sequences(train, len(user_ids)),
    )


def cold_start_split(data: InteractionData, frac: float = 0.1, seed: int = 0) -> ColdStartSplit:
    """Hold out `frac` of the interacted items entirely from training, then keep cold-target tests.

    The base is the leave-last-out split. Every interaction with a cold item is removed from train
    and from histories; validation keeps only warm targets (for early stopping), test keeps only
    cases whose target is a cold item — the cases a text-based model can rank and an ID model cannot.
    The validation cases with a cold target become `cold_valid`: the only cases a cold-start rule
    may be chosen on. (A test case's history keeps its valid item only when that item is warm.)
    """
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    base = leave_last_out(data)
    interacted = np.unique(
        np.concatenate([base.train["item_idx"].to_numpy(), base.valid["item_idx"], base.test["item_idx"]])
    )
    rng = np.random.default_rng(seed)
    n_cold = max(1, round(frac * len(interacted)))
    cold = np.sort(rng.choice(interacted, size=n_cold, replace=False))
    is_cold = np.zeros(base.n_items, dtype=bool)
    is_cold[cold] = True
    train = base.train[~is_cold[base.train["item_idx"].to_numpy()]].reset_index(drop=True)
    valid_cold = is_cold[base.valid["item_idx"].to_numpy()]
    valid = base.valid[~valid_cold].reset_index(drop=True)
    cold_valid = base.valid[valid_cold].reset_index(drop=True)
    test = base.test[is_cold[base.test["item_idx"].to_numpy()]].reset_index(drop=True)
    return ColdStartSplit(
        data=data,
        user_ids=base.user_ids,
        item_ids=base.item_ids,
        train=train,
        valid=valid,
        test=test,
        train_seqs=_sequences(train, base.n_users),
        user_index=base.user_index,
        item_index=base.item_index,
        cold_items=cold,
        n_test_all=len(base.test),
        cold_valid=cold_valid,
    )

"""The search evaluation protocol: personalized product search as in Ai et al., SIGIR 2017 (HEM) and
Bi et al. 2020 (TEM), on the same time-ordered leave-last-out split as the quality bench.

* Category queries (the published protocol): each held-out interaction becomes a search whose query
  is built from the target item's category words (MovieLens: its genres, e.g. "comedy romance"; the
  generic form: its category and tags), whose context is the user's earlier history, and whose
  answer is ranked against the whole catalogue (the history excluded, as in the quality bench).
* Known-item queries (synthetic, marked so): an item's title with one word dropped or one typo,
  answered against the whole catalogue with no personal context.

Training pairs for a learned query encoder come from the training part only: the category query of
every training interaction and each catalogue item's clean title (the known-item test corrupts
titles, so it never sees a training string verbatim).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.sparse as sp

from recstream.data.split import Split

_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_WORD = re.compile(r"[^\W_]+(?:['-][^\W_]+)*", re.UNICODE)
#: Item columns whose words form a category query, in order of preference (first one present wins
#: for the category part; tags are added when the items carry them).
CATEGORY_COLUMNS = ("genres", "category")
TAG_COLUMN = "tags"
QueryKind = Literal["category", "known_item"]


@dataclass
class SearchCases:
    """Search cases: a query per case, the user's history as context and exclusion set, the target."""

    kind: QueryKind
    queries: list[str]
    users: np.ndarray  # user index, -1 = anonymous (known-item search)
    histories: list[np.ndarray]  # context, oldest first; also excluded from the ranking
    targets: np.ndarray
    synthetic: bool = False
    notes: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def exclude(self) -> list[np.ndarray]:
        return self.histories


def _words(text: str) -> list[str]:
    return _WORD.findall(str(text).lower())


def category_query_of_items(split: Split) -> list[str]:
    """Per item index, the category query (distinct category words, catalogue order; "" if none)."""
    items = split.data.items.set_index("item_id").loc[split.item_ids]
    column = next((c for c in CATEGORY_COLUMNS if c in items.columns), None)
    if column is None:
        raise ValueError(f"{split.data.name}: items carry none of {CATEGORY_COLUMNS}; no category query can be made")
    parts = items[column].fillna("").astype(str)
    if TAG_COLUMN in items.columns:
        parts = parts + " " + items[TAG_COLUMN].fillna("").astype(str).str.replace(r"[|,;]", " ", regex=True)
    out = []
    for text in parts:
        seen: list[str] = []
        for w in _words(text):
            if w not in seen and w != "unknown":
                seen.append(w)
        out.append(" ".join(seen))
    return out


def category_cases(split: Split, stage: str) -> SearchCases:
    """The HEM/TEM cases of one stage ("valid" or "test"); targets without category words are left
    out (counted in `notes`)."""
    cases = split.cases(stage)
    queries = category_query_of_items(split)
    keep = [n for n, t in enumerate(cases.targets.tolist()) if queries[t]]
    return SearchCases(
        kind="category",
        queries=[queries[int(cases.targets[n])] for n in keep],
        users=cases.users[keep],
        histories=[cases.histories[n] for n in keep],
        targets=cases.targets[keep],
        notes={"cases": len(cases), "without_category_words": len(cases) - len(keep)},
    )


def clean_title(title: str) -> str:
    """The title without a trailing release year ("Toy Story (1995)" -> "Toy Story")."""
    return _YEAR.sub("", str(title)).strip()


def _corrupt(title: str, rng: np.random.Generator) -> str | None:
    """One word dropped (titles of 3+ words, half the time) or one typo (adjacent letters swapped
    inside the longest word); None when neither applies."""
    words = title.split()
    if len(words) >= 3 and rng.random() < 0.5:
        drop = int(rng.integers(len(words)))
        return " ".join(words[:drop] + words[drop + 1 :])
    longest = max(range(len(words)), key=lambda n: len(words[n]), default=None)
    if longest is None or len(words[longest]) < 4:
        return None
    word = words[longest]
    at = int(rng.integers(1, len(word) - 2))  # keep the first and last letter
    if word[at] == word[at + 1]:
        return None
    words[longest] = word[:at] + word[at + 1] + word[at] + word[at + 2 :]
    return " ".join(words)


def known_item_cases(split: Split, n: int = 500, seed: int = 0) -> SearchCases:
    """Synthetic known-item searches over items whose clean title is unique in the catalogue."""
    titles = [clean_title(t) for t in split.data.items.set_index("item_id").loc[split.item_ids, "title"]]
    counts: dict[str, int] = {}
    for t in titles:
        counts[t.lower()] = counts.get(t.lower(), 0) + 1
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(titles))
    queries, targets = [], []
    for i in order.tolist():
        if counts[titles[i].lower()] != 1:
            continue
        q = _corrupt(titles[i], rng)
        if q and q.lower() != titles[i].lower():
            queries.append(q)
            targets.append(i)
        if len(targets) == n:
            break
    return SearchCases(
        kind="known_item",
        queries=queries,
        users=np.full(len(targets), -1, dtype=np.int64),
        histories=[np.zeros(0, dtype=np.int64) for _ in targets],
        targets=np.asarray(targets, dtype=np.int64),
        synthetic=True,
    )


@dataclass
class TrainingPairs:
    """Distinct training queries and, per query, how often each item answered it (soft labels)."""

    queries: list[str]
    labels: sp.csr_matrix  # [n_queries, n_items] counts
    is_title: np.ndarray  # bool per query: a catalogue title (else a category query)

    def __len__(self) -> int:
        return len(self.queries)


def training_pairs(split: Split, titles: bool = True) -> TrainingPairs:
    """(query, item) pairs from the training interactions' category queries, plus each item's clean
    title -> that item, aggregated by distinct query. Nothing from validation or test."""
    item_query = category_query_of_items(split)
    items = split.train["item_idx"].to_numpy()
    pairs = [(item_query[i], int(i)) for i in items if item_query[i]]
    n_category = len(pairs)
    if titles:
        raw = split.data.items.set_index("item_id").loc[split.item_ids, "title"]
        pairs += [(clean_title(t), n) for n, t in enumerate(raw) if clean_title(t)]
    if not pairs:
        raise ValueError(f"{split.data.name}: no training pairs (no category words and no titles)")
    index: dict[str, int] = {}
    rows = [index.setdefault(q, len(index)) for q, _ in pairs]
    cols = [i for _, i in pairs]
    labels = sp.csr_matrix(
        (np.ones(len(pairs), np.float32), (rows, cols)), shape=(len(index), split.n_items), dtype=np.float32
    )
    labels.sum_duplicates()
    is_title = np.zeros(len(index), dtype=bool)
    is_title[np.unique(rows[n_category:]).astype(np.int64)] = True
    return TrainingPairs(queries=list(index), labels=labels, is_title=is_title)

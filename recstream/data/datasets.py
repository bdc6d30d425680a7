"""One generic form for interaction data, so every model and benchmark reads any data set the same way.

The generic form on disk (what `load_generic` reads and `save_generic` writes) is a directory with two
tables, each either a UTF-8 CSV file with a header row (``interactions.csv``) or a Parquet file
(``interactions.parquet``; one of the two per table, and they may differ: Parquet interactions beside
a CSV items file is fine). In Parquet, ids may be integer columns (read as their decimal strings) and
``ts`` may be a timestamp column (read as UTC seconds). Errors name the file, the column and the
1-based data rows.

``interactions.csv``
    ``user_id`` (str, required), ``item_id`` (str, required), ``ts`` (int seconds, required),
    ``event`` (str, optional, default ``"interaction"``; e.g. rating, click, purchase),
    ``rating`` (float, optional, empty = none). Row order breaks ties between equal timestamps.
``items.csv``
    ``item_id`` (str, required), ``title`` (str, required), ``category`` (str, optional, default ``""``),
    ``text`` (str, optional, default ``"title | category"``: what a text encoder sees).
    Extra columns are kept. Every item of interactions.csv must be listed here; items never
    interacted with are allowed and take part in full ranking.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

INTERACTION_COLUMNS = ["user_id", "item_id", "ts", "event", "rating"]
ITEM_COLUMNS = ["item_id", "title", "category", "text"]
_REQUIRED_INTERACTIONS = ["user_id", "item_id", "ts"]
_REQUIRED_ITEMS = ["item_id", "title"]


class DataFormatError(ValueError):
    """The data set files do not follow the generic form; the message says what to fix."""


@dataclass
class InteractionData:
    """Interactions plus the item catalogue, normalised to the generic columns and dtypes."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    name: str = "unnamed"

    def __post_init__(self) -> None:
        self.interactions = _normalise_interactions(self.interactions, self.name)
        self.items = _normalise_items(self.items, self.name)
        unknown = ~self.interactions["item_id"].isin(set(self.items["item_id"]))
        if unknown.any():
            missing = sorted(set(self.interactions.loc[unknown, "item_id"]))
            raise DataFormatError(
                f"{self.name}: {len(missing)} item_id(s) in interactions are not in items, e.g. {missing[:5]}, "
                f"at interactions {_rows(unknown)}"
            )

    @property
    def n_users(self) -> int:
        return int(self.interactions["user_id"].nunique())

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __repr__(self) -> str:
        return (
            f"InteractionData(name={self.name!r}, users={self.n_users}, items={self.n_items}, "
            f"interactions={len(self.interactions)})"
        )


def _rows(mask: pd.Series | np.ndarray, limit: int = 5) -> str:
    """Where a problem is, as a user finds it in the file: 1-based data rows (line = row + 1 in a CSV
    with its header), the first `limit` of them and how many in all."""
    idx = np.flatnonzero(np.asarray(mask))
    shown = ", ".join(str(i + 1) for i in idx[:limit])
    return f"row {shown}" if len(idx) == 1 else f"rows {shown}{', ...' if len(idx) > limit else ''} ({len(idx)} rows)"


def _check_columns(df: pd.DataFrame, required: list[str], what: str, name: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DataFormatError(
            f"{name}: {what} lacks required column(s) {missing}; has {list(df.columns)}; required: {required}"
        )


def _normalise_interactions(df: pd.DataFrame, name: str) -> pd.DataFrame:
    _check_columns(df, _REQUIRED_INTERACTIONS, "interactions", name)
    out = df.copy().reset_index(drop=True)
    if "event" not in out.columns:
        out["event"] = "interaction"
    if "rating" not in out.columns:
        out["rating"] = np.nan
    for col in ("user_id", "item_id"):
        empty = out[col].isna() | (out[col].astype(str).str.strip() == "")
        if empty.any():
            raise DataFormatError(f"{name}: interactions.{col} is empty at {_rows(empty)}")
        out[col] = out[col].astype(str)
    if pd.api.types.is_datetime64_any_dtype(out["ts"]):
        # a Parquet timestamp column: UTC seconds (naive times are taken as UTC)
        stamps = out["ts"].dt.tz_localize("UTC") if out["ts"].dt.tz is None else out["ts"].dt.tz_convert("UTC")
        missing = stamps.isna()
        out["ts"] = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds().floordiv(1).where(~missing)
    ts = pd.to_numeric(out["ts"], errors="coerce")
    bad_ts = ts.isna() | (ts.notna() & (ts.fillna(0) % 1 != 0)) | (ts.abs() > 2**62)
    if bad_ts.any():
        bad = out.loc[bad_ts, "ts"].head(3).tolist()
        raise DataFormatError(
            f"{name}: interactions.ts must be integer seconds, got e.g. {bad} at {_rows(bad_ts)} "
            "(a data set without real times may number each user's events 0, 1, 2, ...)"
        )
    out["ts"] = ts.astype(np.int64)
    out["event"] = out["event"].fillna("interaction").astype(str)
    rating = pd.to_numeric(out["rating"], errors="coerce")
    bad_rating = rating.isna() & out["rating"].notna() & (out["rating"].astype(str).str.strip() != "")
    if bad_rating.any():
        bad = out.loc[bad_rating, "rating"].head(3).tolist()
        raise DataFormatError(
            f"{name}: interactions.rating must be numeric or empty, got e.g. {bad} at {_rows(bad_rating)}"
        )
    out["rating"] = rating.astype(np.float64)
    extra = [c for c in out.columns if c not in INTERACTION_COLUMNS]
    return out[INTERACTION_COLUMNS + extra]


def _normalise_items(df: pd.DataFrame, name: str) -> pd.DataFrame:
    _check_columns(df, _REQUIRED_ITEMS, "items", name)
    out = df.copy().reset_index(drop=True)
    empty = out["item_id"].isna() | (out["item_id"].astype(str).str.strip() == "")
    if empty.any():
        raise DataFormatError(f"{name}: items.item_id is empty at {_rows(empty)}")
    out["item_id"] = out["item_id"].astype(str)
    dup_mask = out["item_id"].duplicated()
    if dup_mask.any():
        dup = out["item_id"][dup_mask]
        raise DataFormatError(
            f"{name}: items.item_id must be unique, duplicates e.g. {dup.head(5).tolist()} at {_rows(dup_mask)}"
        )
    out["title"] = out["title"].fillna("").astype(str)
    if "category" not in out.columns:
        out["category"] = ""
    out["category"] = out["category"].fillna("").astype(str)
    if "text" not in out.columns:
        out["text"] = np.where(out["category"] != "", out["title"] + " | " + out["category"], out["title"])
    out["text"] = out["text"].fillna("").astype(str)
    extra = [c for c in out.columns if c not in ITEM_COLUMNS]
    return out[ITEM_COLUMNS + extra]


def _recbole_dataset_dir(name: str) -> Path:
    """The example data shipped inside the installed recbole package (never copied into the repo)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("recbole is not installed; run `make setup` (it installs recbole==1.2.1)")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / "dataset_example" / name
        if path.is_dir():
            return path
    raise FileNotFoundError(f"recbole package has no dataset_example/{name}")


def _read_atomic(path: Path) -> pd.DataFrame:
    """Read a RecBole atomic file, stripping the `:type` suffix off header names."""
    df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    df.columns = [c.split(":", 1)[0] for c in df.columns]
    return df


def load_movielens_100k() -> InteractionData:
    """MovieLens-100k from the installed recbole package; every rating counts as one interaction."""
    root = _recbole_dataset_dir("ml-100k")
    inter = _read_atomic(root / "ml-100k.inter")
    items = _read_atomic(root / "ml-100k.item")
    interactions = pd.DataFrame(
        {
            "user_id": inter["user_id"],
            "item_id": inter["item_id"],
            "ts": inter["timestamp"].astype(float).astype(np.int64),
            "event": "rating",
            "rating": inter["rating"].astype(float),
        }
    )
    year = items["release_year"].str.strip()
    title = items["movie_title"].str.strip()
    title = np.where(year != "", title + " (" + year + ")", title)
    genres = items["class"].str.strip()
    category = genres.str.split().str[0].fillna("unknown").replace("", "unknown")
    item_df = pd.DataFrame(
        {
            "item_id": items["item_id"],
            "title": title,
            "category": category,
            "text": pd.Series(title) + " | " + genres,
            "genres": genres,
        }
    )
    return InteractionData(interactions=interactions, items=item_df, name="ml-100k")


_CSV_DTYPES = {"user_id": str, "item_id": str, "event": str, "title": str, "category": str, "text": str}


def _read_table(folder: Path, table: str) -> pd.DataFrame:
    """`table`.csv or `table`.parquet from `folder` (exactly one of them), never empty."""
    found = [folder / f"{table}{ext}" for ext in (".csv", ".parquet") if (folder / f"{table}{ext}").is_file()]
    if not found:
        raise DataFormatError(
            f"{folder}: missing {table}.csv (or {table}.parquet); the generic form needs interactions and items"
        )
    if len(found) > 1:
        raise DataFormatError(f"{folder}: both {found[0].name} and {found[1].name}; keep one of them")
    fpath = found[0]
    if fpath.suffix == ".csv":
        try:
            df = pd.read_csv(fpath, dtype=_CSV_DTYPES, keep_default_na=False, na_values={"rating": [""]})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise DataFormatError(f"{fpath}: not a readable UTF-8 CSV with a header row: {exc}") from exc
        if df.empty:
            raise DataFormatError(f"{fpath}: has a header but no rows")
        return df
    import pyarrow as pa

    try:
        df = pd.read_parquet(fpath, engine="pyarrow")
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataFormatError(f"{fpath}: not a readable Parquet file: {exc}") from exc
    if df.empty:
        raise DataFormatError(f"{fpath}: has no rows")
    return df


def load_generic(path: Path) -> InteractionData:
    """A data set given as files in the generic form (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"{path}: expected a directory holding interactions and items (.csv or .parquet)")
    interactions = _read_table(path, "interactions")
    items = _read_table(path, "items")
    return InteractionData(interactions=interactions, items=items, name=path.name)


def save_generic(data: InteractionData, path: Path, fmt: Literal["csv", "parquet"] = "csv") -> Path:
    """Write `data` in the generic form, so it can be read back with `load_generic`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for table, df in (("interactions", data.interactions), ("items", data.items)):
        if fmt == "parquet":
            df.to_parquet(path / f"{table}.parquet", index=False, engine="pyarrow")
        else:
            df.to_csv(path / f"{table}.csv", index=False)
    return path


_BUILTIN = {"ml-100k": load_movielens_100k, "movielens-100k": load_movielens_100k}


def load_dataset(name_or_path: str) -> InteractionData:
    """A built-in data set by name ('ml-100k') or a directory in the generic form."""
    key = str(name_or_path).strip()
    if key.lower() in _BUILTIN:
        return _BUILTIN[key.lower()]()
    if key.lower() == "tiny-synthetic":
        return tiny_synthetic()
    path = Path(key).expanduser()
    if path.exists():
        return load_generic(path)
    raise DataFormatError(
        f"unknown data set {name_or_path!r}: use one of {sorted(_BUILTIN)} or a directory with "
        "interactions and items (.csv or .parquet)"
    )


def data_hash(data: InteractionData) -> str:
    """Stable SHA-256 of the content (generic columns only), recorded in checkpoint metadata."""
    h = hashlib.sha256()
    for label, df, cols in (
        ("interactions", data.interactions, INTERACTION_COLUMNS),
        ("items", data.items, ITEM_COLUMNS),
    ):
        h.update(label.encode())
        h.update(df[cols].to_csv(index=False, float_format="%.6g", lineterminator="\n").encode())
    return h.hexdigest()


def tiny_synthetic(n_users: int = 60, n_items: int = 40, n_cats: int = 4, seed: int = 0) -> InteractionData:
    """A small data set with learnable structure, for unit tests only.

    Each user likes one category; the next item is often the next one of that category, else drawn
    by a Zipf-like popularity from the category (or, rarely, from anything), so popularity,
    co-occurrence, sequence and text (category) models all have something to find.
    """
    rng = np.random.default_rng(seed)
    cats = np.arange(n_items) % n_cats
    pop = 1.0 / np.arange(1, n_items + 1) ** 1.2
    rows = []
    for u in range(n_users):
        fav = u % n_cats
        in_cat = np.flatnonzero(cats == fav)
        p = pop[in_cat] / pop[in_cat].sum()
        length = int(rng.integers(6, 14))
        item = int(rng.choice(in_cat, p=p))
        seen: set[int] = set()
        ts = 1_000_000 + int(rng.integers(0, 10_000))
        for _ in range(length):
            seen.add(item)
            rows.append((f"u{u}", f"i{item}", ts, "click", np.nan))
            ts += int(rng.integers(1, 500))
            step = int(in_cat[(np.searchsorted(in_cat, item) + 1) % len(in_cat)])
            roll = rng.random()
            if roll < 0.4 and step not in seen:
                item = step  # sequential signal: walk along the category
                continue
            pool = in_cat if roll < 0.7 else np.arange(n_items)  # taste, else anything
            pool = np.array([i for i in pool if i not in seen])
            if len(pool) == 0:
                break
            w = pop[pool] / pop[pool].sum()  # popularity skew
            item = int(rng.choice(pool, p=w))
    interactions = pd.DataFrame(rows, columns=INTERACTION_COLUMNS)
    names = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    items = pd.DataFrame(
        {
            "item_id": [f"i{i}" for i in range(n_items)],
            "title": [f"Item {i}" for i in range(n_items)],
            "category": [names[c % len(names)] for c in cats],
        }
    )
    return InteractionData(interactions=interactions, items=items, name="tiny-synthetic")

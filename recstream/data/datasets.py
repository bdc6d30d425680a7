"""One generic form for interaction data, so every model and benchmark reads any data set the same way.

The generic form on disk (what `load_generic` reads and `save_generic` writes) is a directory with two
tables, each either a UTF-8 CSV file with a header row (``interactions.csv``) or a Parquet file
(``interactions.parquet``; one of the two per table, and they may differ: Parquet interactions beside
a CSV items file is fine). In Parquet, ids may be integer columns (read as their decimal strings) and
``ts`` may be a timestamp column (read as UTC seconds). Errors name the file, the column and the
data rows (counted from 1 after the header; blank lines are skipped and not counted).

``interactions.csv``
    ``user_id`` (str, required), ``item_id`` (str, required), ``ts`` (int seconds, required),
    ``event`` (str, optional, default ``"interaction"``; e.g. rating, click, purchase),
    ``rating`` (float, optional, empty = none). Row order breaks ties between equal timestamps.
``items.csv``
    ``item_id`` (str, required), ``title`` (str, required), ``category`` (str, optional, default ``""``),
    ``text`` (str, optional, default (also for an empty cell) ``"title | category"``: what a text
    encoder sees), ``price`` (float >= 0, optional). Ids must be what the serving contracts take
    (letters, digits and ``_.:@-``, at most 128).
    Extra columns are kept. Every item of interactions.csv must be listed here; items never
    interacted with are allowed and take part in full ranking.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from recstream.contracts.events import ID_MAX_LENGTH, ID_PATTERN, ItemUpsert

INTERACTION_COLUMNS = ["user_id", "item_id", "ts", "event", "rating"]
ITEM_COLUMNS = ["item_id", "title", "category", "text"]
_REQUIRED_INTERACTIONS = ["user_id", "item_id", "ts"]
_REQUIRED_ITEMS = ["item_id", "title"]
_MILLISECONDS = 1e11  # a median ts above this (year 5138 in seconds) is almost surely in milliseconds

log = logging.getLogger(__name__)
# What a catalog upsert takes (recstream.contracts.events.ItemUpsert): checked here, where the row is known.
TITLE_MAX_LENGTH, CATEGORY_MAX_LENGTH = (
    next(m.max_length for m in ItemUpsert.model_fields[f].metadata if hasattr(m, "max_length"))
    for f in ("title", "category")
)


class DataFormatError(ValueError):
    """The data set files do not follow the generic form; the message says what to fix."""


@dataclass
class InteractionData:
    """Interactions plus the item catalogue, normalised to the generic columns and dtypes."""

    interactions: pd.DataFrame
    items: pd.DataFrame
    name: str = "unnamed"
    sources: dict[str, str] = field(default_factory=dict, repr=False)
    """Where each table was read from ("interactions", "items" -> a file path), for error messages."""

    def __post_init__(self) -> None:
        inter_src = self.sources.get("interactions", self.name)
        self.interactions = _normalise_interactions(self.interactions, inter_src)
        self.items = _normalise_items(self.items, self.sources.get("items", self.name))
        unknown = ~self.interactions["item_id"].isin(set(self.items["item_id"]))
        if unknown.any():
            missing = sorted(set(self.interactions.loc[unknown, "item_id"]))
            raise DataFormatError(
                f"{inter_src}: {len(missing)} item_id(s) in interactions are not in items, e.g. {missing[:5]}, "
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
    """Where a problem is, as a user finds it in the file: data rows counted from 1 after the header
    (line = row + 1 in a CSV without blank lines), the first `limit` of them and how many in all."""
    idx = np.flatnonzero(np.asarray(mask))
    shown = ", ".join(str(i + 1) for i in idx[:limit])
    return f"row {shown}" if len(idx) == 1 else f"rows {shown}{', ...' if len(idx) > limit else ''} ({len(idx)} rows)"


def _check_columns(df: pd.DataFrame, required: list[str], known: list[str], what: str, name: str) -> None:
    """Required columns present, none of the known ones twice; the message says what was found instead."""
    columns = [str(c) for c in df.columns]
    twice = [c for c in known if f"{c}.1" in columns and c in columns]  # pandas renames a repeated header
    if twice:
        raise DataFormatError(f"{name}: {what} has column(s) {twice} more than once; keep one of each")
    missing = [c for c in required if c not in columns]
    if not missing:
        return
    hints = []
    if len(columns) == 1 and (sep := next((s for s in (";", "\t", "|") if s in columns[0]), None)):
        hints.append(f"the header holds {sep!r}: the file must be comma-separated")
    near = {c: m for c in columns for m in missing if c != m and c.strip().lower() == m}
    if near:
        hints.append("rename " + ", ".join(f"{c!r} to {m!r}" for c, m in near.items()) + " (names are exact)")
    raise DataFormatError(
        f"{name}: {what} lacks required column(s) {missing}; has {columns}; required: {required}"
        + "".join(f"; {h}" for h in hints)
    )


def _optional_number(out: pd.DataFrame, col: str, what: str, name: str, non_negative: bool = False) -> pd.Series:
    """`out[col]` as float64, NaN where empty; anything else that is not a finite number (or is
    negative, when it must not be) is a DataFormatError naming the rows."""
    number = pd.to_numeric(out[col], errors="coerce")
    bad = number.isna() & out[col].notna() & (out[col].astype(str).str.strip() != "")
    bad |= number.notna() & ~np.isfinite(number.fillna(0.0))
    if non_negative:
        bad |= number < 0
    if bad.any():
        rule = "a number >= 0" if non_negative else "a finite number"
        examples = out.loc[bad, col].head(3).tolist()
        raise DataFormatError(f"{name}: {what}.{col} must be {rule} or empty, got e.g. {examples} at {_rows(bad)}")
    return number.astype(np.float64)


def _check_lengths(out: pd.DataFrame, col: str, limit: int, name: str) -> None:
    long = out[col].str.len() > limit
    if long.any():
        raise DataFormatError(
            f"{name}: items.{col} is longer than the catalog takes ({limit} characters) at {_rows(long)}"
        )


def _is_id_or_missing(value: object) -> bool:
    return value is None or isinstance(value, str | int | np.integer) or (isinstance(value, float) and value != value)


def _check_ids(out: pd.DataFrame, col: str, what: str, name: str) -> None:
    """Check `out[col]` and store it as text. Ids are strings or integers, never empty and never
    padded: 1.0 and 1, or 'a ' and 'a', would silently be two different ids."""
    values = out[col]
    if pd.api.types.is_float_dtype(values) or pd.api.types.is_bool_dtype(values):
        raise DataFormatError(
            f"{name}: {what}.{col} is a {values.dtype} column; ids must be strings or integers "
            "(a float id such as 1.0 would not match the id 1)"
        )
    if values.dtype == object:
        odd = ~values.map(_is_id_or_missing).astype(bool)
        if odd.any():
            kinds = sorted({type(v).__name__ for v in values[odd]})
            raise DataFormatError(f"{name}: {what}.{col} must hold strings or integers, got {kinds} at {_rows(odd)}")
    empty = values.isna() | (values.astype(str).str.strip() == "")
    if empty.any():
        raise DataFormatError(f"{name}: {what}.{col} is empty at {_rows(empty)}")
    text = values.astype(str)
    padded = text != text.str.strip()
    if padded.any():
        raise DataFormatError(
            f"{name}: {what}.{col} has leading or trailing spaces, e.g. {text[padded].head(3).tolist()} at "
            f"{_rows(padded)}; remove them ('a ' and 'a' would be two different ids)"
        )
    out[col] = text


def _plain(df: pd.DataFrame) -> pd.DataFrame:
    """A copy with categorical columns (common in Parquet) as plain objects: filling a missing
    value of a categorical with a default raises, as the default is not one of its categories."""
    out = df.copy().reset_index(drop=True)
    for col in out.columns:
        if isinstance(out[col].dtype, pd.CategoricalDtype):
            out[col] = out[col].astype(object).where(out[col].notna(), None)
    return out


def _check_servable_ids(out: pd.DataFrame, col: str, what: str, name: str) -> None:
    """Ids the serving contracts accept (recstream.contracts.events.ID_PATTERN): they become Kafka
    keys and URL path segments, so 'café' or 'item 2' would load here and fail at `make train`'s
    export or the demo's replay, with a traceback."""
    text = out[col]
    bad = ~text.str.fullmatch(ID_PATTERN) | (text.str.len() > ID_MAX_LENGTH)
    if bad.any():
        raise DataFormatError(
            f"{name}: {what}.{col} must be at most {ID_MAX_LENGTH} letters, digits or _.:@- "
            f"(no spaces or accents), got e.g. {text[bad].head(3).tolist()} at {_rows(bad)}"
        )


def _normalise_interactions(df: pd.DataFrame, name: str) -> pd.DataFrame:
    _check_columns(df, _REQUIRED_INTERACTIONS, INTERACTION_COLUMNS, "interactions", name)
    out = _plain(df)
    if "event" not in out.columns:
        out["event"] = "interaction"
    if "rating" not in out.columns:
        out["rating"] = np.nan
    for col in ("user_id", "item_id"):
        _check_ids(out, col, "interactions", name)
        _check_servable_ids(out, col, "interactions", name)
    if pd.api.types.is_bool_dtype(out["ts"]):
        raise DataFormatError(f"{name}: interactions.ts is a bool column; it must be integer seconds")
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
    if out["ts"].median() > _MILLISECONDS:
        # Read as seconds they would put every event tens of millennia ahead: sessions (a calendar
        # day) and trend days would be wrong, and a replay would send times the worker ignores.
        raise DataFormatError(
            f"{name}: interactions.ts looks like milliseconds (median {int(out['ts'].median())}, "
            "the year 5138 as seconds); it must be integer seconds: divide it by 1000"
        )
    out["event"] = out["event"].fillna("interaction").astype(str)
    out["rating"] = _optional_number(out, "rating", "interactions", name)
    extra = [c for c in out.columns if c not in INTERACTION_COLUMNS]
    return out[INTERACTION_COLUMNS + extra]


def _normalise_items(df: pd.DataFrame, name: str) -> pd.DataFrame:
    _check_columns(df, _REQUIRED_ITEMS, ITEM_COLUMNS, "items", name)
    out = _plain(df)
    _check_ids(out, "item_id", "items", name)
    _check_servable_ids(out, "item_id", "items", name)
    dup_mask = out["item_id"].duplicated()
    if dup_mask.any():
        dup = out["item_id"][dup_mask]
        raise DataFormatError(
            f"{name}: items.item_id must be unique, duplicates e.g. {dup.head(5).tolist()} at {_rows(dup_mask)}"
        )
    out["title"] = out["title"].fillna("").astype(str)
    untitled = out["title"].str.strip() == ""
    if untitled.any():
        raise DataFormatError(
            f"{name}: items have no title at {_rows(untitled)}; every item needs one (it is what a "
            "catalog upsert, the text models and search results show)"
        )
    _check_lengths(out, "title", TITLE_MAX_LENGTH, name)
    if "category" not in out.columns:
        out["category"] = ""
    out["category"] = out["category"].fillna("").astype(str)
    _check_lengths(out, "category", CATEGORY_MAX_LENGTH, name)
    default_text = pd.Series(
        np.where(out["category"] != "", out["title"] + " | " + out["category"], out["title"]), index=out.index
    )
    if "text" not in out.columns:
        out["text"] = default_text
    out["text"] = out["text"].fillna("").astype(str)
    out["text"] = out["text"].where(out["text"].str.strip() != "", default_text)  # an empty cell: the default
    if "price" in out.columns:
        out["price"] = _optional_number(out, "price", "items", name, non_negative=True)
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


def _read_table(folder: Path, table: str) -> tuple[pd.DataFrame, Path]:
    """`table`.csv or `table`.parquet from `folder` (exactly one of them, never empty), and its path."""
    found = [folder / f"{table}{ext}" for ext in (".csv", ".parquet") if (folder / f"{table}{ext}").is_file()]
    if not found:
        held = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
        raise DataFormatError(
            f"{folder}: missing {table}.csv (or {table}.parquet); the generic form needs interactions and items "
            f"(names are exact, lower case, uncompressed); the folder holds {held[:10] or 'nothing'}"
            + (f" and {len(held) - 10} more" if len(held) > 10 else "")
        )
    if len(found) > 1:
        raise DataFormatError(f"{folder}: both {found[0].name} and {found[1].name}; keep one of them")
    fpath = found[0]
    if fpath.suffix == ".csv":
        try:
            df = pd.read_csv(fpath, dtype=_CSV_DTYPES, keep_default_na=False, na_values={"rating": [""]})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
            raise DataFormatError(f"{fpath}: not a readable UTF-8 CSV with a header row: {exc}") from exc
        if df.empty:
            raise DataFormatError(f"{fpath}: has a header but no rows")
        if not isinstance(df.index, pd.RangeIndex):
            # pandas takes the extra leading fields as an index and shifts every column: say so
            raise DataFormatError(
                f"{fpath}: data row 1 has more fields than the header (a trailing comma, or an unquoted "
                "comma inside a value?); quote values that hold commas"
            )
        return df, fpath
    import pyarrow as pa

    try:
        df = pd.read_parquet(fpath, engine="pyarrow")
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise DataFormatError(f"{fpath}: not a readable Parquet file: {exc}") from exc
    if df.empty:
        raise DataFormatError(f"{fpath}: has no rows")
    return df, fpath


def load_generic(path: Path) -> InteractionData:
    """A data set given as files in the generic form (see the module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise DataFormatError(f"{path}: expected a directory holding interactions and items (.csv or .parquet)")
    interactions, inter_file = _read_table(path, "interactions")
    items, items_file = _read_table(path, "items")
    sources = {"interactions": str(inter_file), "items": str(items_file)}
    return InteractionData(interactions=interactions, items=items, name=path.resolve().name, sources=sources)


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
    if "/" in key or key.startswith("."):
        raise DataFormatError(f"{key}: no such directory (a data set in the generic form is a directory)")
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

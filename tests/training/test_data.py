"""Loaders, the generic form round trip and its errors, and split leakage checks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from recstream.data import (
    InteractionData,
    cold_start_split,
    data_hash,
    leave_last_out,
    load_dataset,
    load_generic,
    load_movielens_100k,
    tiny_synthetic,
)
from recstream.data.datasets import DataFormatError, save_generic


@pytest.fixture(scope="module")
def ml100k() -> InteractionData:
    return load_movielens_100k()


def test_movielens_shape(ml100k: InteractionData) -> None:
    assert ml100k.n_users == 943
    assert ml100k.n_items == 1682
    assert len(ml100k.interactions) == 100_000
    assert list(ml100k.interactions.columns[:5]) == ["user_id", "item_id", "ts", "event", "rating"]
    assert ml100k.interactions["ts"].dtype == np.int64
    first = ml100k.items.set_index("item_id").loc["1"]
    assert first["title"] == "Toy Story (1995)"
    assert first["category"] == "Animation"
    assert first["text"] == "Toy Story (1995) | Animation Children's Comedy"
    assert load_dataset("ml-100k").n_items == 1682


def test_generic_round_trip(tmp_path: Path) -> None:
    data = tiny_synthetic()
    save_generic(data, tmp_path / "tiny")
    back = load_generic(tmp_path / "tiny")
    pd.testing.assert_frame_equal(back.interactions, data.interactions)
    pd.testing.assert_frame_equal(back.items, data.items)
    assert data_hash(back) == data_hash(data)
    assert load_dataset(str(tmp_path / "tiny")).n_items == data.n_items


def test_generic_optional_columns_defaulted(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_text("user_id,item_id,ts\n1,a,10\n1,b,20\n")
    (tmp_path / "items.csv").write_text("item_id,title,category\na,Alpha,x\nb,Beta,\nc,Gamma,y\n")
    data = load_generic(tmp_path)
    assert data.interactions["event"].tolist() == ["interaction", "interaction"]
    assert data.interactions["rating"].isna().all()
    assert data.interactions["user_id"].tolist() == ["1", "1"]
    assert data.items["text"].tolist() == ["Alpha | x", "Beta", "Gamma | y"]


@pytest.mark.parametrize(
    ("inter", "items", "message"),
    [
        ("user_id,ts\n1,10\n", "item_id,title\na,A\n", "lacks required column(s) ['item_id']"),
        ("user_id,item_id,ts\n1,a,10\n", "item_id,name\na,A\n", "items lacks required column(s) ['title']"),
        (
            "user_id,item_id,ts\n1,a,10\n1,z,10\n",
            "item_id,title\na,A\n",
            "not in items, e.g. ['z'], at interactions row 2",
        ),
        (
            "user_id,item_id,ts\n1,a,1\n1,a,yesterday\n",
            "item_id,title\na,A\n",
            "integer seconds, got e.g. ['yesterday'] at row 2",
        ),
        ("user_id,item_id,ts\n1,a,1.5\n", "item_id,title\na,A\n", "integer seconds"),
        ("user_id,item_id,ts\n1,a,1\n,a,2\n", "item_id,title\na,A\n", "interactions.user_id is empty at row 2"),
        ("user_id,item_id,ts,rating\n1,a,1,5\n1,a,2,high\n", "item_id,title\na,A\n", "got e.g. ['high'] at row 2"),
        (
            "user_id,item_id,ts\n1,a,1\n",
            "item_id,title\na,A\nb,B\na,C\n",
            "must be unique, duplicates e.g. ['a'] at row 3",
        ),
        ("user_id,item_id,ts\n", "item_id,title\na,A\n", "interactions.csv: has a header but no rows"),
        ("user_id,item_id,ts\n1,a,1\n", 'item_id,title\na,"A\n', "not a readable UTF-8 CSV"),
        # the mistakes a spreadsheet export makes, each named where it is
        ("user_id;item_id;ts\n1;a;1\n", "item_id,title\na,A\n", "the header holds ';': the file must be comma"),
        ("User_ID,item_id,ts\n1,a,1\n", "item_id,title\na,A\n", "rename 'User_ID' to 'user_id'"),
        ("user_id,item_id,ts\n1,a,1,\n", "item_id,title\na,A\n", "interactions.csv: data row 1 has more fields"),
        ("user_id,item_id,ts\n1,a,1\n", "item_id,title\na,Alpha, the\n", "items.csv: data row 1 has more fields"),
        ("user_id,item_id,ts,ts\n1,a,1,2\n", "item_id,title\na,A\n", "has column(s) ['ts'] more than once"),
        ("user_id,item_id,ts\n1,a ,1\n", "item_id,title\na,A\n", "item_id has leading or trailing spaces, e.g. ['a ']"),
        ("user_id,item_id,ts,rating\n1,a,1,inf\n", "item_id,title\na,A\n", "finite number or empty, got e.g. [inf]"),
        ("user_id,item_id,ts\n1,a,1\n", "item_id,title\na,A\nb,\n", "items have no title at row 2"),
        # what loaded before and failed later, at `make train`'s export or the replay, with a traceback
        ("user_id,item_id,ts\n1,café,1\n", "item_id,title\ncafé,A\n", "letters, digits or _.:@- (no spaces"),
        ("user_id,item_id,ts\njohn doe,a,1\n", "item_id,title\na,A\n", "interactions.user_id must be at most 128"),
        ("user_id,item_id,ts\n1,a,1\n", "item_id,title,category\na,A,x\nb,,books\n", "no title at row 2"),
        ("user_id,item_id,ts\n1,a,1\n", "item_id,title\na," + "t" * 513 + "\n", "items.title is longer"),
        ("user_id,item_id,ts\n1,a,1\n", "item_id,title,price\na,A,$5\n", "got e.g. ['$5'] at row 1"),
        ("user_id,item_id,ts\n1,a,1577836800000\n", "item_id,title\na,A\n", "looks like milliseconds"),
    ],
)
def test_generic_clear_errors(tmp_path: Path, inter: str, items: str, message: str) -> None:
    (tmp_path / "interactions.csv").write_text(inter)
    (tmp_path / "items.csv").write_text(items)
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_generic(tmp_path)


def test_generic_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "interactions.csv").write_text("user_id,item_id,ts\n1,a,soon\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\n")
    with pytest.raises(DataFormatError, match=re.escape(f"{tmp_path / 'interactions.csv'}: interactions.ts")):
        load_generic(tmp_path)


def test_generic_missing_file_and_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"missing interactions\.csv.*the folder holds nothing"):
        load_generic(tmp_path)
    (tmp_path / "interactions.csv.gz").write_bytes(b"")
    with pytest.raises(DataFormatError, match=re.escape("the folder holds ['interactions.csv.gz']")):
        load_generic(tmp_path)
    with pytest.raises(DataFormatError, match="unknown data set"):
        load_dataset("no-such-data-set")
    with pytest.raises(DataFormatError, match="no such directory"):
        load_dataset(str(tmp_path / "missing"))


def test_commands_refuse_a_wrong_file_without_a_traceback(tmp_path: Path) -> None:
    """`train` says what is wrong with the file (usage error, exit 2) before anything is trained."""
    from typer.testing import CliRunner

    from recstream.ops.cli import app

    (tmp_path / "interactions.csv").write_text("user_id,item_id\n1,a\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\n")
    result = CliRunner().invoke(app, ["train", "--dataset", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert "lacks required column(s) ['ts']" in " ".join(result.output.split())


def test_generic_parquet_round_trip_and_mixed_forms(tmp_path: Path) -> None:
    data = tiny_synthetic()
    save_generic(data, tmp_path / "pq", fmt="parquet")
    assert sorted(p.name for p in (tmp_path / "pq").iterdir()) == ["interactions.parquet", "items.parquet"]
    back = load_dataset(str(tmp_path / "pq"))
    pd.testing.assert_frame_equal(back.interactions, data.interactions)
    pd.testing.assert_frame_equal(back.items, data.items)
    assert data_hash(back) == data_hash(data)
    # Parquet interactions beside a CSV items file read as the all-CSV form does
    data.items.to_csv(tmp_path / "pq" / "items.csv", index=False)
    (tmp_path / "pq" / "items.parquet").unlink()
    assert data_hash(load_generic(tmp_path / "pq")) == data_hash(data)


def test_generic_parquet_native_types(tmp_path: Path) -> None:
    """Integer ids and a timestamp column, as Parquet exports from a warehouse usually have them."""
    pd.DataFrame(
        {
            "user_id": pd.array([7, 7, 8], dtype="int64"),
            "item_id": pd.array([1, 2, 1], dtype="int32"),
            "ts": pd.to_datetime(["2024-01-01 00:00:10", "2024-01-01 00:00:20", "2024-01-02 00:00:00"]),
        }
    ).to_parquet(tmp_path / "interactions.parquet")
    pd.DataFrame({"item_id": [1, 2], "title": ["One", "Two"]}).to_parquet(tmp_path / "items.parquet")
    data = load_generic(tmp_path)
    assert data.interactions["user_id"].tolist() == ["7", "7", "8"]
    assert data.interactions["item_id"].tolist() == ["1", "2", "1"]
    assert data.interactions["ts"].tolist() == [1704067210, 1704067220, 1704153600]
    assert data.items["item_id"].tolist() == ["1", "2"]


def test_generic_parquet_errors(tmp_path: Path) -> None:
    items = pd.DataFrame({"item_id": ["a"], "title": ["A"]})
    items.to_parquet(tmp_path / "items.parquet")
    pd.DataFrame({"user_id": ["1", "1"], "item_id": ["a", "a"], "ts": [1.0, 2.5]}).to_parquet(
        tmp_path / "interactions.parquet"
    )
    with pytest.raises(DataFormatError, match=re.escape("integer seconds, got e.g. [2.5] at row 2")):
        load_generic(tmp_path)
    pd.DataFrame({"user_id": ["1"], "ts": [1]}).to_parquet(tmp_path / "interactions.parquet")
    with pytest.raises(DataFormatError, match=re.escape("interactions lacks required column(s) ['item_id']")):
        load_generic(tmp_path)
    for column, wrong, message in (
        ("item_id", [1.0, 2.0], "interactions.item_id is a float64 column"),
        ("user_id", [["u1"], ["u2"]], "interactions.user_id must hold strings or integers, got ['ndarray']"),
        ("ts", [True, False], "interactions.ts is a bool column"),
    ):
        frame = {"user_id": ["1", "1"], "item_id": ["a", "a"], "ts": [1, 2]} | {column: wrong}
        pd.DataFrame(frame).to_parquet(tmp_path / "interactions.parquet")
        with pytest.raises(DataFormatError, match=re.escape(message)):
            load_generic(tmp_path)
    (tmp_path / "interactions.parquet").write_bytes(b"user_id,item_id,ts\n1,a,1\n")
    with pytest.raises(DataFormatError, match=r"interactions\.parquet: not a readable Parquet file"):
        load_generic(tmp_path)
    pd.DataFrame({"user_id": ["1"], "item_id": ["a"], "ts": [1]}).to_parquet(tmp_path / "interactions.parquet")
    items.to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataFormatError, match=re.escape("both items.csv and items.parquet; keep one")):
        load_generic(tmp_path)
    pd.DataFrame({"item_id": pd.Series([], dtype=str), "title": pd.Series([], dtype=str)}).to_parquet(
        tmp_path / "items.parquet"
    )
    (tmp_path / "items.csv").unlink()
    (tmp_path / "interactions.parquet").unlink()
    (tmp_path / "interactions.csv").write_text("user_id,item_id,ts\n1,a,1\n")
    with pytest.raises(DataFormatError, match=r"items\.parquet: has no rows"):
        load_generic(tmp_path)


def test_hash_is_stable_and_content_sensitive() -> None:
    a, b = tiny_synthetic(seed=0), tiny_synthetic(seed=0)
    assert data_hash(a) == data_hash(b)
    assert data_hash(a) != data_hash(tiny_synthetic(seed=1))


def _check_no_leakage(split) -> None:  # type: ignore[no-untyped-def]
    last_train = split.train.groupby("user_idx")["ts"].max()
    valid = split.valid.set_index("user_idx")["ts"]
    test = split.test.set_index("user_idx")["ts"]
    common = valid.index.intersection(last_train.index)
    assert (valid.loc[common] >= last_train.loc[common]).all()
    both = test.index.intersection(valid.index)
    assert (test.loc[both] >= valid.loc[both]).all()
    common = test.index.intersection(last_train.index)
    assert (test.loc[common] >= last_train.loc[common]).all()


def test_leave_last_out(ml100k: InteractionData) -> None:
    split = leave_last_out(ml100k)
    assert len(split.test) == len(split.valid) == 943  # every ML user has >= 20 ratings
    assert len(split.train) + len(split.valid) + len(split.test) == 100_000
    _check_no_leakage(split)
    cases = split.cases("test")
    # the test history is the train sequence plus the validation item, in time order
    u = int(cases.users[0])
    assert cases.histories[0][-1] == split.valid.set_index("user_idx").loc[u, "item_idx"]
    assert len(cases.histories[0]) == len(split.train_seqs[u]) + 1


def test_ties_and_short_users_deterministic() -> None:
    inter = pd.DataFrame(
        {
            "user_id": ["a", "a", "a", "a", "b", "b"],
            "item_id": ["1", "2", "3", "4", "1", "2"],
            "ts": [5, 5, 5, 1, 3, 4],
        }
    )
    items = pd.DataFrame({"item_id": ["1", "2", "3", "4"], "title": ["w", "x", "y", "z"]})
    split = leave_last_out(InteractionData(inter, items))
    a, b = split.user_index["a"], split.user_index["b"]
    assert split.train_seqs[a].tolist() == [split.item_index["4"], split.item_index["1"]]
    assert split.valid.set_index("user_idx").loc[a, "item_idx"] == split.item_index["2"]
    assert split.test.set_index("user_idx").loc[a, "item_idx"] == split.item_index["3"]
    assert b not in set(split.test["user_idx"]) and len(split.train_seqs[b]) == 2


def test_a_data_set_without_a_validation_case_is_refused() -> None:
    """Users of one or two interactions only: every validation-based choice used to be made on NaN."""
    inter = pd.DataFrame({"user_id": ["a", "a", "b"], "item_id": ["1", "2", "1"], "ts": [1, 2, 3]})
    items = pd.DataFrame({"item_id": ["1", "2"], "title": ["x", "y"]})
    with pytest.raises(DataFormatError, match="no user has 3 or more interactions"):
        leave_last_out(InteractionData(inter, items, name="short"))


def test_cold_start_split(ml100k: InteractionData) -> None:
    cold = cold_start_split(ml100k, frac=0.1, seed=0)
    cold_set = set(cold.cold_items.tolist())
    assert len(cold_set) == round(0.1 * 1682)
    assert not cold_set & set(cold.train["item_idx"].tolist())
    assert not cold_set & set(cold.valid["item_idx"].tolist())
    assert len(cold.test) > 0 and set(cold.test["item_idx"].tolist()) <= cold_set
    for hist in cold.cases("test").histories:
        assert not cold_set & set(hist.tolist())
    _check_no_leakage(cold)
    # validation cases with a cold target are kept apart (cold_valid), with cold-free histories
    assert len(cold.cold_valid) > 0 and set(cold.cold_valid["item_idx"].tolist()) <= cold_set
    cv = cold.cases("cold_valid")
    assert len(cv) == len(cold.cold_valid) and set(cv.targets.tolist()) <= cold_set
    assert not any(cold_set & set(h.tolist()) for h in cv.histories)
    assert len(cold.valid) + len(cold.cold_valid) == len(leave_last_out(ml100k).valid)
    with pytest.raises(ValueError, match="cold_valid"):
        leave_last_out(ml100k).cases("cold_valid")
    again = cold_start_split(ml100k, frac=0.1, seed=0)
    assert np.array_equal(again.cold_items, cold.cold_items)


def test_training_cli_reports_validation_unless_test_is_asked_for() -> None:
    """Test figures are printed only on an explicit --stage test; a typo is refused, not defaulted,
    and so is a stage the split does not have."""
    import typer

    from recstream.training.cli import _stage_cases

    split = leave_last_out(tiny_synthetic())
    assert len(_stage_cases(split, "valid")) == len(split.cases("valid"))
    assert len(_stage_cases(split, "test")) == len(split.cases("test"))
    with pytest.raises(typer.BadParameter, match="tset"):
        _stage_cases(split, "tset")
    with pytest.raises(typer.BadParameter, match="cold_valid"):
        _stage_cases(split, "cold_valid")


def test_generic_items_are_served_as_they_are_trained(tmp_path: Path) -> None:
    """A sparse text column falls back to the default per row (an item with a title was refused as
    having no text); a long text reaches the catalog whole, as the description (it was cut to its
    last 16 words, as tags); an item without a category has none when served too (it was
    "unknown", shared by every such item, while training used ""). Parquet categorical columns
    with a missing value load (filling them raised)."""
    from recstream.data.events import catalog_events

    long = " ".join(f"w{n}" for n in range(30))
    (tmp_path / "interactions.csv").write_text("user_id,item_id,ts\n1,7,1\n1,8,2\n1,9,3\n")
    (tmp_path / "items.csv").write_text(
        f"item_id,title,category,text\n7,Seven,,a seven thing\n8,Eight,x,\n9,Nine,y,{long}\n"
    )
    data = load_generic(tmp_path)
    assert data.items["text"].tolist() == ["a seven thing", "Eight | x", long]
    upserts = {u.item_id: u for u in catalog_events(data.items)}
    assert upserts["7"].category == "" and upserts["8"].category == "x"
    assert upserts["9"].description == long and long in upserts["9"].text()
    assert upserts["7"].tags == ["a", "seven", "thing"]

    priced = pd.DataFrame({"item_id": ["a", "b", "c"], "title": ["A", "B", "C"], "price": [2.5, None, 0.0]})
    prices = [
        u.price
        for u in catalog_events(
            InteractionData(pd.DataFrame({"user_id": ["1"], "item_id": ["a"], "ts": [1]}), priced).items
        )
    ]
    assert prices == [2.5, None, 0.0]  # an empty cell is no price (NaN failed the upsert); 0 is free

    parquet = tmp_path / "parquet"
    parquet.mkdir()
    pd.DataFrame(
        {"user_id": ["1", "1"], "item_id": ["a", "b"], "ts": [1, 2], "event": pd.Categorical(["click", None])}
    ).to_parquet(parquet / "interactions.parquet")
    pd.DataFrame({"item_id": ["a", "b"], "title": ["A", "B"], "category": pd.Categorical(["x", None])}).to_parquet(
        parquet / "items.parquet"
    )
    data = load_generic(parquet)
    assert data.interactions["event"].tolist() == ["click", "interaction"]
    assert data.items["category"].tolist() == ["x", ""]

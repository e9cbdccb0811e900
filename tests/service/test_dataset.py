"""Tests of :mod:`service.dataset` on real Parquet files."""
from __future__ import annotations

import datetime as dt
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.dataset import (
    DatasetError,
    SliceDescriptor,
    filter_expression,
    open_dataset,
    read_slice,
)


def make_table(n=12, offset=0):
    i = np.arange(offset, offset + n)
    return pa.table({
        "id": pa.array(i, pa.int64()),
        "x": pa.array(i * 0.5),
        "g": pa.array([f"g{k % 3}" for k in i]),
        "cat": pa.array([("a", "b")[k % 2] for k in i]).dictionary_encode(),
        "day": pa.array([dt.date(2021, 1, 1) + dt.timedelta(days=int(k)) for k in i]),
    })


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "flat"
    (root / "sub").mkdir(parents=True)
    pq.write_table(make_table(12, 0), root / "a.parquet", row_group_size=5)
    pq.write_table(make_table(12, 12), root / "sub" / "b.parquet", row_group_size=5)
    (root / "_SUCCESS").write_text("")
    (root / ".a.parquet.crc").write_bytes(b"junk")
    (root / "README.txt").write_text("not data")
    return root


@pytest.fixture
def hive(tmp_path):
    root = tmp_path / "hive"
    for k, (region, year) in enumerate([("north", 2020), ("north", 2021), ("south", 2021)]):
        d = root / f"region={region}" / f"year={year}"
        d.mkdir(parents=True)
        pq.write_table(make_table(6, 6 * k), d / "part-0.parquet")
    return root


def test_single_file(folder):
    h = open_dataset(str(folder / "a.parquet"))
    assert h.files == (str(folder / "a.parquet"),)
    assert h.partitioning is None and h.partition_columns == ()
    assert h.schema.names == ["id", "x", "g", "cat", "day"]
    assert h.validate() == 12


def test_folder_recursive_skips_hidden_and_non_parquet(folder):
    h = open_dataset(folder)
    assert h.files == (str(folder / "a.parquet"), str(folder / "sub" / "b.parquet"))
    assert h.partitioning is None  # "sub" is not a key=value folder
    assert h.validate(columns=["id", "g"]) == 24
    assert h.dataset.count_rows() == 24


def test_glob(folder):
    assert open_dataset(f"{folder}/*.parquet").files == (str(folder / "a.parquet"),)
    assert open_dataset(f"{folder}/**/*.parquet").files == (
        str(folder / "a.parquet"), str(folder / "sub" / "b.parquet"))
    assert open_dataset(f"{folder}/s?b/[ab].parquet").files == (str(folder / "sub" / "b.parquet"),)
    with pytest.raises(DatasetError, match=r"no Parquet files matched .*\*\.parq$"):
        open_dataset(f"{folder}/*.parq")


def test_hive_partition_columns(hive):
    h = open_dataset(hive)
    assert h.partitioning == "hive"
    assert h.partition_columns == ("region", "year")
    assert h.schema.field("region").type == pa.string()
    assert pa.types.is_integer(h.schema.field("year").type)
    table = h.dataset.to_table()
    counts = table.group_by(["region", "year"]).aggregate([([], "count_all")]).to_pylist()
    assert sorted((r["region"], r["year"], r["count_all"]) for r in counts) == [
        ("north", 2020, 6), ("north", 2021, 6), ("south", 2021, 6)]
    parts = dict(h.file_partitions())
    assert parts[str(hive / "region=south" / "year=2021" / "part-0.parquet")] == {
        "region": "south", "year": 2021}


def test_hive_glob_keeps_partitioning(hive):
    h = open_dataset(f"{hive}/region=*/year=2021/*.parquet")
    assert h.partitioning == "hive" and len(h.files) == 2
    assert set(h.dataset.to_table(columns=["region"]).column("region").to_pylist()) == {"north", "south"}


def test_not_found_and_empty(tmp_path):
    with pytest.raises(DatasetError, match="nope.*not found"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no Parquet files in dataset folder"):
        open_dataset(tmp_path / "empty")
    with pytest.raises(DatasetError, match="not found"):
        open_dataset(tmp_path / "nope" / "*.parquet")


def test_corrupt_file_named_by_validate(folder):
    (folder / "x.parquet").write_bytes(b"garbage bytes, not a parquet footer" * 10)
    h = open_dataset(folder)  # schema comes from a.parquet
    with pytest.raises(DatasetError) as info:
        h.validate()
    assert str(folder / "x.parquet") in str(info.value)
    assert "unreadable Parquet file" in str(info.value)


def test_corrupt_first_file_named_by_open(folder):
    (folder / "0.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(DatasetError) as info:
        open_dataset(folder)
    assert str(folder / "0.parquet") in str(info.value)


def test_validate_names_file_missing_column(folder):
    pq.write_table(pa.table({"id": [1]}), folder / "c.parquet")
    h = open_dataset(folder)
    h.validate(columns=["id"])
    with pytest.raises(DatasetError, match=r"c\.parquet has no column 'g'"):
        h.validate(columns=["g"])


def test_validate_keeps_what_planning_reads_from_footers(folder):
    h = open_dataset(folder)
    a, b = str(folder / "a.parquet"), str(folder / "sub" / "b.parquet")
    fresh = list(open_dataset(folder).row_group_stats(["id", "g"]))
    assert [(s.file, s.row_group, s.num_rows) for s in fresh] == [
        (a, 0, 5), (a, 1, 5), (a, 2, 2), (b, 0, 5), (b, 1, 5), (b, 2, 2)]
    assert fresh[3].ranges["id"] == (12, 16, 0) and fresh[0].ranges["g"] == ("g0", "g2", 0)
    assert h.validate(columns=["id"], stats_columns=["id", "g"]) == 24
    assert h.footers.rows == {a: 12, b: 12}
    # the footers are not read again: a file broken since validation goes unnoticed here
    (folder / "a.parquet").write_bytes(b"garbage bytes, not a parquet footer" * 10)
    assert list(h.file_row_counts()) == [(a, 12), (b, 12)]
    assert list(h.file_row_counts([b])) == [(b, 12)]
    assert list(h.row_group_stats(["id", "g"])) == fresh
    assert list(h.row_group_stats(["g"], files=[b])) == fresh[3:]
    # statistics not kept, or a file not seen: read (and fail naming the file)
    with pytest.raises(DatasetError, match=r"unreadable Parquet file .*a\.parquet"):
        list(h.row_group_stats(["x"]))
    with pytest.raises(DatasetError, match=r"unreadable Parquet file .*a\.parquet"):
        list(open_dataset(str(folder / "sub" / "b.parquet")).file_row_counts([a]))


def test_validate_checks_each_distinct_schema(folder):
    table = make_table(12, 24)
    pq.write_table(table.set_column(1, "x", pa.array([[0.5]] * 12)), folder / "c.parquet")
    pq.write_table(make_table(3, 40), folder / "d.parquet")  # same schema as a.parquet
    h = open_dataset(folder)
    with pytest.raises(DatasetError, match=r"c\.parquet: column 'x' has type list<"):
        h.validate()
    (folder / "c.parquet").unlink()
    assert open_dataset(folder).validate(columns=["id", "x"]) == 27


def descriptor(h, **kw):
    kw.setdefault("columns", tuple(h.schema.names))
    return h.descriptor(**kw)


@pytest.mark.parametrize(
    "filters, query",
    [
        ([("id", ">=", 5)], "id >= 5"),
        ([("id", "<", 5), ("g", "==", "g1")], "id < 5 and g == 'g1'"),
        ([("g", "!=", "g1")], "g != 'g1'"),
        ([("x", "<=", 3.5)], "x <= 3.5"),
        ([("x", ">", 3)], "x > 3"),
        ([("id", "in", (1, 3, 20))], "id in [1, 3, 20]"),
        ([("g", "not in", ("g0",))], "g not in ['g0']"),
        ([("cat", "==", "b")], "cat == 'b'"),
        ([("day", "<", "2021-01-04")], "day < @dt.date(2021, 1, 4)"),
    ],
)
def test_filters_pushdown_match_pandas(folder, filters, query):
    h = open_dataset(folder)
    full = h.dataset.to_table().to_pandas()
    expected = full.query(query, local_dict={"dt": dt}).sort_values("id")["id"].tolist()
    got = read_slice(descriptor(h, filters=filters)).sort_values("id")["id"].tolist()
    assert got == expected
    assert expected  # the case is not vacuous


def test_filter_expression_errors(folder):
    schema = open_dataset(folder).schema
    with pytest.raises(DatasetError, match="unknown column 'nope'"):
        filter_expression([("nope", "==", 1)], schema)
    with pytest.raises(DatasetError, match="not comparable with column 'g'"):
        filter_expression([("g", "==", 1)], schema)
    with pytest.raises(DatasetError, match="not comparable with column 'id'"):
        filter_expression([("id", "==", "1")], schema)
    with pytest.raises(DatasetError, match="cannot be read as date32"):
        filter_expression([("day", "==", "yesterday")], schema)
    assert filter_expression([], schema) is None


def test_filter_nulls_follow_sql(tmp_path):
    pq.write_table(pa.table({"v": [1, None, 3], "s": ["a", None, "b"]}), tmp_path / "n.parquet")
    h = open_dataset(tmp_path / "n.parquet")
    assert read_slice(descriptor(h, filters=[("v", "!=", 1)]))["v"].tolist() == [3]
    assert read_slice(descriptor(h, filters=[("s", "not in", ("a",))]))["s"].tolist() == ["b"]


def test_read_slice_columns_strata_and_types(hive):
    h = open_dataset(hive)
    d = descriptor(h, columns=("x", "cat"), strata_columns=("region", "year"),
                   strata_values=(("north", 2021), ("south", 2021)))
    df = read_slice(d)
    assert list(df.columns) == ["x", "cat", "region", "year"]
    assert isinstance(df["cat"].dtype, pd.CategoricalDtype)
    assert sorted(set(zip(df.region, df.year))) == [("north", 2021), ("south", 2021)]
    assert len(df) == 12


def test_read_slice_multi_column_strata_is_exact(hive):
    h = open_dataset(hive)
    # per-column isin alone would also return (north, 2021) and (south, 2020 - absent)
    d = descriptor(h, strata_columns=("region", "year"), strata_values=(("north", 2020), ("south", 2021)))
    df = read_slice(d)
    assert sorted(set(zip(df.region, df.year))) == [("north", 2020), ("south", 2021)]
    assert len(df) == 12


def test_read_slice_row_groups_and_files(folder):
    h = open_dataset(folder)
    a, b = h.files
    d = descriptor(h, files=(a, b), row_groups=((1,), None), columns=("id",))
    assert read_slice(d)["id"].tolist() == list(range(5, 10)) + list(range(12, 24))
    d = descriptor(h, files=(b,), columns=("id",))
    assert read_slice(d)["id"].tolist() == list(range(12, 24))


def test_read_slice_missing_file_named(folder):
    h = open_dataset(folder)
    d = descriptor(h)
    (folder / "a.parquet").unlink()
    with pytest.raises(DatasetError, match="a.parquet"):
        read_slice(d)


def test_descriptor_small_and_picklable(hive):
    h = open_dataset(hive)
    d = descriptor(h, filters=[("id", ">", 1)], strata_columns=("region",), strata_values=(("north",),))
    again = pickle.loads(pickle.dumps(d))
    assert again == d and isinstance(again, SliceDescriptor)
    assert len(pickle.dumps(d)) < 4000
    pd.testing.assert_frame_equal(read_slice(again), read_slice(d))


def test_descriptor_pins_partition_types(tmp_path):
    """A worker given only some files must not re-infer partition types differently."""
    for v in ("1", "x"):
        (tmp_path / f"k={v}").mkdir()
        pq.write_table(pa.table({"y": [1.0]}), tmp_path / f"k={v}" / "p.parquet")
    h = open_dataset(tmp_path)
    assert h.schema.field("k").type == pa.string()
    only_one = descriptor(h, files=(str(tmp_path / "k=1" / "p.parquet"),),
                          strata_columns=("k",), strata_values=(("1",),))
    assert read_slice(only_one)["k"].tolist() == ["1"]

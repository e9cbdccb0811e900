"""The file-by-file fast path returns exactly the table of the ``pyarrow.dataset`` scan."""
from __future__ import annotations

import datetime as dt
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import service.direct_read as direct_read
from service.dataset import DatasetError, open_dataset, read_slice, read_slice_table


def make_table(n=12, offset=0):
    i = np.arange(offset, offset + n)
    return pa.table({
        "id": pa.array(i, pa.int64()),
        "x": pa.array(i * 0.5),
        "g": pa.array([f"g{k % 3}" if k % 5 else None for k in i]),
        "cat": pa.array([("a", "b")[k % 2] for k in i]).dictionary_encode(),
        "day": pa.array([dt.date(2021, 1, 1) + dt.timedelta(days=int(k)) for k in i]),
    })


@pytest.fixture
def hive(tmp_path):
    root = tmp_path / "hive"
    cells = [("north", 2020), ("north", 2021), ("south", 2021), ("a b", 2022), (None, 2022)]
    for k, (region, year) in enumerate(cells):
        name = "__HIVE_DEFAULT_PARTITION__" if region is None else region.replace(" ", "%20")
        d = root / f"region={name}" / f"year={year}"
        d.mkdir(parents=True)
        pq.write_table(make_table(6, 6 * k), d / "part-0.parquet", row_group_size=4)
    return root


@pytest.fixture(autouse=True)
def count_direct(monkeypatch):
    """Record whether each read took the fast path (its return value)."""
    seen = []
    real = direct_read.read_direct

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out is not None)
        return out

    monkeypatch.setattr(direct_read, "read_direct", spy)
    return seen


def same_as_scan(d):
    fast = read_slice_table(d)
    scan = read_slice_table(d, direct=False)
    assert fast.schema.equals(scan.schema, check_metadata=True)
    assert fast.equals(scan), (fast.to_pandas(), scan.to_pandas())
    pd.testing.assert_frame_equal(fast.to_pandas(), scan.to_pandas())
    return fast


def test_hive_partitions_filters_and_strata_match_the_scan(hive, count_direct):
    h = open_dataset(hive)
    cases = [
        h.descriptor(columns=("x", "cat", "day")),
        h.descriptor(columns=("x",), filters=[("id", ">", 7)]),  # filter column not returned
        h.descriptor(columns=("x", "g"), filters=[("year", ">=", 2021), ("g", "!=", "g1")]),
        h.descriptor(columns=("x",), strata_columns=("region", "year"),
                     strata_values=(("north", 2020), ("south", 2021), (None, 2022))),
        h.descriptor(columns=("x",), strata_columns=("region",), strata_values=(("a b",),)),
        h.descriptor(columns=("x",), filters=[("id", ">", 10_000)]),  # no row left
    ]
    for d in cases:
        same_as_scan(d)
    assert count_direct == [True] * len(cases)
    df = read_slice(cases[3])
    assert set(zip(df.region.fillna("<null>"), df.year)) == {
        ("north", 2020), ("south", 2021), ("<null>", 2022)}
    assert len(df) == 18


def test_files_holding_strata_and_row_groups(hive, count_direct):
    h = open_dataset(hive)
    files = tuple(f for f in h.files if "north" in f)
    d = h.descriptor(columns=("id", "x"), strata_columns=("region",), strata_values=(("north",),),
                     files=files, files_hold_strata=True)
    assert d.files_hold_strata
    assert len(same_as_scan(d)) == 12
    d = h.descriptor(columns=("id",), files=files, row_groups=((1,), (0, 1)))
    assert same_as_scan(d)["id"].to_pylist() == [4, 5, *range(6, 12)]
    assert count_direct == [True, True]


def test_flat_file_without_partitions(tmp_path, count_direct):
    pq.write_table(make_table(20), tmp_path / "one.parquet", row_group_size=6)
    h = open_dataset(tmp_path / "one.parquet")
    same_as_scan(h.descriptor(columns=("x", "g"), strata_columns=("g",), strata_values=(("g1",), (None,))))
    assert count_direct == [True]


def test_pandas_written_files_keep_pandas_types(tmp_path, count_direct):
    frame = pd.DataFrame({"y": [1.0, 2.0, 3.0], "f": pd.Categorical(["u", "v", "u"]), "n": [1, 2, 3]})
    (tmp_path / "s=1").mkdir()
    frame.to_parquet(tmp_path / "s=1" / "p.parquet")
    h = open_dataset(tmp_path)
    df = same_as_scan(h.descriptor(columns=("y", "f", "n"), strata_columns=("s",),
                                   strata_values=((1,),))).to_pandas()
    assert isinstance(df["f"].dtype, pd.CategoricalDtype)
    assert count_direct == [True]


@pytest.mark.parametrize("second", [
    pa.table({"id": pa.array([7, 8], pa.int32()), "x": [1.0, 2.0]}),  # another integer type
    pa.table({"id": pa.array([7, 8], pa.int64())}),  # a column missing
])
def test_files_the_scan_must_cast_go_through_the_scan(tmp_path, second, count_direct):
    (tmp_path / "k=1").mkdir()
    (tmp_path / "k=2").mkdir()
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int64()), "x": [0.5, 1.5]}), tmp_path / "k=1" / "a.parquet")
    pq.write_table(second, tmp_path / "k=2" / "b.parquet")
    h = open_dataset(tmp_path)
    assert h.schema.field("id").type == pa.int64()
    got = same_as_scan(h.descriptor(columns=("id", "x"), strata_columns=("k",), strata_values=((1,), (2,))))
    assert got["id"].to_pylist() == [1, 2, 7, 8]
    assert count_direct == [False]


def test_missing_file_still_named(hive, count_direct):
    h = open_dataset(hive)
    d = h.descriptor(columns=("x",))
    os.unlink(h.files[2])
    with pytest.raises(DatasetError, match="part-0.parquet"):
        read_slice(d)

"""Tests of :mod:`service.planner`: strata listing, keys, packing, and slices."""
from __future__ import annotations

import datetime as dt
import pickle

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.dataset import open_dataset, read_slice
from service.planner import (
    DEFAULT_TARGET_ROWS,
    MAX_STRATA_PER_TASK,
    MIN_TASKS,
    OVERHEAD_ROWS,
    ROWS_PER_SECOND,
    Task,
    format_value,
    plan_strata,
    plan_tasks,
    stratum_key,
)
from service.spec import load_spec
from storage.records import StratumPlan

COLUMNS = ("y", "x")  # what a worker would read (formula-free, so no fitting import)


def spec_for(path, **kw):
    raw = {"name": "t", "dataset": str(path), "formula": "y ~ x + (1 | g)"}
    raw.update(kw)
    return load_spec(raw)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Non-hive dataset, several files, small row groups, strata of many types + nulls."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(7)
    n = 3000
    region = rng.choice(["north", "south", "east", "we/st=1"], n).astype(object)
    region[rng.random(n) < 0.03] = None
    year = rng.choice([2019, 2020, 2021], n)
    flag = rng.random(n) < 0.4
    day = np.array([dt.date(2021, 1, 1) + dt.timedelta(days=int(k)) for k in rng.integers(0, 3, n)])
    frame = pd.DataFrame({
        "row": np.arange(n), "y": rng.normal(size=n), "x": rng.normal(size=n),
        "region": region, "year": year, "flag": flag, "day": day,
        "kind": rng.choice(["p", "q"], n),
    })
    # sorted by region in file 0..2 so statistics can prune; file 3 unsorted
    frame = frame.sort_values(["region", "year"], na_position="last", kind="stable").reset_index(drop=True)
    parts = np.array_split(np.arange(n), 4)
    for i, idx in enumerate(parts):
        part = frame.iloc[idx]
        if i == 3:
            part = part.sample(frac=1.0, random_state=1)
        table = pa.Table.from_pandas(part, preserve_index=False)
        table = table.set_column(table.schema.get_field_index("kind"), "kind",
                                 table.column("kind").dictionary_encode())
        table = table.set_column(table.schema.get_field_index("year"), "year",
                                 table.column("year").cast(pa.int32()))
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=100)
    return root, frame


@pytest.fixture(scope="module")
def hive(tmp_path_factory):
    root = tmp_path_factory.mktemp("hive")
    rng = np.random.default_rng(3)
    frames = []
    for r, region in enumerate(["a", "b", "c", "d", "e"]):
        for year in (2020, 2021):
            n = 50 + 40 * r + (year - 2020) * 7
            f = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n),
                              "product": rng.choice(["A", "B"], n)})
            folder = root / f"region={region}" / f"year={year}"
            folder.mkdir(parents=True)
            f.to_parquet(folder / "part-0.parquet", index=False)
            frames.append(f.assign(region=region, year=year))
    return root, pd.concat(frames, ignore_index=True)


def pandas_counts(frame, columns, query=None):
    if query:
        frame = frame.query(query)
    counts = frame.groupby(list(columns), dropna=False).size()
    out = {}
    for values, n in counts.items():
        values = values if isinstance(values, tuple) else (values,)
        values = tuple(None if (not isinstance(v, (str, dt.date)) and pd.isna(v)) else v for v in values)
        out[values] = int(n)
    return out


def raw_values(plan, columns):
    out = []
    for c in columns:
        v = plan.values[c]
        out.append(dt.date.fromisoformat(v) if c == "day" and v is not None else v)
    return tuple(out)


# ------------------------------------------------------------------ keys


def test_key_format():
    assert stratum_key(["region", "year"], ["north", 2021]) == "region=north/year=2021"
    assert stratum_key([], []) == ""
    assert stratum_key(["a", "b", "c", "d"], [True, False, None, dt.date(2021, 3, 1)]) == \
        "a=true/b=false/c=__null__/d=2021-03-01"
    assert stratum_key(["r"], ["we/st=1%"]) == "r=we%2Fst%3D1%25"
    assert format_value("__null__") == "%5F_null__"
    assert format_value(np.int64(7)) == "7" and format_value(7.0) == "7"
    assert format_value(np.bool_(True)) == "true"


# ------------------------------------------------------------------ strata


@pytest.mark.parametrize(
    "strata",
    [["region"], ["year"], ["flag"], ["day"], ["kind"], ["region", "year"], ["year", "flag", "kind"]],
)
def test_counts_equal_pandas(mixed, strata):
    root, frame = mixed
    h = open_dataset(root)
    plans = plan_strata(h, spec_for(root, strata=strata))
    expected = pandas_counts(frame, strata)
    got = {raw_values(p, strata): p.nrows for p in plans}
    assert got == expected
    assert sum(p.nrows for p in plans) == len(frame)
    for p in plans:
        assert p.key == stratum_key(strata, [p.values[c] for c in strata])
        assert isinstance(p, StratumPlan)
    assert len({p.key for p in plans}) == len(plans)


def test_strata_sorted_nulls_last_and_json_values(mixed):
    root, _ = mixed
    plans = plan_strata(open_dataset(root), spec_for(root, strata=["region", "day"]))
    regions = [p.values["region"] for p in plans]
    assert regions == sorted(regions, key=lambda v: (v is None, v or ""))
    assert plans[-1].key.startswith("region=__null__/day=")
    assert plans[0].key == "region=east/day=2021-01-01"
    assert plans[0].values == {"region": "east", "day": "2021-01-01"}
    assert any(p.key.startswith("region=we%2Fst%3D1/") for p in plans)


def test_filters_apply_to_counts(mixed):
    root, frame = mixed
    spec = spec_for(root, strata=["region"], filters=[["year", ">=", 2020], ["kind", "==", "p"]])
    plans = plan_strata(open_dataset(root), spec)
    assert {raw_values(p, ["region"]): p.nrows for p in plans} == \
        pandas_counts(frame, ["region"], "year >= 2020 and kind == 'p'")


def test_no_strata_columns(mixed):
    root, frame = mixed
    h = open_dataset(root)
    plans = plan_strata(h, spec_for(root))
    assert plans == [StratumPlan(key="", values={}, nrows=len(frame))]
    assert plan_strata(h, spec_for(root, filters=[["year", ">", 3000]])) == []
    (task,) = plan_tasks(h, spec_for(root), plans, columns=COLUMNS)
    assert len(read_slice(task.descriptor)) == len(frame)


def test_hive_strata_counts(hive):
    root, frame = hive
    h = open_dataset(root)
    plans = plan_strata(h, spec_for(root, strata=["region", "year"]))
    assert [p.key for p in plans[:3]] == ["region=a/year=2020", "region=a/year=2021", "region=b/year=2020"]
    assert {raw_values(p, ["region", "year"]): p.nrows for p in plans} == \
        pandas_counts(frame, ["region", "year"])


@pytest.mark.parametrize("filters", [
    [], [["year", "==", 2021]], [["region", "in", ["b", "zz"]], ["year", ">=", 2020]],
    [["region", "!=", "a"]], [["year", ">", 3000]],
])
def test_partition_strata_from_metadata_match_scan(tmp_path, monkeypatch, filters):
    """Strata + filters on hive columns only: no data read, same plans as a scan."""
    import service.planner as planner_mod

    rng = np.random.default_rng(5)
    for region, year, n in [("a", 2020, 30), ("a", 2021, 12), ("b", 2020, 7), ("b", 2021, 0),
                            ("__HIVE_DEFAULT_PARTITION__", 2021, 9), ("c", 2020, 5)]:
        folder = tmp_path / f"region={region}" / f"year={year}"
        folder.mkdir(parents=True)
        f = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n)})
        pq.write_table(pa.Table.from_pandas(f, preserve_index=False), folder / "part-0.parquet")
        if region == "a":  # two files in one folder
            pq.write_table(pa.Table.from_pandas(f, preserve_index=False), folder / "part-1.parquet")
    h = open_dataset(tmp_path)
    spec = spec_for(tmp_path, strata=["region", "year"], filters=filters)
    fast = plan_strata(h, spec)
    calls = []
    monkeypatch.setattr(planner_mod, "_partition_counts",
                        lambda *a: calls.append(a) or pytest.fail("metadata path used"))
    monkeypatch.setattr(type(h), "partition_columns", property(lambda self: ()))
    slow = plan_strata(h, spec)
    assert fast == slow
    assert all(p.nrows > 0 for p in fast)
    if not filters:
        assert [p.key for p in fast][-1] == "region=__null__/year=2021"


# ------------------------------------------------------------------ packing


def fake_strata(sizes):
    return [StratumPlan(key=f"s={i:04d}", values={"s": f"{i:04d}"}, nrows=n) for i, n in enumerate(sizes)]


def test_packing_respects_target_and_keeps_every_stratum_once(hive):
    root, _ = hive
    h = open_dataset(root)
    rng = np.random.default_rng(0)
    sizes = list(rng.integers(1, 3000, 300)) + [50_000, 10, 25_000] + [5] * 200
    strata = fake_strata(sizes)
    spec = spec_for(root)
    tasks = plan_tasks(h, spec, strata, target_rows_per_task=10_000, columns=COLUMNS)
    assert [s for t in tasks for s in t.strata] == strata  # each once, order kept
    for t in tasks:
        cost = sum(OVERHEAD_ROWS + s.nrows for s in t.strata)
        assert len(t.strata) == 1 or cost <= 10_000
        assert len(t.strata) <= MAX_STRATA_PER_TASK
        assert t.est_rows == sum(s.nrows for s in t.strata)
    big = [t for t in tasks if t.est_rows >= 25_000]
    assert [len(t.strata) for t in big] == [1, 1]
    # greedy: a task plus the next stratum would exceed the target or the strata cap
    for t, nxt in zip(tasks, tasks[1:]):
        cost = sum(OVERHEAD_ROWS + s.nrows for s in t.strata) + OVERHEAD_ROWS + nxt.strata[0].nrows
        assert cost > 10_000 or len(t.strata) == MAX_STRATA_PER_TASK
    ids = [t.task_id for t in tasks]
    assert len(set(ids)) == len(ids)
    again = plan_tasks(h, spec, strata, target_rows_per_task=10_000, columns=COLUMNS)
    assert [t.task_id for t in again] == ids  # stable


def test_packing_small_strata_capped(hive):
    root, _ = hive
    h = open_dataset(root)
    cap = MAX_STRATA_PER_TASK
    tasks = plan_tasks(h, spec_for(root), fake_strata([1] * 200), target_rows_per_task=10**6,
                       columns=COLUMNS)
    assert [len(t.strata) for t in tasks] == [cap, cap, 200 - 2 * cap]
    # the per-stratum overhead bounds tiny strata first: 20000 // 401 = 49
    tasks = plan_tasks(h, spec_for(root), fake_strata([1] * 200), target_rows_per_task=20_000,
                       columns=COLUMNS)
    assert [len(t.strata) for t in tasks] == [49, 49, 49, 49, 4]
    # the default target (200000 // 401 = 498) lets the strata cap bind on a big job
    n = 20 * cap
    tasks = plan_tasks(h, spec_for(root), fake_strata([1] * n), columns=COLUMNS)
    assert [len(t.strata) for t in tasks] == [cap] * 20


def test_default_target_leaves_min_tasks_to_share(hive):
    root, _ = hive
    h = open_dataset(root)
    # 200 strata of 2,000 rows: the default target would make 3 tasks, MIN_TASKS makes 8
    tasks = plan_tasks(h, spec_for(root), fake_strata([2000] * 200), columns=COLUMNS)
    assert len(tasks) == MIN_TASKS
    assert {len(t.strata) for t in tasks} == {200 // MIN_TASKS}
    # fewer strata than MIN_TASKS: one stratum each
    assert [len(t.strata) for t in plan_tasks(h, spec_for(root), fake_strata([50] * 3),
                                              columns=COLUMNS)] == [1, 1, 1]
    # an explicit max_task_seconds is obeyed as it is (one task here)
    tasks = plan_tasks(h, spec_for(root, max_task_seconds=10.0), fake_strata([2000] * 20),
                       columns=COLUMNS)
    assert len(tasks) == 1


def test_max_task_seconds_sets_target(hive):
    root, _ = hive
    h = open_dataset(root)
    strata = fake_strata([2000] * 1000)  # big enough for the default target to bind
    default = plan_tasks(h, spec_for(root), strata, columns=COLUMNS)
    per = int(DEFAULT_TARGET_ROWS // (OVERHEAD_ROWS + 2000))
    assert 1 < per < MAX_STRATA_PER_TASK  # the target, not the cap, decides
    assert {len(t.strata) for t in default[:-1]} == {per}
    short = plan_tasks(h, spec_for(root, max_task_seconds=0.05), strata, columns=COLUMNS)
    per_short = int(0.05 * ROWS_PER_SECOND // (OVERHEAD_ROWS + 2000))
    assert 1 < per_short < min(per, MAX_STRATA_PER_TASK)  # the seconds, not a cap, decide
    assert {len(t.strata) for t in short[:-1]} == {per_short}
    assert plan_tasks(h, spec_for(root), [], columns=COLUMNS) == []
    with pytest.raises(ValueError):
        plan_tasks(h, spec_for(root), strata, target_rows_per_task=0, columns=COLUMNS)


# ------------------------------------------------------------------ slices


def check_slices(tasks, frame, strata, columns, query=None):
    if query:
        frame = frame.query(query)
    for task in tasks:
        got = read_slice(task.descriptor)
        assert list(got.columns) == list(dict.fromkeys([*columns, *strata]))
        mask = np.zeros(len(frame), dtype=bool)
        for s in task.strata:
            m = np.ones(len(frame), dtype=bool)
            for c in strata:
                v = raw_values(s, [c])[0]
                m &= frame[c].isna().to_numpy() if v is None else (frame[c] == v).to_numpy()
            mask |= m
            got_m = np.ones(len(got), dtype=bool)
            for c in strata:
                v = raw_values(s, [c])[0]
                col = got[c].astype(object)
                got_m &= col.isna().to_numpy() if v is None else (col == v).to_numpy()
            assert got_m.sum() == s.nrows
        expected = frame.loc[mask, list(columns)].sort_values(list(columns)).reset_index(drop=True)
        actual = got[list(columns)].sort_values(list(columns)).reset_index(drop=True)
        pd.testing.assert_frame_equal(actual, expected, check_dtype=False)
        assert len(got) == task.est_rows


@pytest.mark.parametrize("strata", [["region"], ["region", "year"], ["day", "flag"], ["kind"]])
def test_slices_return_exactly_their_strata(mixed, strata):
    root, frame = mixed
    h = open_dataset(root)
    spec = spec_for(root, strata=strata)
    plans = plan_strata(h, spec)
    tasks = plan_tasks(h, spec, plans, target_rows_per_task=700, columns=("row", "y"))
    assert len(tasks) > 1
    check_slices(tasks, frame, strata, ("row", "y"))


def test_slices_with_filters(mixed):
    root, frame = mixed
    h = open_dataset(root)
    spec = spec_for(root, strata=["region"], filters=[["year", "in", [2019, 2021]]])
    tasks = plan_tasks(h, spec, plan_strata(h, spec), target_rows_per_task=500, columns=("row",))
    check_slices(tasks, frame, ["region"], ("row",), "year in [2019, 2021]")


def test_row_group_statistics_prune(mixed):
    root, _ = mixed
    h = open_dataset(root)
    spec = spec_for(root, strata=["region"])
    plans = plan_strata(h, spec)
    tasks = plan_tasks(h, spec, plans, target_rows_per_task=1, columns=COLUMNS)  # one stratum each
    west = next(t for t in tasks if t.strata[0].values["region"] == "we/st=1")
    d = west.descriptor
    # files 0-2 are sorted by region, file 3 (the last, unsorted quarter) holds "we/st=1"
    assert str(root / "part-3.parquet") in d.files
    assert str(root / "part-0.parquet") not in d.files
    total_groups = sum(pq.read_metadata(f).num_row_groups for f in h.files)
    listed = sum(pq.read_metadata(f).num_row_groups if rg is None else len(rg)
                 for f, rg in zip(d.files, d.row_groups or [None] * len(d.files)))
    assert listed < total_groups


def test_hive_tasks_list_only_their_files(hive):
    root, frame = hive
    h = open_dataset(root)
    spec = spec_for(root, strata=["region", "product"])
    plans = plan_strata(h, spec)
    tasks = plan_tasks(h, spec, plans, target_rows_per_task=150, columns=COLUMNS)
    for t in tasks:
        regions = {s.values["region"] for s in t.strata}
        assert {f.split("region=")[1].split("/")[0] for f in t.descriptor.files} == regions
    check_slices(tasks, frame, ["region", "product"], COLUMNS)


@pytest.mark.parametrize("strata,filters,query,flag", [
    (["region"], (), None, True),
    (["region", "year"], (), None, True),
    (["region"], [["product", "==", "A"]], "product == 'A'", True),
    (["region", "product"], (), None, False),  # product is a data column: predicate kept
])
def test_partition_strata_skip_the_strata_predicate(hive, strata, filters, query, flag):
    root, frame = hive
    h = open_dataset(root)
    spec = spec_for(root, strata=strata, filters=list(filters))
    tasks = plan_tasks(h, spec, plan_strata(h, spec), target_rows_per_task=150, columns=COLUMNS)
    assert len(tasks) > 1
    assert all(t.descriptor.files_hold_strata is flag for t in tasks)
    check_slices(tasks, frame, strata, COLUMNS, query)


def test_files_hold_strata_needs_partition_columns_and_chosen_files(hive):
    root, _ = hive
    h = open_dataset(root)
    d = h.descriptor(columns=COLUMNS, strata_columns=("region",), strata_values=(("a",),),
                     files_hold_strata=True)  # every file: the predicate is still needed
    assert d.files_hold_strata is False
    got = read_slice(d)
    assert set(got["region"].astype(str)) == {"a"}
    d = h.descriptor(columns=COLUMNS, strata_columns=("product",), strata_values=(("A",),),
                     files=h.files[:2], files_hold_strata=True)
    assert d.files_hold_strata is False


def test_task_pickles_small(hive):
    root, _ = hive
    h = open_dataset(root)
    spec = spec_for(root, strata=["region"])
    (task, *_) = plan_tasks(h, spec, plan_strata(h, spec), columns=COLUMNS)
    assert isinstance(task, Task)
    assert pickle.loads(pickle.dumps(task)) == task
    assert len(pickle.dumps(task)) < 8000


def test_default_columns_from_formula(hive):
    pytest.importorskip("fitting.formula")
    root, _ = hive
    h = open_dataset(root)
    spec = spec_for(root, strata=["region"], formula="y ~ x + (1 | product)")
    (task, *_) = plan_tasks(h, spec, plan_strata(h, spec))
    assert set(task.descriptor.columns) == {"y", "x", "product", "region"}


def test_null_stratum_uses_null_counts(mixed):
    root, frame = mixed
    h = open_dataset(root)
    spec = spec_for(root, strata=["region"])
    tasks = plan_tasks(h, spec, plan_strata(h, spec), target_rows_per_task=1, columns=("row",))
    null_task = next(t for t in tasks if t.strata[0].values["region"] is None)
    # nulls sort last, so only the last file has them; footers' null counts say so
    assert null_task.descriptor.files == (str(root / "part-3.parquet"),)
    assert sorted(read_slice(null_task.descriptor)["row"]) == sorted(frame.loc[frame.region.isna(), "row"])

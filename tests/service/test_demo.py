"""Tests of :mod:`service.demo`."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from service.dataset import open_dataset
from service.demo import demo_layout, write_demo_dataset, write_demo_spec
from service.planner import plan_strata
from service.spec import load_spec, validate_spec

COLUMNS = ["product", "doctor", "age", "married", "il6", "remission", "los", "region"]


def read_all(path):
    return open_dataset(path).dataset.to_table().to_pandas()


def test_deterministic_and_seed_sensitive(tmp_path):
    a = read_all(write_demo_dataset(tmp_path / "a", n_strata=12, seed=5))
    b = read_all(write_demo_dataset(tmp_path / "b", n_strata=12, seed=5))
    c = read_all(write_demo_dataset(tmp_path / "c", n_strata=12, seed=6))
    assert a.equals(b)
    assert not a[["age", "remission"]].equals(c[["age", "remission"]])


def test_shape_and_ranges(tmp_path):
    path = write_demo_dataset(tmp_path / "d", n_strata=30, n_groups=(5, 8),
                              rows_per_group=(3, 6), seed=1, broken_strata=2)
    df = read_all(path)
    assert sorted(df.columns) == sorted(COLUMNS)
    regions = sorted(os.listdir(path))
    assert regions == sorted([f"region=r{i:03d}" for i in range(30)] + ["_demo.json"])
    assert all(os.listdir(os.path.join(path, r)) == ["part-0.parquet"] for r in regions if r.startswith("region="))
    layout = demo_layout(30, seed=1, broken_strata=2)
    assert len(layout.broken) == 2
    per_region = df.groupby("region")["doctor"].nunique()
    assert set(per_region[list(layout.broken)]) == {1}
    ok = per_region.drop(list(layout.broken))
    assert ok.between(5, 8).all()
    per_doctor = df[~df.region.isin(layout.broken)].groupby(["region", "doctor"]).size()
    assert per_doctor.between(3, 6).all()
    assert set(df["product"]) == {"A", "B", "C"}
    assert set(df["remission"]) == {0, 1} and set(df["married"]) <= {0, 1}
    assert (df["los"] >= 0).all() and df["age"].between(18, 95).all()
    marker = json.loads((tmp_path / "d" / "_demo.json").read_text())
    assert marker["broken"] == list(layout.broken) and marker["rows"] == len(df)


def test_simulated_effects_visible(tmp_path):
    df = read_all(write_demo_dataset(tmp_path / "e", n_strata=40, seed=2))
    assert 0.2 < df["remission"].mean() < 0.7
    # older patients remit less (true slope ~ -0.03 per year)
    assert np.corrcoef(df["age"], df["remission"])[0, 1] < -0.05
    # doctor random intercepts (sd 0.6-1.0) spread the per-doctor remission rates beyond
    # binomial noise alone
    g = df.groupby(["region", "doctor"])["remission"].agg(["mean", "size"])
    p = df["remission"].mean()
    noise = np.mean(p * (1 - p) / g["size"])
    assert g["mean"].var() > 1.5 * noise
    assert 2.0 < df["los"].mean() < 6.0


def test_fast(tmp_path):
    start = time.perf_counter()
    write_demo_dataset(tmp_path / "fast")
    assert time.perf_counter() - start < 2.0


def test_rewrite_and_refuse_foreign_folder(tmp_path):
    path = tmp_path / "demo"
    write_demo_dataset(path, n_strata=10)
    write_demo_dataset(path, n_strata=4)
    assert len(open_dataset(path).files) == 4  # stale regions removed
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        write_demo_dataset(tmp_path / "other")


def test_demo_spec_loads_and_plans(tmp_path):
    data = write_demo_dataset(tmp_path / "data", n_strata=15, seed=3)
    (tmp_path / "specs").mkdir()
    spec_path = write_demo_spec(tmp_path / "specs", data)  # a folder: demo.toml inside
    assert spec_path == str(tmp_path / "specs" / "demo.toml")
    assert 'dataset = "../data"' in open(spec_path).read()
    spec = load_spec(spec_path)
    assert spec.dataset == str(tmp_path / "data")
    assert spec.strata == ("region",) and spec.family == "binomial"
    plans = plan_strata(open_dataset(spec.dataset), spec)
    assert [p.key for p in plans] == [f"region=r{i:03d}" for i in range(15)]
    assert sum(p.nrows for p in plans) == pq.ParquetDataset(data).read().num_rows
    poisson = load_spec(write_demo_spec(tmp_path / "p.toml", data, kind="poisson"))
    assert poisson.family == "poisson" and poisson.formula.startswith("los ~")


def test_demo_spec_validates(tmp_path):
    pytest.importorskip("fitting.formula")
    data = write_demo_dataset(tmp_path / "data", n_strata=3)
    report = validate_spec(load_spec(write_demo_spec(tmp_path / "demo.toml", data)))
    assert set(report.used_columns) == {"remission", "age", "married", "il6", "doctor", "region"}

"""Shared helpers for the runner / CLI / end-to-end tests (real Dask, real databases).

Import the fixtures you need into a test module (``from tests.service.service_helpers
import local_cluster``); module-scoped fixtures then start once per module.
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

__all__ = [
    "local_cluster",
    "demo_job",
    "write_job",
    "wait_until",
    "fits_of",
    "direct_fit",
    "stratafit_cmd",
    "N_STRATA",
]

#: Strata of the small demo dataset used by these tests (one of them broken).
N_STRATA = 12


def write_job(
    root: Path,
    *,
    n_strata: int = N_STRATA,
    broken: int = 1,
    seed: int = 0,
    extra: str = "",
    n_groups: tuple[int, int] = (6, 9),
    rows_per_group: tuple[int, int] = (8, 14),
) -> dict[str, Any]:
    """Write a small hive-partitioned demo dataset and its spec under ``root``.

    Returns
    -------
    dict
        ``data`` (folder), ``spec`` (TOML path), ``regions``, ``broken`` (names).
    """
    from service.demo import demo_layout, write_demo_dataset, write_demo_spec

    root.mkdir(parents=True, exist_ok=True)
    data = root / "data"
    spec = root / "spec.toml"
    write_demo_dataset(
        data, n_strata=n_strata, n_groups=n_groups, rows_per_group=rows_per_group,
        seed=seed, broken_strata=broken,
    )
    write_demo_spec(spec, data)
    if extra:
        with open(spec, "a", encoding="utf-8") as fh:
            fh.write(extra)
    layout = demo_layout(n_strata, seed=seed, broken_strata=broken)
    return {"data": data, "spec": spec, "regions": list(layout.regions),
            "broken": list(layout.broken)}


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[Any]:
    """A LocalCluster with 2 single-threaded worker processes, started once per module."""
    import distributed

    from service.cluster import BLAS_ENV

    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
        env=dict(BLAS_ENV), silence_logs=40,
    )
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="module")
def demo_job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The demo dataset + spec (12 strata, 1 broken), one stratum per task."""
    root = tmp_path_factory.mktemp("demo")
    return write_job(root, extra="max_task_seconds = 0.001\n")


def wait_until(predicate: Callable[[], Any], timeout: float = 60.0, every: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        time.sleep(every)


def fits_of(store: Any, job_id: int) -> pd.DataFrame:
    """The job's ``fits`` table."""
    return store.read_table(job_id, "fits")


def direct_fit(spec_path: Path, region: str) -> Any:
    """``fitting.fit`` run directly on one region's pandas rows (the reference)."""
    import fitting
    from service.spec import load_spec

    spec = load_spec(spec_path)
    frame = pd.read_parquet(Path(spec.dataset) / f"region={region}")
    kwargs = spec.fit_kwargs()
    formula = kwargs.pop("formula")
    return fitting.fit(formula, frame, **kwargs)


def stratafit_cmd(*args: str) -> list[str]:
    """Command line running the CLI of this checkout in a subprocess."""
    return [sys.executable, "-m", "service.cli", *args]


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for CLI subprocesses (this checkout importable)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def assert_job_outcome(store: Any, job_id: int, job: dict[str, Any], *, tol: float = 1e-8) -> None:
    """The demo job's stored results: the broken stratum failed and named, every good
    stratum's coefficients equal to ``fitting.fit`` run directly on its rows."""
    record = store.get_job(job_id)
    strata = store.read_table(job_id, "strata").set_index("stratum")
    errors = strata.loc[strata["status"] != "succeeded", ["error_class", "error_message"]]
    assert record.status == "succeeded_with_errors", (record.message, errors.to_dict("records"))
    assert record.n_strata == len(job["regions"])
    assert strata.index.is_unique and len(strata) == len(job["regions"])
    broken = {f"region={b}" for b in job["broken"]}
    assert broken
    for key in broken:
        row = strata.loc[key]
        assert row["status"] == "failed"
        assert row["error_class"] == "DataError"
        assert "doctor" in row["error_message"]  # the culprit: one grouping level
    assert (strata.drop(index=list(broken))["status"] == "succeeded").all()

    coefs = store.read_table(job_id, "coefficients")
    fits = store.read_table(job_id, "fits")
    assert fits["stratum"].is_unique and len(fits) == len(job["regions"]) - len(broken)
    assert not coefs.duplicated(["stratum", "term"]).any()
    for region in job["regions"]:
        key = f"region={region}"
        if key in broken:
            assert key not in set(coefs["stratum"])
            continue
        ref = direct_fit(job["spec"], region)
        got = coefs[coefs["stratum"] == key].set_index("term")
        want = ref.fixed.set_index("term")
        assert list(got.index) == list(want.index)
        for col in ("estimate", "std_error"):
            diff = (got[col] - want[col]).abs().max()
            assert diff <= tol, (key, col, diff)
        fit_row = fits[fits["stratum"] == key].iloc[0]
        assert abs(fit_row["loglik"] - ref.loglik) <= tol
        assert fit_row["nobs"] == ref.nobs

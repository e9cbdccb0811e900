"""Tests of :mod:`service.tasks`: the batched (``fitting.fit_many``) path of ``run_task``."""
from __future__ import annotations

import math

import pytest

import service.tasks as tasks_mod
from service.dataset import open_dataset
from service.planner import plan_strata, plan_tasks
from service.spec import load_spec
from storage.records import table_rows
from tests.service.service_helpers import write_job


def _run_all(tasks, kwargs):
    return {r.key: r for t in tasks for r in tasks_mod.run_task(t, kwargs, True)}


def test_batched_path_matches_per_stratum_fits(tmp_path, monkeypatch):
    fitting = pytest.importorskip("fitting")
    if not hasattr(fitting, "fit_many"):
        pytest.skip("fitting.fit_many not available")
    job = write_job(tmp_path, n_strata=6, broken=1)
    spec = load_spec(job["spec"])
    handle = open_dataset(spec.dataset)
    tasks = plan_tasks(handle, spec, plan_strata(handle, spec), target_rows_per_task=1_500)
    kwargs = spec.fit_kwargs()
    monkeypatch.setattr(tasks_mod, "BATCHED", False)
    single = _run_all(tasks, kwargs)
    monkeypatch.setattr(tasks_mod, "BATCHED", True)
    batched = _run_all(tasks, kwargs)
    assert list(batched) == list(single)
    assert any((r.fit or {}).get("optinfo", {}).get("optimizer") == "batched-newton"
               for r in batched.values())  # the batched path ran (no silent fallback)
    for key, want in single.items():
        got = batched[key]
        assert (got.status, got.error_class) == (want.status, want.error_class), key
        if want.status == "failed":  # per-stratum failure isolation, same error
            assert got.error_message == want.error_message
            continue
        got_coefs, want_coefs = table_rows(got.coefficients), table_rows(want.coefficients)
        assert [c["term"] for c in got_coefs] == [c["term"] for c in want_coefs]
        for g, w in zip(got_coefs, want_coefs):
            assert math.isclose(g["estimate"], w["estimate"], rel_tol=0, abs_tol=1e-5)
            assert math.isclose(g["std_error"], w["std_error"], rel_tol=1e-3)
        assert math.isclose(got.fit["loglik"], want.fit["loglik"], rel_tol=0, abs_tol=1e-6)
        assert len(table_rows(got.ranef)) == len(table_rows(want.ranef)) > 0


def test_batched_falls_back_without_strata_columns(tmp_path):
    job = write_job(tmp_path, n_strata=3, broken=0)
    spec = load_spec(job["spec"])
    handle = open_dataset(spec.dataset)
    (task, *_) = plan_tasks(handle, spec, plan_strata(handle, spec))
    data = tasks_mod._read(task.descriptor)
    assert tasks_mod.fit_batched(data, task.strata, (), spec.fit_kwargs(), True) is None


def test_worker_imports_leave_out_the_database_layer():
    """What a Dask worker imports to run tasks (records, slices, the fitter) does not pull
    in SQLAlchemy or Alembic: they only slow every worker's start."""
    import subprocess
    import sys

    from tests.service.service_helpers import subprocess_env

    code = ("import sys, service.tasks, service.dataset, service.convert, service.planner, "
            "fitting, storage; from storage import StratumResult; "
            "print(sorted(m for m in ('sqlalchemy', 'alembic', 'storage.store') if m in sys.modules)); "
            "storage.Store; print('storage.store' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), capture_output=True,
                         text=True, timeout=120, check=True).stdout.split("\n")
    assert out[0] == "[]"
    assert out[1] == "True"  # storage.Store still works, importing the store on demand


@pytest.mark.parametrize("how", ["warm_up", "preload"])
def test_worker_warm_up_imports_the_numerics(how):
    """``import fitting`` is lazy (PEP 562): warming a worker must import the fitter itself,
    or its first task pays the imports (scipy.special, scipy.optimize, the batched fitter)."""
    import subprocess
    import sys

    call = ("from service.tasks import warm_up; warm_up()" if how == "warm_up" else
            "from service.cluster import PreloadPlugin; PreloadPlugin().setup(None)")
    code = (f"import sys; {call}; "
            "print(all(m in sys.modules for m in ('fitting.batch', 'fitting.api', 'scipy.special')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"

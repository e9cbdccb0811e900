"""End to end on one machine: ``stratafit run`` on a LocalCluster with a SQLite store."""
from __future__ import annotations

import pytest

from service.api import open_store
from service.cli import main
from tests.service.service_helpers import assert_job_outcome, write_job

pytestmark = pytest.mark.slow


def test_run_local_end_to_end(tmp_path, capsys):
    job = write_job(tmp_path / "job", n_strata=12, broken=1)
    url = f"sqlite:///{tmp_path / 'x.db'}"
    argv = ["run", str(job["spec"]), "--store", url, "--workers", "2",
            "--idempotency-key", "e2e-local"]
    assert main(argv) == 1  # succeeded_with_errors: the broken stratum
    captured = capsys.readouterr()
    assert "Dask dashboard:" in captured.err
    assert "strata 12/12 done, 1 failed" in captured.err
    assert "succeeded_with_errors" in captured.out

    store = open_store(url)
    (record,) = store.list_jobs()
    assert record.attempt == 1
    assert_job_outcome(store, record.id, job)
    before = {t: len(store.read_table(record.id, t)) for t in ("fits", "coefficients", "ranef")}

    # the same job again (same idempotency key): nothing new is stored
    assert main(argv + ["--no-progress"]) == 1
    assert [j.id for j in store.list_jobs()] == [record.id]
    after = {t: len(store.read_table(record.id, t)) for t in ("fits", "coefficients", "ranef")}
    assert after == before
    assert_job_outcome(store, record.id, job)

"""End to end on a real multi-process Dask deployment and PostgreSQL.

A ``dask scheduler`` and two ``dask worker --nthreads 1`` processes are started as
subprocesses on loopback (like a Slurm or Kubernetes deployment), and ``stratafit``
talks to them with ``--scheduler``; results go to a fresh PostgreSQL database.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.api import open_store
from service.cli import main
from tests.service.service_helpers import (
    assert_job_outcome,
    subprocess_env,
    wait_until,
    write_job,
)

pytestmark = [pytest.mark.distributed, pytest.mark.postgres, pytest.mark.slow]


def _stop(procs: list[subprocess.Popen]) -> None:
    """Workers first (they close cleanly while the scheduler is up), then the scheduler;
    SIGKILL whatever is still alive after a few seconds."""
    for group in (procs[1:], procs[:1]):
        for p in group:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for p in group:
            try:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


@pytest.fixture
def dask_deployment(tmp_path: Path) -> Iterator[dict]:
    """Scheduler + 2 single-threaded workers as real processes; always killed after."""
    sched_file = tmp_path / "f.json"
    env = subprocess_env(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen] = []

    def spawn(name: str, *args: str) -> None:
        out = open(logs / f"{name}.log", "wb")
        procs.append(subprocess.Popen([sys.executable, "-m", "dask", *args], env=env,
                                      stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path))

    try:
        spawn("scheduler", "scheduler", "--host", "127.0.0.1", "--port", "0",
              "--scheduler-file", str(sched_file), "--no-dashboard")
        wait_until(lambda: sched_file.exists() and sched_file.stat().st_size > 0, timeout=60,
                   every=0.1)
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            spawn(f"worker{i}", "worker", "--nthreads", "1", "--scheduler-file",
                  str(sched_file), "--no-dashboard", "--local-directory", str(tmp_path / f"w{i}"),
                  "--name", f"w{i}")
        import distributed

        with distributed.Client(address, timeout=30) as client:
            client.wait_for_workers(2, timeout=60)
        yield {"address": address, "file": str(sched_file), "procs": procs}
    finally:
        _stop(procs)


def test_run_on_remote_scheduler_with_postgres(tmp_path, dask_deployment, pg_url, capsys):
    job = write_job(tmp_path / "job", n_strata=12, broken=1)
    assert main(["db", "upgrade", "--store", pg_url]) == 0
    argv = ["run", str(job["spec"]), "--store", pg_url,
            "--scheduler", dask_deployment["address"], "--idempotency-key", "e2e-dist"]
    code = main(argv)
    store = open_store(pg_url)
    try:
        (record,) = store.list_jobs()
        assert_job_outcome(store, record.id, job)
        assert code == 1
        n_fits = len(store.read_table(record.id, "fits"))

        # again with the same key: the finished job is returned, nothing duplicated
        assert main(argv + ["--no-progress"]) == 1
        assert len(store.list_jobs()) == 1
        assert len(store.read_table(record.id, "fits")) == n_fits

        # the queue path: submit, then a consumer finds the scheduler through its file
        assert main(["submit", str(job["spec"]), "--store", pg_url,
                     "--idempotency-key", "e2e-dist-2"]) == 0
        assert main(["worker", "--once", "--store", pg_url,
                     "--scheduler", dask_deployment["file"]]) == 1
        second = store.list_jobs()[0]
        assert second.id != record.id
        assert_job_outcome(store, second.id, job)
        assert main(["worker", "--once", "--store", pg_url,
                     "--scheduler", dask_deployment["file"]]) == 0  # queue empty
    finally:
        store.dispose()
    # the deployment survived the jobs (no worker died)
    assert all(p.poll() is None for p in dask_deployment["procs"])

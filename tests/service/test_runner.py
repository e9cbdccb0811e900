"""The runner against a real LocalCluster and a real SQLite store.

Resume after a killed consumer, cancellation, lost workers, bad specs, unreadable
files and empty strata. The cluster (2 worker processes) starts once for the module.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from service.api import default_owner, open_store, submit
from service.cli import main
from service.runner import Runner
from service.runstate import RetryPolicy
from service.tasks import EMPTY_STRATUM, run_task
from storage.records import StratumPlan
from tests.service.service_helpers import (  # noqa: F401  (fixtures)
    demo_job,
    local_cluster,
    stratafit_cmd,
    subprocess_env,
    wait_until,
    write_job,
)

pytestmark = pytest.mark.slow


@pytest.fixture
def client(local_cluster):
    import distributed

    with distributed.Client(local_cluster) as c:
        yield c


def _fitted(store, job_id: int) -> int:
    counts = store.progress(job_id)
    return counts["succeeded"] + counts["not_converged"] + counts["failed"]


def _assert_complete_once(store, job_id: int, n: int) -> None:
    strata = store.read_table(job_id, "strata")
    assert len(strata) == n and strata["stratum"].is_unique
    assert (strata["status"] != "pending").all()
    fits = store.read_table(job_id, "fits")
    assert fits["stratum"].is_unique  # no duplicate fits after retries/resume
    coefs = store.read_table(job_id, "coefficients")
    assert not coefs.duplicated(["stratum", "term"]).any()


# ----------------------------------------------------------------- resume


def _slow_reads(seconds: float) -> None:
    """Make this worker process pause before reading each task's slice (test hook).

    Runs on the workers through ``client.run``. A task then stays on its worker long
    enough to be killed while it runs; otherwise a fast fit may finish between the test
    seeing it in ``processing()`` and the SIGKILL, and the scheduler merely recomputes a
    finished result (no KilledWorker, no retry to observe). Restarted workers come back
    without the pause.
    """
    import service.tasks as tasks

    original = getattr(tasks._read, "__wrapped__", tasks._read)

    def paused(descriptor):
        time.sleep(seconds)
        return original(descriptor)

    paused.__wrapped__ = original
    tasks._read = paused


def _restore_reads() -> None:
    import service.tasks as tasks

    tasks._read = getattr(tasks._read, "__wrapped__", tasks._read)


def test_resume_after_killed_consumer(tmp_path, local_cluster):
    # larger strata so the first consumer is still busy when it is killed
    n = 16
    job = write_job(tmp_path, n_strata=n, broken=1, n_groups=(15, 20),
                    rows_per_group=(12, 20), extra="max_task_seconds = 0.001\n")
    url = f"sqlite:///{tmp_path / 'q.db'}"
    store = open_store(url)
    rec = submit(job["spec"], store=store)
    lease = 2.0
    import distributed

    pauser = distributed.Client(local_cluster)
    pauser.run(_slow_reads, 0.2)  # ~0.8 s for the 16 one-stratum tasks on 4 threads
    proc = subprocess.Popen(
        stratafit_cmd("worker", "--once", "--store", url,
                      "--scheduler", local_cluster.scheduler_address,
                      "--lease-seconds", str(lease), "--write-batch", "1"),
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: store.get_job(rec.id).status == "running", timeout=60)
        wait_until(lambda: _fitted(store, rec.id) >= 2, timeout=60, every=0.01)
        proc.send_signal(signal.SIGKILL)
        t_kill = time.monotonic()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        pauser.run(_restore_reads)
        pauser.close()
    done_before = _fitted(store, rec.id)
    assert 2 <= done_before < n, "the first consumer finished before it was killed"
    killed = store.get_job(rec.id)
    assert killed.status == "running" and killed.attempt == 1

    # the lease must expire before another consumer may claim the job (the last
    # heartbeat was at most lease/3 before the kill, so it holds for a while yet)
    if time.monotonic() - t_kill < lease / 3:
        assert store.claim_job("early", lease_seconds=lease) is None
    time.sleep(max(lease + 0.2 - (time.monotonic() - t_kill), 0))
    code = main(["worker", "--once", "--store", url,
                 "--scheduler", local_cluster.scheduler_address])
    assert code == 1  # succeeded_with_errors: the broken stratum
    final = store.get_job(rec.id)
    assert final.status == "succeeded_with_errors"
    assert final.attempt == 2
    fits = store.read_table(rec.id, "fits")
    assert len(fits) == n - 1  # every stratum but the broken one has a fit
    _assert_complete_once(store, rec.id, n)


def test_sigterm_requeues_and_next_consumer_resumes(tmp_path, local_cluster):
    n = 12
    job = write_job(tmp_path, n_strata=n, broken=0, n_groups=(15, 20),
                    rows_per_group=(12, 20), extra="max_task_seconds = 0.001\n")
    url = f"sqlite:///{tmp_path / 't.db'}"
    store = open_store(url)
    rec = submit(job["spec"], store=store)
    proc = subprocess.Popen(
        stratafit_cmd("worker", "--once", "--store", url,
                      "--scheduler", local_cluster.scheduler_address, "--write-batch", "1"),
        env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: _fitted(store, rec.id) >= 1, timeout=60, every=0.01)
        proc.send_signal(signal.SIGTERM)  # e.g. Kubernetes deleting the pod
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err
    requeued = store.get_job(rec.id)
    if requeued.status == "succeeded":  # finished before the signal arrived
        pytest.skip("the job finished before SIGTERM")
    assert requeued.status == "queued" and requeued.message == "interrupted by user"
    # at once (no lease to wait for), the next consumer resumes it
    assert main(["worker", "--once", "--store", url,
                 "--scheduler", local_cluster.scheduler_address]) == 0
    final = store.get_job(rec.id)
    assert final.status == "succeeded" and final.attempt == 2
    _assert_complete_once(store, rec.id, n)


# ----------------------------------------------------------------- cancel


def test_cancel_running_job_stops_it(tmp_path, client, store_url):
    job = write_job(tmp_path, n_strata=24, broken=0, n_groups=(20, 30),
                    rows_per_group=(15, 25), extra="max_task_seconds = 0.001\n")
    store = open_store(store_url, upgrade=True)
    rec = submit(job["spec"], store=store)
    owner = default_owner()
    claimed = store.claim_job(owner, lease_seconds=5, job_id=rec.id)
    runner = Runner(store, client, owner, lease_seconds=5, heartbeat_every=0.2,
                    write_batch=1, max_in_flight=2)
    out: dict = {}
    thread = threading.Thread(target=lambda: out.setdefault("job", runner.run_job(claimed)))
    thread.start()
    try:
        wait_until(lambda: _fitted(store, rec.id) >= 1, timeout=60, every=0.01)
        store.cancel_job(rec.id)
        t_cancel = time.monotonic()
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert time.monotonic() - t_cancel < 5
    finally:
        thread.join(timeout=60)
    assert out["job"].status == "cancelled"
    n_after = _fitted(store, rec.id)
    assert n_after < 24
    time.sleep(0.5)
    assert _fitted(store, rec.id) == n_after  # nothing written after the cancel
    assert store.get_job(rec.id).status == "cancelled"


# ----------------------------------------------------------------- lost worker


def test_killed_worker_is_retried(demo_job, tmp_path, local_cluster):
    """SIGKILL a worker process mid-task: KilledWorker → retried on another worker."""
    import distributed

    store = open_store(f"sqlite:///{tmp_path / 'r.db'}")
    rec = submit(demo_job["spec"], store=store)
    owner = default_owner()
    claimed = store.claim_job(owner, lease_seconds=30, job_id=rec.id)
    scheduler = local_cluster.scheduler
    allowed = scheduler.allowed_failures
    scheduler.allowed_failures = 0  # the first lost worker raises KilledWorker
    try:
        with distributed.Client(local_cluster) as client:
            client.run(_slow_reads, 1.0)
            runner = Runner(store, client, owner, lease_seconds=30, write_batch=1,
                            max_in_flight=2, retry=RetryPolicy(max_retries=5, base_delay=0.2))
            out: dict = {}
            thread = threading.Thread(
                target=lambda: out.setdefault("job", runner.run_job(claimed))
            )
            thread.start()
            try:
                busy = wait_until(
                    lambda: [w for w, keys in client.processing().items()
                             if any(str(k).startswith("stratafit-fit-") for k in keys)],
                    timeout=60, every=0.01,
                )
                pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                os.kill(pid, signal.SIGKILL)
            finally:
                thread.join(timeout=120)
                client.run(_restore_reads)
    finally:
        scheduler.allowed_failures = allowed
    assert not thread.is_alive()
    job = out["job"]
    assert runner.last_state.retries >= 1  # the lost task went through the retry path
    assert job.status == "succeeded_with_errors", job.message
    assert job.attempt == 1
    _assert_complete_once(store, rec.id, len(demo_job["regions"]))


# ----------------------------------------------------------------- bad input


def test_bad_spec_queues_nothing(tmp_path):
    job = write_job(tmp_path, n_strata=2, broken=0)
    bad = tmp_path / "bad.toml"
    bad.write_text(job["spec"].read_text().replace("remission ~", "remision ~"))
    url = f"sqlite:///{tmp_path / 'b.db'}"
    assert main(["submit", str(bad), "--store", url]) == 2
    assert main(["run", str(bad), "--store", url, "--workers", "1"]) == 2
    assert open_store(url).list_jobs() == []


def test_bad_spec_message_names_the_column(tmp_path, capsys):
    job = write_job(tmp_path, n_strata=2, broken=0)
    bad = tmp_path / "bad.toml"
    bad.write_text(job["spec"].read_text().replace("family = \"binomial\"", "family = \"binomal\""))
    assert main(["submit", str(bad), "--store", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert "binomal" in err and "binomial" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def _corrupt(path: Path) -> None:
    path.write_bytes(b"PAR1 this is not parquet at all" * 10)


def test_unreadable_parquet_file_is_rejected_at_submit(tmp_path):
    job = write_job(tmp_path, n_strata=3, broken=0)
    victim = next((job["data"] / f"region={job['regions'][1]}").glob("*.parquet"))
    _corrupt(victim)
    url = f"sqlite:///{tmp_path / 'u.db'}"
    assert main(["submit", str(job["spec"]), "--store", url]) == 2
    assert open_store(url).list_jobs() == []


def test_unreadable_parquet_file_fails_queued_job(tmp_path, local_cluster):
    job = write_job(tmp_path, n_strata=3, broken=0)
    url = f"sqlite:///{tmp_path / 'u.db'}"
    rec = submit(job["spec"], store=url)
    victim = next((job["data"] / f"region={job['regions'][1]}").glob("*.parquet"))
    _corrupt(victim)  # broken after submission, before a consumer runs it
    code = main(["worker", "--once", "--store", url, "--scheduler",
                 local_cluster.scheduler_address])
    assert code == 3
    final = open_store(url).get_job(rec.id)
    assert final.status == "failed"
    assert victim.name in final.message and job["regions"][1] in final.message


# ----------------------------------------------------------------- empty strata


def _tasks(spec_path: Path):
    from service.dataset import open_dataset
    from service.planner import plan_strata, plan_tasks
    from service.spec import load_spec

    spec = load_spec(spec_path)
    handle = open_dataset(spec.dataset)
    plans = plan_strata(handle, spec)
    return spec, plan_tasks(handle, spec, plans, max_strata_per_task=100,
                            target_rows_per_task=10**9)


def test_empty_stratum_fails_alone(demo_job):
    spec, tasks = _tasks(demo_job["spec"])
    assert len(tasks) == 1
    (task,) = tasks
    ghost = StratumPlan(key="region=r999", values={"region": "r999"}, nrows=40)
    task = dataclasses.replace(task, strata=(*task.strata, ghost))
    results = run_task(task, spec.fit_kwargs(), False)
    by_key = {r.key: r for r in results}
    assert [r.key for r in results] == [s.key for s in task.strata]
    assert by_key["region=r999"].status == "failed"
    assert by_key["region=r999"].error_class == EMPTY_STRATUM
    assert "empty stratum" in by_key["region=r999"].error_message
    broken = {f"region={b}" for b in demo_job["broken"]}
    for key, r in by_key.items():
        if key not in broken | {"region=r999"}:
            assert r.status in ("succeeded", "not_converged"), (key, r.error_message)
            assert r.ranef == []  # store_random_effects=False


def test_stratum_with_no_usable_rows_fails_alone(tmp_path):
    """All responses NaN in one stratum: rows exist, but none survive NaN omission."""
    job = write_job(tmp_path, n_strata=3, broken=0)
    victim = job["regions"][0]
    path = next((job["data"] / f"region={victim}").glob("*.parquet"))
    frame = pd.read_parquet(path)
    frame["remission"] = pd.array([None] * len(frame), dtype="Int64")
    frame.to_parquet(path, index=False)
    spec, tasks = _tasks(job["spec"])
    results = {r.key: r for t in tasks for r in run_task(t, spec.fit_kwargs(), True)}
    assert results[f"region={victim}"].status == "failed"
    assert results[f"region={victim}"].error_class not in (None, "AttributeError", "TypeError")
    others = [r for k, r in results.items() if k != f"region={victim}"]
    assert others and all(r.status in ("succeeded", "not_converged") for r in others)
    assert all(r.ranef for r in others)


# ----------------------------------------------------------------- planning


def test_plan_uses_the_validated_dataset_without_rereading_footers(tmp_path):
    import re

    from service.spec import SpecError, load_spec, validate_spec

    job = write_job(tmp_path, n_strata=4, broken=0)
    store = open_store(f"sqlite:///{tmp_path / 'p.db'}")
    rec = submit(job["spec"], store=store)
    claimed = store.claim_job("planner-test", job_id=rec.id)
    spec = load_spec(job["spec"])
    report = validate_spec(spec)
    assert report.dataset.footers is not None and len(report.dataset.footers.rows) == 4
    # a file broken after the validation: planning on the kept footers does not read it
    victim = next((job["data"] / f"region={job['regions'][0]}").glob("*.parquet"))
    victim.write_bytes(b"garbage bytes, not a parquet footer" * 10)
    runner = Runner(store, None, "planner-test")
    _, handle, plans, tasks, _ = runner._plan(claimed, spec, report.dataset)
    assert handle is report.dataset
    assert [p.key for p in plans] == [f"region={r}" for r in sorted(job["regions"])]
    assert sorted(s.key for t in tasks for s in t.strata) == [p.key for p in plans]
    # a job from the queue (no validated spec): validated again, the broken file named
    with pytest.raises(SpecError, match=re.escape(str(victim))):
        runner._plan(claimed)
    store.dispose()

"""The job queue: submit, idempotency, claims, leases, fencing, finish, requeue, cancel."""
from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from datetime import timezone

import pytest

from storage import (
    InvalidTransition,
    JobNotFound,
    StaleAttemptError,
    Store,
    StratumPlan,
    StratumResult,
)
from storage.errors import InvalidRecordError


# fork is fast; the parent holds no open connections when it forks (stores are disposed).
MP_START = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"


def _submit(store: Store, n: int = 1, **kw) -> list:
    return [store.submit_job(name=f"job{i}", spec={"i": i}, spec_hash=f"h{i}", **kw)[0]
            for i in range(n)]


def _ok(key: str) -> StratumResult:
    return StratumResult(key, "succeeded", fit={"nobs": 10, "converged": True})


# ---------------------------------------------------------------- submit
def test_submit_and_get(store):
    job, created = store.submit_job(
        name="nightly", spec={"formula": "y ~ x + (1 | g)", "by": ["region"]}, spec_hash="abc"
    )
    assert created
    assert job.status == "queued" and job.attempt == 0 and job.lease_owner is None
    assert job.created_at.tzinfo is not None
    assert job.created_at.utcoffset().total_seconds() == 0
    again = store.get_job(job.id)
    assert again == job
    assert again.spec == {"formula": "y ~ x + (1 | g)", "by": ["region"]}


def test_get_missing_job(store):
    with pytest.raises(JobNotFound) as info:
        store.get_job(12345)
    assert info.value.job_id == 12345
    for call in (lambda: store.progress(12345), lambda: store.pending_strata(12345),
                 lambda: store.read_table(12345, "fits")):
        with pytest.raises(JobNotFound):
            call()


def test_idempotency_key_returns_existing_job(store):
    first, created1 = store.submit_job(name="a", spec={}, spec_hash="h", idempotency_key="k1")
    second, created2 = store.submit_job(name="b", spec={}, spec_hash="h", idempotency_key="k1")
    third, created3 = store.submit_job(name="c", spec={}, spec_hash="h")
    fourth, created4 = store.submit_job(name="d", spec={}, spec_hash="h")
    assert (created1, created2, created3, created4) == (True, False, True, True)
    assert second.id == first.id and second.name == "a"
    assert len({first.id, third.id, fourth.id}) == 3  # NULL keys never collide


def test_spec_must_be_json(store):
    with pytest.raises(InvalidRecordError):
        store.submit_job(name="a", spec={"x": object()}, spec_hash="h")


@pytest.mark.postgres
def test_idempotency_race_on_postgres(pg_url):
    with Store(pg_url) as setup:
        setup.upgrade()
    n_threads = 6
    stores = [Store(pg_url) for _ in range(n_threads)]
    for round_ in range(5):
        barrier = threading.Barrier(n_threads)
        out: list = [None] * n_threads

        def submit(i: int) -> None:
            barrier.wait()
            out[i] = stores[i].submit_job(
                name=f"t{i}", spec={}, spec_hash="h", idempotency_key=f"race-{round_}"
            )

        threads = [threading.Thread(target=submit, args=(i,)) for i in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sum(created for _, created in out) == 1
        assert len({job.id for job, _ in out}) == 1
    assert len(stores[0].list_jobs()) == 5
    for s in stores:
        s.dispose()


# ---------------------------------------------------------------- claims
def test_claim_oldest_first_and_none_when_empty(store):
    assert store.claim_job("w") is None
    jobs = _submit(store, 3)
    claimed = [store.claim_job("w") for _ in range(3)]
    assert [c.id for c in claimed] == [j.id for j in jobs]
    c = claimed[0]
    assert c.status == "running" and c.attempt == 1 and c.lease_owner == "w"
    assert c.started_at is not None and c.lease_expires_at > c.started_at
    assert store.claim_job("w") is None  # leases still valid


def test_claim_specific_job(store):
    a, b = _submit(store, 2)
    got = store.claim_job("w", job_id=b.id)
    assert got.id == b.id
    assert store.claim_job("w", job_id=b.id) is None  # running, lease valid
    assert store.claim_job("w").id == a.id


def _claim_all(store: Store, owner: str, barrier: threading.Barrier, out: list) -> None:
    barrier.wait()
    while (job := store.claim_job(owner, lease_seconds=60)) is not None:
        out.append(job.id)


def test_claims_are_exclusive_across_threads(store_url):
    setup = Store(store_url)
    setup.upgrade()
    ids = [j.id for j in _submit(setup, 5)]
    n_threads = 6
    stores = [Store(store_url) for _ in range(n_threads)]  # separate engines/connections
    barrier = threading.Barrier(n_threads)
    outs: list[list[int]] = [[] for _ in range(n_threads)]
    threads = [
        threading.Thread(target=_claim_all, args=(stores[i], f"w{i}", barrier, outs[i]))
        for i in range(n_threads)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claimed = Counter(i for out in outs for i in out)
    assert sorted(claimed) == sorted(ids)
    assert set(claimed.values()) == {1}
    assert all(setup.get_job(i).attempt == 1 for i in ids)
    for s in [setup, *stores]:
        s.dispose()


def _claim_in_process(url: str, owner: str, barrier, results) -> None:
    store = Store(url)
    barrier.wait()
    got = []
    while (job := store.claim_job(owner)) is not None:
        got.append(job.id)
    store.dispose()
    results.put(got)


@pytest.mark.slow
def test_claims_are_exclusive_across_processes(store_url):
    setup = Store(store_url)
    setup.upgrade()
    ids = [j.id for j in _submit(setup, 5)]
    setup.dispose()
    ctx = multiprocessing.get_context(MP_START)
    n = 3
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_claim_in_process, args=(store_url, f"p{i}", barrier, results))
             for i in range(n)]
    for proc in procs:
        proc.start()
    outs = [results.get(timeout=60) for _ in range(n)]
    for proc in procs:
        proc.join(timeout=10)
        assert proc.exitcode == 0
    claimed = Counter(i for out in outs for i in out)
    assert sorted(claimed) == sorted(ids) and set(claimed.values()) == {1}


# ---------------------------------------------------------------- leases and fencing
def test_heartbeat_extends_lease(store):
    (job,) = _submit(store)
    c = store.claim_job("w", lease_seconds=0.3)
    assert store.heartbeat(c.id, "w", c.attempt, lease_seconds=30)
    time.sleep(0.4)
    assert store.claim_job("x") is None  # lease was extended
    after = store.get_job(job.id)
    assert after.lease_expires_at > c.lease_expires_at
    assert after.heartbeat_at > c.heartbeat_at
    assert not store.heartbeat(c.id, "someone-else", c.attempt)
    assert not store.heartbeat(c.id, "w", c.attempt + 1)


def test_lease_expiry_resume_and_fencing(store):
    (job,) = _submit(store)
    old = store.claim_job("old", lease_seconds=0.5)
    store.register_strata(old.id, old.attempt, [StratumPlan("a", {"k": "a"}, 3)])
    time.sleep(0.7)  # no heartbeat
    new = store.claim_job("new", lease_seconds=60)
    assert new.id == job.id and new.attempt == old.attempt + 1 and new.lease_owner == "new"
    assert new.started_at == old.started_at  # resumed, not restarted
    # The old owner is fenced off everywhere.
    assert not store.heartbeat(old.id, "old", old.attempt)
    with pytest.raises(StaleAttemptError) as info:
        store.record_results(old.id, old.attempt, [_ok("a")])
    assert (info.value.attempt, info.value.current_attempt) == (old.attempt, new.attempt)
    for call in (
        lambda: store.register_strata(old.id, old.attempt, [StratumPlan("b", {}, 1)]),
        lambda: store.mark_strata_error(old.id, old.attempt, ["a"], "E", "m"),
        lambda: store.finish_job(old.id, old.attempt),
        lambda: store.requeue_job(old.id, old.attempt, "x"),
    ):
        with pytest.raises(StaleAttemptError):
            call()
    assert store.progress(job.id)["pending"] == 1  # nothing leaked through
    assert store.record_results(new.id, new.attempt, [_ok("a")]) == 1
    assert store.finish_job(new.id, new.attempt).status == "succeeded"


# ---------------------------------------------------------------- finish, requeue, cancel
@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["succeeded", "succeeded"], "succeeded"),
        (["succeeded", "failed"], "succeeded_with_errors"),
        (["not_converged", "succeeded"], "succeeded_with_errors"),
        (["failed", "failed"], "failed"),
        ([], "failed"),
    ],
)
def test_finish_job_computes_status(store, statuses, expected):
    _submit(store)
    job = store.claim_job("w")
    keys = [f"s{i}" for i in range(len(statuses))]
    store.register_strata(job.id, job.attempt, [StratumPlan(k, {}, 1) for k in keys])
    results = [
        StratumResult(k, s, fit=None if s == "failed" else {"nobs": 1},
                      error_class="DataError" if s == "failed" else None)
        for k, s in zip(keys, statuses)
    ]
    store.record_results(job.id, job.attempt, results)
    done = store.finish_job(job.id, job.attempt)
    assert done.status == expected
    assert done.finished_at is not None and done.lease_owner is None
    assert done.lease_expires_at is None
    if not statuses:
        assert done.message == "no strata to fit"
    with pytest.raises(StaleAttemptError):
        store.finish_job(job.id, job.attempt)


def test_finish_job_explicit_status_and_unfitted_strata(store):
    _submit(store)
    job = store.claim_job("w")
    store.register_strata(job.id, job.attempt, [StratumPlan(k, {}, 1) for k in "abc"])
    store.record_results(job.id, job.attempt, [_ok("a")])
    store.mark_strata_error(job.id, job.attempt, ["b"], "KilledWorker", "worker died")
    with pytest.raises(InvalidTransition):
        store.finish_job(job.id, job.attempt, status="cancelled")
    done = store.finish_job(job.id, job.attempt, status="failed", message="data vanished")
    assert (done.status, done.message) == ("failed", "data vanished")
    strata = store.read_table(job.id, "strata").set_index("stratum")
    assert list(strata["status"]) == ["succeeded", "failed", "failed"]
    assert strata.loc["b", "error_class"] == "KilledWorker"
    assert strata.loc["c", "error_class"] == "NotFitted"
    assert store.progress(job.id)["pending"] == 0


def test_requeue_keeps_ledger(store):
    _submit(store)
    job = store.claim_job("w")
    store.register_strata(job.id, job.attempt, [StratumPlan(k, {}, 1) for k in "ab"])
    store.record_results(job.id, job.attempt, [_ok("a")])
    back = store.requeue_job(job.id, job.attempt, "scheduler lost")
    assert back.status == "queued" and back.lease_owner is None
    assert back.message == "scheduler lost"
    again = store.claim_job("w2")
    assert again.attempt == job.attempt + 1
    assert [p.key for p in store.pending_strata(job.id)] == ["b"]


def test_cancel(store):
    queued, running, done = _submit(store, 3)
    store.claim_job("w", job_id=running.id)
    d = store.claim_job("w", job_id=done.id)
    store.finish_job(d.id, d.attempt, status="succeeded")
    c1 = store.cancel_job(queued.id)
    assert c1.status == "cancelled" and c1.finished_at is not None
    c2 = store.cancel_job(running.id, message="operator")
    assert (c2.status, c2.message, c2.lease_owner) == ("cancelled", "operator", None)
    # The running owner notices: heartbeat fails, writes are fenced off.
    assert not store.heartbeat(running.id, "w", 1)
    with pytest.raises(StaleAttemptError):
        store.record_results(running.id, 1, [])
    for job_id in (done.id, queued.id):
        with pytest.raises(InvalidTransition):
            store.cancel_job(job_id)
    with pytest.raises(JobNotFound):
        store.cancel_job(999)
    assert store.claim_job("w") is None  # cancelled jobs are never claimed


def test_list_jobs(store):
    jobs = _submit(store, 4)
    store.claim_job("w")
    assert [j.id for j in store.list_jobs()] == [j.id for j in reversed(jobs)]
    assert [j.id for j in store.list_jobs(limit=2)] == [jobs[3].id, jobs[2].id]
    assert [j.id for j in store.list_jobs(status="running")] == [jobs[0].id]
    with pytest.raises(ValueError, match="valid: queued"):
        store.list_jobs(status="done")


def test_timestamps_are_aware_utc(store):
    _submit(store)
    job = store.claim_job("w")
    for ts in (job.created_at, job.started_at, job.lease_expires_at, job.heartbeat_at):
        assert ts.tzinfo is not None and ts.utcoffset().total_seconds() == 0
        assert ts.astimezone(timezone.utc) == ts

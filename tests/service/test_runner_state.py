"""The runner's pure decision logic (:mod:`service.runstate`): no Dask, no database."""
from __future__ import annotations

import pytest

from service.runstate import (
    INFRA,
    LEASE_LOST,
    REQUEUE,
    TASK,
    AttemptState,
    CancelAll,
    Finish,
    Flush,
    MarkError,
    Progress,
    RetryPolicy,
    Submit,
    classify_task_error,
    format_eta,
    is_transient_storage_error,
)
from storage.errors import JobNotFound, StaleAttemptError, StorageError
from storage.records import StratumResult


def ok(key: str) -> StratumResult:
    return StratumResult(key=key, status="succeeded", fit={"nobs": 1})


def bad(key: str) -> StratumResult:
    return StratumResult(key=key, status="failed", error_class="DataError", error_message="x")


def kinds(instructions):
    return [type(i).__name__ for i in instructions]


def make(n_tasks=3, per_task=2, **kw):
    tasks = {f"t{i}": [f"s{i}{j}" for j in range(per_task)] for i in range(n_tasks)}
    kw.setdefault("total", n_tasks * per_task)
    return AttemptState(tasks, **kw)


# ------------------------------------------------------------------ classification


class KilledWorker(Exception):
    """Same name as distributed's: classification goes by class name."""


class CommClosedError(OSError):
    pass


@pytest.mark.parametrize(
    "exc, kind",
    [
        (KilledWorker("w"), INFRA),
        (CommClosedError("c"), INFRA),
        (ConnectionResetError("r"), INFRA),
        (FileNotFoundError("f"), INFRA),
        (TimeoutError("t"), INFRA),
        (ValueError("corrupt"), TASK),
        (KeyError("k"), TASK),
        (ZeroDivisionError(), TASK),
    ],
)
def test_classify_task_error(exc, kind):
    assert classify_task_error(exc) == kind
    assert classify_task_error(type(exc)) == kind


def test_real_distributed_errors_are_infra():
    from distributed import KilledWorker as RealKilled
    from distributed.comm.core import CommClosedError as RealComm

    assert classify_task_error(RealKilled("k", "w", 3)) == INFRA
    assert classify_task_error(RealComm("closed")) == INFRA


class OperationalError(Exception):
    pass


def test_transient_storage_errors():
    wrapped = StorageError("record_results failed")
    wrapped.__cause__ = OperationalError("connection refused")
    assert is_transient_storage_error(wrapped)
    assert is_transient_storage_error(ConnectionRefusedError())
    assert not is_transient_storage_error(StorageError("integrity"))
    assert not is_transient_storage_error(StaleAttemptError(1, 1, 2, "running"))
    assert not is_transient_storage_error(JobNotFound(3))
    assert not is_transient_storage_error(ValueError("bug"))


def test_retry_policy_backoff():
    p = RetryPolicy(max_retries=3, base_delay=0.5, max_delay=1.5)
    assert [p.delay(i) for i in (1, 2, 3, 4)] == [0.5, 1.0, 1.5, 1.5]
    assert p.delay(0) == 0.0
    assert p.allows(3) and not p.allows(4)


# ------------------------------------------------------------------ the happy path


def test_start_submits_every_task_within_window():
    st = make(n_tasks=5, max_in_flight=2)
    out = st.start(now=0.0)
    assert out == [Submit("t0", 0), Submit("t1", 0)]
    out = st.on_results("t0", [ok("s00"), ok("s01")], now=0.1)
    assert Submit("t2", 0) in out  # a slot freed
    assert not st.finished


def test_results_flush_by_batch_size_and_interval():
    st = make(n_tasks=3, per_task=2, write_batch=3, flush_interval=1.0)
    st.start(0.0)
    assert kinds(st.on_results("t0", [ok("s00"), ok("s01")], 0.1)) == []
    out = st.on_results("t1", [ok("s10"), bad("s11")], 0.2)
    flushes = [i for i in out if isinstance(i, Flush)]
    assert len(flushes) == 1 and len(flushes[0].results) == 4
    st.on_results("t2", [ok("s20")], 0.3)
    assert st.on_tick(0.5) == []  # interval not yet elapsed since the flush at 0.2
    out = st.on_tick(1.3)
    assert [len(i.results) for i in out if isinstance(i, Flush)] == [1]
    assert st.finished
    assert st.drain(1.4) == []
    assert st.outcome() == Finish(None, None)


def test_drain_forces_last_flush_and_progress_counts():
    st = make(n_tasks=1, per_task=3, total=10, already_done=7, already_failed=1,
               write_batch=100, flush_interval=100.0)
    st.start(0.0)
    st.on_results("t0", [ok("s00"), bad("s01"), ok("s02")], 2.0)
    assert st.finished
    (flush,) = st.drain(2.0)
    assert len(flush.results) == 3
    p = st.progress(2.0)
    assert (p.done, p.failed, p.total) == (10, 2, 10)
    assert p.rate == pytest.approx(1.5)
    assert p.eta == 0.0


def test_duplicate_or_unknown_completion_is_ignored():
    st = make(n_tasks=1)
    st.start(0.0)
    st.on_results("t0", [ok("s00"), ok("s01")], 0.1)
    assert st.on_results("t0", [ok("s00")], 0.2) == []
    assert st.on_error("t0", "KilledWorker", "x", INFRA, 0.2) == []
    assert st.done == 2


# ------------------------------------------------------------------ errors


def test_infra_error_retried_with_backoff_then_marked():
    policy = RetryPolicy(max_retries=2, base_delay=1.0, max_delay=10.0)
    st = make(n_tasks=1, per_task=2, policy=policy)
    assert st.start(0.0) == [Submit("t0", 0)]
    assert st.on_error("t0", "KilledWorker", "worker died", INFRA, 0.0) == []
    assert st.next_wakeup(0.0) == pytest.approx(1.0)
    assert st.on_tick(0.5) == []  # backoff not elapsed
    assert st.on_tick(1.0) == [Submit("t0", 1)]
    assert st.on_error("t0", "KilledWorker", "worker died", INFRA, 1.0) == []
    assert st.on_tick(2.9) == []
    assert st.on_tick(3.0) == [Submit("t0", 2)]  # second delay: 2 s
    out = st.on_error("t0", "KilledWorker", "worker died", INFRA, 3.0)
    assert len(out) == 1 and isinstance(out[0], MarkError)
    assert out[0].keys == ("s00", "s01")
    assert "after 3 tries" in out[0].message and "worker died" in out[0].message
    assert st.finished
    assert st.progress(3.0).failed == 2


def test_infra_exhausted_requeues_until_last_attempt():
    st = make(n_tasks=2, policy=RetryPolicy(max_retries=0))
    st.start(0.0)
    st.on_results("t0", [ok("s00"), ok("s01")], 0.1)
    st.on_error("t1", "CommClosedError", "closed", INFRA, 0.2)
    assert st.finished
    first = st.outcome(attempt=1, max_attempts=3)
    assert first.status == REQUEUE and "s10, s11" in first.message
    last = st.outcome(attempt=3, max_attempts=3)
    assert last.status == "failed"
    assert "2 strata not fitted" in last.message and "CommClosedError" in last.message


def test_task_error_fails_its_strata_without_retry():
    st = make(n_tasks=2, write_batch=1)
    st.start(0.0)
    out = st.on_error("t1", "DatasetError", "file /d/x.parquet is corrupt", TASK, 0.1)
    (flush,) = [i for i in out if isinstance(i, Flush)]
    assert [r.key for r in flush.results] == ["s10", "s11"]
    assert all(r.status == "failed" and r.error_class == "DatasetError" for r in flush.results)
    assert "x.parquet" in flush.results[0].error_message
    st.on_results("t0", [ok("s00"), ok("s01")], 0.2)
    assert st.finished
    assert st.outcome(1, 3) == Finish(None, None)  # the store decides (with errors)


def test_retries_go_first_through_a_full_window():
    st = make(n_tasks=4, max_in_flight=1, policy=RetryPolicy(base_delay=0.1))
    assert st.start(0.0) == [Submit("t0", 0)]
    assert st.on_error("t0", "KilledWorker", "x", INFRA, 0.0) == [Submit("t1", 0)]
    out = st.on_results("t1", [ok("s10"), ok("s11")], 0.5)  # t0's retry is due by now
    assert out == [Submit("t0", 1)]  # before t2, which was queued earlier


# ------------------------------------------------------------------ lease


def test_lease_lost_cancels_and_drops_buffer():
    st = make(n_tasks=3, write_batch=100)
    st.start(0.0)
    st.on_results("t0", [ok("s00"), ok("s01")], 0.1)
    out = st.on_lease_lost("job cancelled")
    assert out == [CancelAll("job cancelled"), Finish(LEASE_LOST, "job cancelled")]
    assert st.finished and st.buffer == []
    assert st.drain(1.0) == []
    assert st.on_results("t1", [ok("s10")], 0.2) == []
    assert st.on_tick(5.0) == []
    assert st.outcome(1, 3) == Finish(LEASE_LOST, "job cancelled")
    assert st.on_lease_lost("again") == []


def test_no_tasks_is_finished_at_once():
    st = AttemptState({}, total=0)
    assert st.start(0.0) == [] and st.finished
    assert st.outcome() == Finish(None, None)


def test_invalid_parameters():
    with pytest.raises(ValueError):
        AttemptState({}, total=0, write_batch=0)


def test_format_eta_and_progress():
    assert format_eta(None) == "ETA ?"
    assert format_eta(2.2) == "ETA 2s"
    assert format_eta(185) == "ETA 3m05s"
    assert format_eta(7300) == "ETA 2h01m"
    assert Progress(5, 0, 10, 0.0).eta is None
    assert Progress(5, 0, 10, 2.5).eta == 2.0

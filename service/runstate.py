"""Pure decision logic of one job attempt: events in, instructions out.

:class:`AttemptState` knows nothing about Dask, SQL, threads or clocks: the I/O shell in
:mod:`service.runner` feeds it events (a task finished, a task raised, time passed, the
lease was lost, a write went through) with the current time, and carries out the
instructions it returns (submit a task, write a batch, mark strata in error, cancel,
finish). Every decision — which errors are retried, the backoff, when to flush, how
the attempt ends — is therefore testable without a cluster or a database.

Instructions
------------
``Submit(task_id, retry)``
    send the task to the cluster (``retry`` counts earlier failed tries).
``Flush(results)``
    write these :class:`~storage.records.StratumResult` with ``record_results``.
``MarkError(task_id, keys, error_class, message)``
    record an infrastructure error on the strata (they stay pending for a later attempt).
``CancelAll(reason)``
    cancel every future still running and submit nothing more.
``Finish(status, message)``
    the attempt is over: call ``finish_job`` (``status=None`` lets the store compute
    it), or ``requeue_job`` for :data:`REQUEUE`; with :data:`LEASE_LOST` the job is
    not touched.

Errors of a task
----------------
Infrastructure errors (:func:`classify_task_error`) are retried with exponential backoff
(:class:`RetryPolicy`); when retries run out the strata get a ``MarkError`` and stay
pending, and the attempt ends with a requeue (or ``failed`` on the last attempt). Any
other error of a whole task (a corrupt file, a bug) is deterministic: its strata are
stored as ``failed`` results naming the error, like a stratum whose fit failed.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "RetryPolicy",
    "AttemptState",
    "Submit",
    "Flush",
    "MarkError",
    "CancelAll",
    "Finish",
    "Progress",
    "format_eta",
    "classify_task_error",
    "is_transient_storage_error",
    "INFRA",
    "TASK",
    "LEASE_LOST",
    "REQUEUE",
]

INFRA = "infra"
TASK = "task"
#: ``Finish.status`` meaning "the lease is gone (cancelled or fenced): leave the job alone".
LEASE_LOST = "lease_lost"
#: ``Finish.status`` meaning "put the job back in the queue for another attempt".
REQUEUE = "requeue"

#: Exception class names (anywhere in the MRO) that mean the cluster, not the task, failed.
_INFRA_NAMES = frozenset(
    {
        "KilledWorker",
        "CommClosedError",
        "StreamClosedError",
        "FutureCancelledError",
        "CancelledError",
        "WorkerGone",
        "OSError",
        "TimeoutError",
    }
)

#: Storage exception class names (MRO) worth retrying: connection-level trouble.
_TRANSIENT_DB_NAMES = frozenset(
    {
        "OperationalError",
        "InterfaceError",
        "DisconnectionError",
        "TimeoutError",
        "OSError",
        "StorageUnavailable",
    }
)


def _mro_names(exc: BaseException | type) -> set[str]:
    cls = exc if isinstance(exc, type) else type(exc)
    return {c.__name__ for c in cls.__mro__}


def classify_task_error(exc: BaseException | type) -> str:
    """``"infra"`` for a lost worker, closed comm or I/O error, else ``"task"``.

    Infrastructure errors are worth retrying (another worker, the file share back);
    task errors (a bug, a corrupt file) fail the same way again.

    Parameters
    ----------
    exc : BaseException or type
        The exception a future raised (or its class).

    Returns
    -------
    str
        :data:`INFRA` or :data:`TASK`.
    """
    return INFRA if _mro_names(exc) & _INFRA_NAMES else TASK


def is_transient_storage_error(exc: BaseException) -> bool:
    """Whether a storage call failed for a reason a retry may fix (connection lost).

    Fencing (``StaleAttemptError``), missing jobs and contract violations are never
    transient; a plain ``StorageError`` is transient when it wraps a connection-level
    driver error (``OperationalError``, ``InterfaceError``, ``OSError``, ...).
    """
    names = _mro_names(exc)
    if names & {"StaleAttemptError", "JobNotFound", "InvalidTransition", "InvalidRecordError"}:
        return False
    if names & _TRANSIENT_DB_NAMES:
        return True
    cause = exc.__cause__ or exc.__context__
    depth = 0
    while cause is not None and depth < 5:  # storage wraps driver errors in StorageError
        if _mro_names(cause) & _TRANSIENT_DB_NAMES:
            return True
        cause = cause.__cause__ or cause.__context__
        depth += 1
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base * 2**(retry-1)`` seconds, capped, ``max_retries`` tries.

    Parameters
    ----------
    max_retries : int, default 3
        Retries after the first failure (so ``max_retries + 1`` tries in all).
    base_delay : float, default 0.5
        Delay before the first retry, in seconds.
    max_delay : float, default 30
        Cap of any delay.
    """

    max_retries: int = 3
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        if retry < 1:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** (retry - 1))

    def allows(self, retry: int) -> bool:
        """Whether retry number ``retry`` (1-based) may still be made."""
        return retry <= self.max_retries


@dataclass(frozen=True)
class Submit:
    task_id: str
    retry: int = 0


@dataclass(frozen=True)
class Flush:
    results: tuple


@dataclass(frozen=True)
class MarkError:
    task_id: str
    keys: tuple[str, ...]
    error_class: str
    message: str


@dataclass(frozen=True)
class CancelAll:
    reason: str


@dataclass(frozen=True)
class Finish:
    status: str | None
    message: str | None


@dataclass(frozen=True)
class Progress:
    """Snapshot for the progress callback: strata done (any outcome), failed, total, rate/s."""

    done: int
    failed: int
    total: int
    rate: float

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate, ``None`` when unknown."""
        left = self.total - self.done
        if left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None


@dataclass
class _Errors:
    """Strata given up on in this attempt, by error class (for the final message)."""

    keys: list[str] = field(default_factory=list)
    first: str | None = None


class AttemptState:
    """Bookkeeping of one attempt of one job (pure; see module docstring).

    Parameters
    ----------
    tasks : mapping
        ``task_id`` → stratum keys of that task, for the strata pending in this attempt.
    total : int
        Strata in the whole job (for progress).
    already_done : int, default 0
        Strata finished by earlier attempts.
    already_failed : int, default 0
        Of those, how many failed.
    policy : RetryPolicy, optional
        Retry policy for infrastructure errors.
    write_batch : int, default 200
        Flush when this many results are buffered.
    flush_interval : float, default 1.0
        Flush buffered results at least this often (seconds).
    max_in_flight : int, default 1000
        Tasks submitted and not finished at any time.
    now : float, default 0
        Start time (any monotonic clock).
    """

    def __init__(
        self,
        tasks: Mapping[str, Sequence[str]],
        *,
        total: int,
        already_done: int = 0,
        already_failed: int = 0,
        policy: RetryPolicy | None = None,
        write_batch: int = 200,
        flush_interval: float = 1.0,
        max_in_flight: int = 1000,
        now: float = 0.0,
    ):
        if write_batch < 1 or max_in_flight < 1:
            raise ValueError("write_batch and max_in_flight must be >= 1")
        self.tasks = {t: tuple(keys) for t, keys in tasks.items()}
        self.total = int(total)
        self.policy = policy or RetryPolicy()
        self.write_batch = int(write_batch)
        self.flush_interval = float(flush_interval)
        self.max_in_flight = int(max_in_flight)
        self.started = now
        self.last_flush = now
        self._queue: deque[tuple[str, int]] = deque((t, 0) for t in self.tasks)
        self._delayed: list[tuple[float, str, int]] = []
        self.in_flight: dict[str, int] = {}
        self.buffer: list[Any] = []
        self.done_before = int(already_done)
        self.failed_before = int(already_failed)
        self.done = 0
        self.failed = 0
        self.written = 0
        self.errors: dict[str, _Errors] = {}
        self.stopped: str | None = None
        self.retries = 0  # infrastructure retries scheduled (for logs and tests)

    # ------------------------------------------------------------------ queries
    @property
    def finished(self) -> bool:
        """No task queued, waiting for a retry or running (or the attempt stopped)."""
        if self.stopped is not None:
            return True
        return not self._queue and not self._delayed and not self.in_flight

    @property
    def error_keys(self) -> list[str]:
        """Strata given up on in this attempt (marked ``error``)."""
        return [k for e in self.errors.values() for k in e.keys]

    def progress(self, now: float) -> Progress:
        """Current :class:`Progress` (rate over this attempt)."""
        elapsed = max(now - self.started, 1e-9)
        return Progress(
            done=self.done_before + self.done,
            failed=self.failed_before + self.failed,
            total=self.total,
            rate=self.done / elapsed if self.done else 0.0,
        )

    def next_wakeup(self, now: float) -> float:
        """Seconds until something is due (a retry or a timed flush); at most the interval."""
        due = [self.flush_interval]
        if self.buffer:
            due.append(self.last_flush + self.flush_interval - now)
        if self._delayed:
            due.append(min(d for d, _, _ in self._delayed) - now)
        return max(0.0, min(due))

    # ------------------------------------------------------------------ helpers
    def _promote(self, now: float) -> None:
        """Move retries whose backoff elapsed to the front of the queue."""
        if not self._delayed:
            return
        due = sorted(d for d in self._delayed if d[0] <= now)
        if not due:
            return
        self._delayed = [d for d in self._delayed if d[0] > now]
        # retries go first so a retried task is not starved by the window
        for _, task_id, retry in reversed(due):
            self._queue.appendleft((task_id, retry))

    def _fill(self, now: float) -> list[Submit]:
        out: list[Submit] = []
        if self.stopped is not None:
            return out
        self._promote(now)
        while self._queue and len(self.in_flight) < self.max_in_flight:
            task_id, retry = self._queue.popleft()
            self.in_flight[task_id] = retry
            out.append(Submit(task_id, retry))
        return out

    def _maybe_flush(self, now: float, force: bool = False) -> list[Flush]:
        if not self.buffer:
            return []
        if (
            force
            or len(self.buffer) >= self.write_batch
            or now - self.last_flush >= self.flush_interval
        ):
            batch = tuple(self.buffer)
            self.buffer = []
            self.last_flush = now
            return [Flush(batch)]
        return []

    # ------------------------------------------------------------------ events
    def start(self, now: float) -> list:
        """The attempt begins: submit the first window of tasks."""
        self.started = self.last_flush = now
        return list(self._fill(now))

    def on_results(self, task_id: str, results: Iterable[Any], now: float) -> list:
        """A task returned its :class:`StratumResult` list."""
        if self.in_flight.pop(task_id, None) is None or self.stopped is not None:
            return []  # stale (duplicate or after stop): ignore
        results = list(results)
        self.buffer.extend(results)
        self.done += len(results)
        self.failed += sum(1 for r in results if getattr(r, "status", None) == "failed")
        return [*self._maybe_flush(now), *self._fill(now)]

    def on_error(self, task_id: str, error_class: str, message: str, kind: str, now: float) -> list:
        """A task raised. Infrastructure errors are retried with backoff, then given up.

        Parameters
        ----------
        task_id : str
        error_class : str
            Exception class name.
        message : str
            Exception text.
        kind : str
            :data:`INFRA` (retry) or :data:`TASK` (give up at once).
        now : float
        """
        retry = self.in_flight.pop(task_id, None)
        if retry is None or self.stopped is not None:
            return []
        nxt = retry + 1
        if kind == INFRA and self.policy.allows(nxt):
            self._delayed.append((now + self.policy.delay(nxt), task_id, nxt))
            self.retries += 1
            return list(self._fill(now))
        keys = self.tasks.get(task_id, ())
        self.done += len(keys)
        self.failed += len(keys)
        if kind != INFRA:
            # deterministic (corrupt file, bug): retrying cannot help, the strata fail
            from service.convert import failed_result

            self.buffer.extend(
                failed_result(k, error_class, f"{error_class}: {message}") for k in keys
            )
            return [*self._maybe_flush(now), *self._fill(now)]
        err = self.errors.setdefault(error_class, _Errors())
        err.keys.extend(keys)
        msg = f"{error_class} after {retry + 1} tries: {message}"
        if err.first is None:
            err.first = msg
        return [MarkError(task_id, keys, error_class, msg), *self._fill(now)]

    def on_tick(self, now: float) -> list:
        """Time passed: resubmit due retries, flush when the interval elapsed."""
        out: list = list(self._maybe_flush(now))
        out.extend(self._fill(now))
        return out

    def on_flushed(self, n: int) -> None:
        """A batch of ``n`` results was written."""
        self.written += int(n)

    def on_lease_lost(self, reason: str) -> list:
        """Heartbeat or write refused: cancelled or fenced by a newer attempt."""
        if self.stopped is not None:
            return []
        self.stopped = reason
        self._queue.clear()
        self._delayed.clear()
        self.in_flight.clear()
        self.buffer = []  # a fenced attempt may not write any more
        return [CancelAll(reason), Finish(LEASE_LOST, reason)]

    def drain(self, now: float) -> list:
        """Flush what is left (call once :attr:`finished`)."""
        if self.stopped is not None:
            return []
        return list(self._maybe_flush(now, force=True))

    def outcome(self, attempt: int = 1, max_attempts: int = 1) -> Finish:
        """How the attempt ends once :attr:`finished` and drained.

        Parameters
        ----------
        attempt : int, default 1
            This attempt's number (the job's fencing token).
        max_attempts : int, default 1
            Attempts a job gets before infrastructure errors fail it.

        Returns
        -------
        Finish
            ``Finish(LEASE_LOST, reason)`` after a lost lease. When strata were given
            up on after infrastructure errors: ``Finish(REQUEUE, msg)`` while
            ``attempt < max_attempts`` (the strata stay pending for the next attempt),
            else ``Finish("failed", msg)``. Otherwise ``Finish(None, None)``: the store
            computes ``succeeded`` / ``succeeded_with_errors`` / ``failed`` from the
            strata ledger.
        """
        if self.stopped is not None:
            return Finish(LEASE_LOST, self.stopped)
        keys = self.error_keys
        if not keys:
            return Finish(None, None)
        parts = [f"{len(e.keys)} strata: {e.first}" for e in self.errors.values()]
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        detail = f"{len(keys)} strata not fitted after infrastructure errors ({shown}); " + "; ".join(parts)
        if attempt < max_attempts:
            return Finish(REQUEUE, f"requeued after attempt {attempt}: {detail}")
        return Finish("failed", f"attempt {attempt} of {max_attempts}: {detail}")


def format_eta(seconds: float | None) -> str:
    """``"ETA 2s"``, ``"ETA 3m05s"`` or ``"ETA ?"``."""
    if seconds is None or not math.isfinite(seconds):
        return "ETA ?"
    s = int(round(seconds))
    if s < 60:
        return f"ETA {s}s"
    if s < 3600:
        return f"ETA {s // 60}m{s % 60:02d}s"
    return f"ETA {s // 3600}h{(s % 3600) // 60:02d}m"


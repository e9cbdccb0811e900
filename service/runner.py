"""Run one claimed job on a Dask cluster and stream its results to the store.

:class:`Runner` is the I/O shell around :class:`service.runstate.AttemptState`: it loads
the spec, plans strata and tasks, keeps the lease alive from a heartbeat thread, submits
tasks to Dask, feeds what comes back (results, errors, time) to the state machine, and
carries out the instructions it returns (write a batch, mark strata in error, cancel,
finish). Decisions live in :mod:`service.runstate`; this module only does the I/O.

One attempt, step by step
-------------------------
1. ``load_spec(job.spec)`` + ``validate_spec``; a :class:`~service.spec.SpecError`
   finishes the job ``failed`` with its message.
2. ``plan_strata`` → ``register_strata`` (idempotent) → ``pending_strata``: a resumed
   job plans tasks only for strata without a result.
3. Each task is submitted with ``client.submit(run_task, task, fit_kwargs, ...)``; only
   small task descriptors travel, workers read their own slices. Results are buffered
   and written with ``record_results`` every ``write_batch`` results or
   ``flush_interval`` seconds.
4. A heartbeat thread extends the lease every ``heartbeat_every`` seconds. When the
   store refuses it (job cancelled, or fenced by a newer attempt) the runner cancels its
   futures, writes nothing more and returns.
5. Infrastructure errors (lost worker, closed comm, I/O) are retried with exponential
   backoff; strata of a task that keeps failing are marked in error and stay pending,
   and the job is requeued (``failed`` once ``max_attempts`` is reached) with a
   message. A deterministic error of a whole task (corrupt file) fails its strata.
   Transient database errors are retried with the same backoff.
6. ``finish_job`` (the store derives ``succeeded`` / ``succeeded_with_errors`` /
   ``failed`` from the ledger); a cancelled job stays cancelled.

On ``KeyboardInterrupt`` the futures are cancelled, buffered results written and the
job requeued so another consumer can resume it.
"""
from __future__ import annotations

import concurrent.futures as _cf
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import distributed

from service.heap import frozen_heap
from service.runstate import (
    INFRA,
    LEASE_LOST,
    REQUEUE,
    AttemptState,
    CancelAll,
    Flush,
    MarkError,
    Progress,
    RetryPolicy,
    Submit,
    classify_task_error,
    is_transient_storage_error,
)
from service.tasks import run_task, warm_up  # light: imports the fitter only when run
from storage.records import JobRecord, StratumPlan

__all__ = ["Runner", "StorageUnavailable", "ProgressCallback", "CANCELLED_MESSAGE"]

_log = logging.getLogger(__name__)

#: ``(done, failed, total, rate)`` — strata with any outcome, of which failed, in the job,
#: strata per second in this attempt.
ProgressCallback = Callable[[int, int, int, float], None]

CANCELLED_MESSAGE = "job cancelled"


class StorageUnavailable(RuntimeError):
    """The store kept failing after all retries (database down or unreachable)."""


class _LeaseLost(Exception):
    """Internal: a fenced write or refused heartbeat (cancelled or claimed elsewhere)."""


class _Heartbeat(threading.Thread):
    """Extends the lease every ``every`` seconds until stopped or refused.

    ``lost`` is set when the store refuses the heartbeat, or when it has been failing
    for longer than the lease (the lease must then be assumed gone).
    """

    def __init__(self, store: Any, job_id: int, owner: str, attempt: int, lease: float, every: float):
        super().__init__(name=f"stratafit-heartbeat-{job_id}", daemon=True)
        self.store, self.job_id, self.owner, self.attempt = store, job_id, owner, attempt
        self.lease, self.every = float(lease), float(every)
        self.stop_event = threading.Event()
        self.lost = threading.Event()
        self.reason = ""

    def run(self) -> None:
        last_ok = time.monotonic()
        while not self.stop_event.wait(self.every):
            try:
                ok = self.store.heartbeat(
                    self.job_id, self.owner, self.attempt, lease_seconds=self.lease
                )
            except Exception as exc:  # DB hiccup: keep trying while the lease may hold
                _log.warning("heartbeat of job %s failed: %s", self.job_id, exc)
                if time.monotonic() - last_ok > self.lease:
                    self.reason = f"lease expired: heartbeat failing ({exc})"
                    self.lost.set()
                    return
                continue
            if ok:
                last_ok = time.monotonic()
            else:
                self.reason = "lease lost: job cancelled or claimed by another consumer"
                self.lost.set()
                return

    def stop(self) -> None:
        self.stop_event.set()


class Runner:
    """Runs claimed jobs on one Dask client, writing results to one store.

    Parameters
    ----------
    store : storage.Store
        The job queue and results store.
    client : distributed.Client or concurrent.futures.Future
        Connected client, or a future resolving to one (a cluster still starting: the
        runner plans the job first and waits for the client only when it submits; the
        future's exception, e.g. ``ClusterUnavailable``, propagates from
        :meth:`run_job`).
    owner : str
        Lease owner name of this consumer (``host:pid:...``).
    lease_seconds : float, default 60
        Lease length requested on every heartbeat.
    heartbeat_every : float, optional
        Heartbeat period; default ``lease_seconds / 3``.
    write_batch : int, default 200
        Results per ``record_results`` call (at most).
    flush_interval : float, default 1.0
        Buffered results are written at least this often (seconds).
    retry : RetryPolicy, optional
        Backoff for infrastructure errors of tasks and transient storage errors.
    max_in_flight : int, optional
        Tasks submitted at once; default ``max(64, 8 * workers)``.
    progress : callable, optional
        ``progress(done, failed, total, rate)`` called as results arrive.
    poll : float, default 0.05
        Sleep between polls of completed futures (seconds).
    max_attempts : int, default 3
        A job whose strata still hit infrastructure errors after all task retries is
        requeued until its attempt number reaches this, then finished ``failed``.
    interrupt : threading.Event, optional
        When set (e.g. by a SIGTERM/SIGINT handler), the runner cancels its futures,
        writes what arrived, requeues the job and raises ``KeyboardInterrupt`` at the
        next safe point. Signal handlers should set an event rather than raise: an
        exception raised inside a ``__del__`` or a callback is swallowed.
    """

    def __init__(
        self,
        store: Any,
        client: distributed.Client,
        owner: str,
        *,
        lease_seconds: float = 60.0,
        heartbeat_every: float | None = None,
        write_batch: int = 200,
        flush_interval: float = 1.0,
        retry: RetryPolicy | None = None,
        max_in_flight: int | None = None,
        progress: ProgressCallback | None = None,
        poll: float = 0.05,
        max_attempts: int = 3,
        interrupt: threading.Event | None = None,
    ):
        self.store = store
        self._client = client
        self.owner = owner
        self.lease_seconds = float(lease_seconds)
        self.heartbeat_every = float(heartbeat_every or lease_seconds / 3.0)
        self.write_batch = int(write_batch)
        self.flush_interval = float(flush_interval)
        self.retry = retry or RetryPolicy()
        self.max_in_flight = max_in_flight
        self.progress = progress
        self.poll = float(poll)
        self.max_attempts = int(max_attempts)
        self.interrupt = interrupt
        #: :class:`AttemptState` of the last attempt run (inspection, tests).
        self.last_state: AttemptState | None = None
        self._warmers: list = []

    # ------------------------------------------------------------------- client
    @property
    def client(self) -> distributed.Client:
        """The Dask client (waits for it when it was given as a future)."""
        c = self._client
        if isinstance(c, _cf.Future):
            c = c.result()
            self._client = c
        return c

    @client.setter
    def client(self, value: Any) -> None:
        self._client = value

    def _client_pending(self) -> bool:
        c = self._client
        return isinstance(c, _cf.Future) and not c.done()

    # ------------------------------------------------------------- storage calls
    def _db(self, what: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Call ``fn`` with transient storage errors retried with backoff.

        Raises
        ------
        _LeaseLost
            ``StaleAttemptError``: the attempt is fenced or the job no longer running.
        StorageUnavailable
            Transient errors outlasted the retries.
        """
        retry = 0
        while True:
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if type(exc).__name__ == "StaleAttemptError":
                    raise _LeaseLost(str(exc)) from exc
                if not is_transient_storage_error(exc):
                    raise
                retry += 1
                if not self.retry.allows(retry):
                    raise StorageUnavailable(f"{what} failed after {retry} tries: {exc}") from exc
                delay = self.retry.delay(retry)
                _log.warning("%s failed (%s); retry %d in %.1fs", what, exc, retry, delay)
                time.sleep(delay)

    def _finish(self, job: JobRecord, status: str | None, message: str | None) -> JobRecord:
        try:
            self._db("finish_job", self.store.finish_job, job.id, job.attempt, status, message)
        except _LeaseLost:
            pass  # cancelled (or fenced) meanwhile: leave the job as it is
        return self.store.get_job(job.id)

    # ------------------------------------------------------------------ planning
    def _plan(self, job: JobRecord, validated: Any = None, dataset: Any = None
              ) -> tuple[Any, Any, list[StratumPlan], list[Any], dict]:
        """Spec → (spec, handle, all strata, tasks for pending strata, progress counts).

        The dataset handle the spec's validation opened (with the footers' row counts
        and statistics it kept) is planned on directly; without one (a job claimed
        from the queue) the spec is validated here and its handle used.
        """
        from service.dataset import open_dataset
        from service.planner import plan_strata, plan_tasks
        from service.spec import load_spec, validate_spec

        if validated is not None and getattr(validated, "spec_hash", None) == job.spec_hash:
            spec = validated  # validated against the dataset just now by the caller
            handle = dataset if dataset is not None else open_dataset(spec.dataset)
        else:
            spec = load_spec(job.spec)
            handle = validate_spec(spec).dataset
        plans = list(plan_strata(handle, spec))
        self._db("register_strata", self.store.register_strata, job.id, job.attempt, plans)
        pending = list(self._db("pending_strata", self.store.pending_strata, job.id))
        tasks = list(plan_tasks(handle, spec, pending)) if pending else []
        counts = self._db("progress", self.store.progress, job.id)
        return spec, handle, plans, tasks, dict(counts or {})

    # ------------------------------------------------------------------- running
    def run_job(self, job: JobRecord, *, validated_spec: Any = None,
                dataset: Any = None) -> JobRecord:
        """Run one claimed attempt of ``job`` to its end.

        Parameters
        ----------
        job : JobRecord
            As returned by ``claim_job`` (its ``attempt`` is the fencing token).
        validated_spec : JobSpec, optional
            The job's spec, validated by the caller moments ago (``api.run``): not
            validated again when its ``spec_hash`` matches the job's.
        dataset : DatasetHandle, optional
            With ``validated_spec``: the handle its validation opened
            (``SpecReport.dataset``), planned on without reading the footers again.

        Returns
        -------
        JobRecord
            The job as stored afterwards: finished, cancelled, or (fenced) whatever
            the newer attempt made of it.

        Raises
        ------
        StorageUnavailable
            The store stayed unreachable (the lease will expire; another consumer
            resumes the job).
        service.cluster.ClusterUnavailable
            The client future failed (the job is left running for the caller to
            requeue).
        KeyboardInterrupt
            After requeueing the job.
        """
        from service.dataset import DatasetError
        from service.spec import SpecError

        hb = _Heartbeat(
            self.store, job.id, self.owner, job.attempt, self.lease_seconds, self.heartbeat_every
        )
        hb.start()
        self._warm_workers()
        try:
            try:
                self._check_interrupt()
                spec, _handle, plans, tasks, counts = self._plan(job, validated_spec, dataset)
                self._check_interrupt()
            except _LeaseLost:
                return self.store.get_job(job.id)
            except SpecError as exc:
                return self._finish(job, "failed", f"invalid spec: {exc}")
            except (DatasetError, OSError) as exc:
                return self._finish(job, "failed", f"cannot read dataset: {exc}")
            except StorageUnavailable:
                raise  # the lease expires; another consumer resumes the job
            except KeyboardInterrupt:
                self._requeue_quietly(job, "interrupted by user while planning")
                raise
            except Exception as exc:  # planning is deterministic: do not retry forever
                _log.exception("planning job %s failed", job.id)
                return self._finish(job, "failed", f"planning failed: {type(exc).__name__}: {exc}")
            finally:
                self._warmers = []  # planned: the warm-up futures are no longer needed
            if not tasks:
                return self._finish(job, None, None)
            try:
                self._wait_client()
            except KeyboardInterrupt:
                self._requeue_quietly(job, "interrupted by user while connecting")
                raise
            done_before = len(plans) - sum(len(t.strata) for t in tasks)
            state = AttemptState(
                {t.task_id: [s.key for s in t.strata] for t in tasks},
                total=len(plans),
                already_done=max(done_before, 0),
                already_failed=int(counts.get("failed", 0)),
                policy=self.retry,
                write_batch=self.write_batch,
                flush_interval=self.flush_interval,
                max_in_flight=self.max_in_flight or self._default_in_flight(),
                now=time.monotonic(),
            )
            self.last_state = state
            try:
                with frozen_heap():  # the collector skips the long-lived heap (service.heap)
                    _Attempt(self, job, spec, tasks, state, hb).run()
            except (StorageUnavailable, KeyboardInterrupt):
                raise
            except Exception as exc:  # a bug in the loop: fail the job, do not loop on it
                _log.exception("running job %s failed", job.id)
                self._finish(job, "failed", f"internal error: {type(exc).__name__}: {exc}")
                raise
            outcome = state.outcome(job.attempt, self.max_attempts)
            if outcome.status == LEASE_LOST:
                return self.store.get_job(job.id)
            if outcome.status == REQUEUE:
                try:
                    self._db("requeue_job", self.store.requeue_job, job.id, job.attempt,
                             outcome.message)
                except _LeaseLost:
                    pass
                return self.store.get_job(job.id)
            return self._finish(job, outcome.status, outcome.message)
        finally:
            hb.stop()

    def _wait_client(self) -> None:
        """Block until the client is connected (a future given to the constructor)."""
        if not self._client_pending():
            self.client  # noqa: B018  (raises the future's error, if any)
            return
        while True:
            self._check_interrupt()
            try:
                self._client.result(timeout=0.2)
            except _cf.TimeoutError:
                continue
            self.client  # noqa: B018
            return

    def _warm_workers(self) -> None:
        """Let every worker import the fitter while this process plans (fire and forget).

        Skipped while the client is still starting: ``service.cluster.connect`` preloads
        the workers itself (``PreloadPlugin``).
        """
        if self._client_pending():
            return
        try:
            workers = list(self.client.scheduler_info().get("workers", {}))
            self._warmers = [
                self.client.submit(warm_up, pure=False, workers=[w], allow_other_workers=False,
                                   key=f"stratafit-warm-{i}-{time.monotonic_ns()}")
                for i, w in enumerate(workers)
            ]
        except Exception as exc:  # an optimisation only
            _log.debug("warming workers failed: %s", exc)

    def _check_interrupt(self) -> None:
        if self.interrupt is not None and self.interrupt.is_set():
            raise KeyboardInterrupt

    def _requeue_quietly(self, job: JobRecord, message: str) -> None:
        """Best-effort requeue (interrupts): the lease expiring is the fallback."""
        try:
            self.store.requeue_job(job.id, job.attempt, message)
        except Exception as exc:
            _log.warning("could not requeue job %s: %s", job.id, exc)

    def _default_in_flight(self) -> int:
        try:
            n = len(self.client.scheduler_info().get("workers", {}))
        except Exception:
            n = 0
        return max(64, 8 * n)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _Attempt:
    """The event loop of one attempt: futures → events → instructions → I/O."""

    def __init__(self, runner: Runner, job: JobRecord, spec: Any, tasks: Sequence[Any],
                 state: AttemptState, hb: _Heartbeat):
        self.r = runner
        self.job = job
        self.tasks = {t.task_id: t for t in tasks}
        self.state = state
        self.hb = hb
        self.fit_kwargs = spec.fit_kwargs()
        self.store_re = bool(spec.store_random_effects)
        self.futures: dict[str, distributed.Future] = {}
        self.by_key: dict[str, str] = {}
        self.ac = distributed.as_completed([], with_results=False)
        self.last_progress = 0.0

    # ----------------------------------------------------------- instructions
    def _submit(self, ins: Submit) -> list:
        """Send one task; a refused submission is handled like a lost worker."""
        task = self.tasks[ins.task_id]
        key = f"stratafit-fit-{self.job.id}-{self.job.attempt}-{ins.task_id}-{ins.retry}"
        try:
            fut = self.r.client.submit(
                run_task, task, self.fit_kwargs, self.store_re, pure=False, key=key
            )
        except Exception as exc:  # scheduler gone: retried with backoff like a lost worker
            _log.warning("submitting task %s failed: %s", ins.task_id, _first_line(exc))
            return self.state.on_error(ins.task_id, type(exc).__name__, str(exc),
                                       classify_task_error(exc), time.monotonic())
        self.futures[ins.task_id] = fut
        self.by_key[fut.key] = ins.task_id
        self.ac.add(fut)
        return []

    def _flush(self, ins: Flush) -> None:
        n = self.r._db(
            "record_results",
            self.r.store.record_results,
            self.job.id,
            self.job.attempt,
            list(ins.results),
            store_random_effects=self.store_re,
        )
        self.state.on_flushed(n if isinstance(n, int) else len(ins.results))

    def _mark(self, ins: MarkError) -> None:
        self.r._db(
            "mark_strata_error",
            self.r.store.mark_strata_error,
            self.job.id,
            self.job.attempt,
            list(ins.keys),
            ins.error_class,
            ins.message,
        )

    def _cancel(self) -> None:
        futs = list(self.futures.values())
        self.futures.clear()
        if futs:
            try:
                self.r.client.cancel(futs)
            except Exception as exc:  # cancelling is best effort
                _log.warning("cancelling %d futures failed: %s", len(futs), exc)

    def _execute(self, instructions: list) -> None:
        """Carry out instructions in order (iteratively: follow-ups are queued)."""
        todo = deque(instructions)
        while todo:
            ins = todo.popleft()
            try:
                if isinstance(ins, Submit):
                    todo.extend(self._submit(ins))
                elif isinstance(ins, Flush):
                    self._flush(ins)
                elif isinstance(ins, MarkError):
                    self._mark(ins)
                elif isinstance(ins, CancelAll):
                    self._cancel()
                # Finish: the caller reads the outcome once the loop ends
            except _LeaseLost as exc:
                todo.clear()
                todo.extend(self.state.on_lease_lost(f"lease lost: {exc}"))

    # ----------------------------------------------------------------- events
    def _collect(self, fut: distributed.Future, now: float) -> list:
        task_id = self.by_key.pop(fut.key, None)
        if task_id is None or self.futures.get(task_id) is not fut:
            return []  # a future we no longer track (cancelled, superseded)
        del self.futures[task_id]
        try:
            if fut.status == "finished":
                return self.state.on_results(task_id, fut.result(), now)
            if fut.status == "cancelled":
                _log.warning("job %s task %s was cancelled by the cluster", self.job.id, task_id)
                return self.state.on_error(
                    task_id, "FutureCancelledError", "task cancelled by the cluster", INFRA, now
                )
            exc: BaseException = fut.exception()
        except Exception as err:  # fetching the result failed (comm closed, ...)
            exc = err
        kind = classify_task_error(exc)
        _log.warning("job %s task %s raised %s (%s): %s", self.job.id, task_id,
                     type(exc).__name__, kind, _first_line(exc))
        return self.state.on_error(task_id, type(exc).__name__, str(exc), kind, now)

    def _report(self, now: float, force: bool = False) -> None:
        if self.r.progress is None:
            return
        if not force and now - self.last_progress < 0.2:
            return
        self.last_progress = now
        p: Progress = self.state.progress(now)
        try:
            self.r.progress(p.done, p.failed, p.total, p.rate)
        except Exception as exc:  # a broken progress display must not stop the job
            _log.debug("progress callback failed: %s", exc)

    def run(self) -> None:
        """Drive the attempt until every task is done or the lease is lost."""
        state = self.state
        try:
            self._execute(state.start(time.monotonic()))
            self._report(time.monotonic(), force=True)
            while not state.finished:
                self.r._check_interrupt()
                if self.hb.lost.is_set():
                    self._execute(state.on_lease_lost(self._lost_reason()))
                    break
                batch = self.ac.next_batch(block=False)
                now = time.monotonic()
                for fut in batch:
                    self._execute(self._collect(fut, now))
                self._execute(state.on_tick(now))
                if batch:
                    self._report(now)
                else:
                    time.sleep(min(self.r.poll, max(state.next_wakeup(now), 0.001)))
            self._execute(state.drain(time.monotonic()))
            self._report(time.monotonic(), force=True)
        except KeyboardInterrupt:
            self._interrupted()
            raise
        except BaseException:
            self._cancel()
            raise

    def _lost_reason(self) -> str:
        try:
            if self.r.store.get_job(self.job.id).status == "cancelled":
                return CANCELLED_MESSAGE
        except Exception:
            pass
        return self.hb.reason or "lease lost"

    def _interrupted(self) -> None:
        """Ctrl-C: cancel, write what arrived, requeue the job for another consumer."""
        self._cancel()
        try:
            self._execute(self.state.drain(time.monotonic()))
        except Exception as exc:  # best effort; the lease expires anyway
            _log.warning("could not write results of job %s after interrupt: %s",
                         self.job.id, exc)
        self.r._requeue_quietly(self.job, "interrupted by user")

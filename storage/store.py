"""The :class:`Store`: stratafit's one storage interface (queue, ledger, results).

All SQL of the project lives here and in :mod:`storage.results` (the result tables'
statements, run inside this class's transactions): SQLAlchemy 2 Core statements on the
tables of :mod:`storage.models`, nothing built from user strings. Only plain records from
:mod:`storage.records` cross the boundary.

Concurrency model
-----------------
* A job is owned by whoever claimed it last; every claim increments ``jobs.attempt``, the
  *fencing token*. Every write on behalf of a running job (``register_strata``,
  ``record_results``, ``mark_strata_error``, ``finish_job``, ``requeue_job``) checks,
  inside its own write transaction, that the job is still ``running`` at the caller's
  attempt, and raises :class:`~storage.errors.StaleAttemptError` otherwise. On PostgreSQL
  the check locks the job row (``SELECT ... FOR UPDATE``); on SQLite every write
  transaction starts with ``BEGIN IMMEDIATE`` (the database write lock).
* Claims use ``SELECT ... FOR UPDATE SKIP LOCKED LIMIT 1`` then ``UPDATE`` in the same
  transaction on PostgreSQL, and the same statements under ``BEGIN IMMEDIATE`` on SQLite,
  so two claimers never win the same job.
* Timestamps are taken from the Python clock (UTC, timezone-aware) of the caller and
  compared in SQL; keep worker clocks NTP-synchronised, and leases much longer than the
  expected skew.

Transactions for results
------------------------
:meth:`Store.record_results` writes a whole batch in ONE transaction: the fencing check,
then delete-and-reinsert of the fits (and their children) of every stratum in the batch,
then the ledger update. Each result is therefore atomic (and so is the batch), and a
retried stratum never duplicates rows. Results are validated before the transaction
starts; an invalid record fails the call without writing anything. The caller chooses the
batch size (one result per call is fine; tens to hundreds amortise round trips).

Errors: driver and SQLAlchemy errors are re-raised as :class:`~storage.errors.StorageError`
(the original chained), so callers never need to import SQLAlchemy.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar

import pandas as pd
import sqlalchemy as sa
from sqlalchemy import func, insert, select, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect

from storage import migrate
from storage.engine import WRITE_OPTION, create_engine, json_dumps, resolve_url
from storage.errors import (InvalidRecordError, JobNotFound, MigrationError, StaleAttemptError,
                            StorageError)
from storage.models import Job, Stratum, UTCDateTime, utcnow
from storage.records import JobRecord, StratumPlan, StratumResult
from storage.results import TABLES, chunks, read_result_table, write_results
from storage.rows import ERROR_CLASS_MAX, prepare_results, strata_rows
from storage.states import JobEvent, JobStatus, StratumStatus, next_job_status
from storage.states import final_job_message, final_job_status

__all__ = ["Store", "TABLES"]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_jobs: sa.Table = Job.__table__  # type: ignore[assignment]
_strata: sa.Table = Stratum.__table__  # type: ignore[assignment]

_NOT_FITTED_CLASS = "NotFitted"
_NOT_FITTED_MESSAGE = "the job finished before this stratum was fitted"

def _wrap_db_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Re-raise SQLAlchemy/driver/Alembic errors as :class:`StorageError`."""

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except (sa.exc.SQLAlchemyError, MigrationError) as exc:
            raise StorageError(f"{method.__name__} failed: {exc}") from exc

    return wrapper


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(JobRecord))


def _record(row: sa.Row[Any]) -> JobRecord:
    m = row._mapping
    return JobRecord(**{name: m[name] for name in _RECORD_FIELDS})


class Store:
    """Durable job queue, strata ledger and result tables on SQLite or PostgreSQL.

    Parameters
    ----------
    url : str, optional
        SQLAlchemy URL, e.g. ``"postgresql+psycopg://user@host/db"`` or
        ``"sqlite:///path/to/stratafit.db"``. Defaults to ``$STRATAFIT_STORE``, then
        ``sqlite:///stratafit.db``. A bare ``postgresql://`` gets the psycopg driver.

    Notes
    -----
    A ``Store`` is thread-safe (it holds a connection pool); create one per process and
    call :meth:`dispose` (or use it as a context manager) when done. Call
    :meth:`upgrade` once before use to create or migrate the schema.
    """

    def __init__(self, url: str | None = None) -> None:
        self._url = resolve_url(url)
        self._engine = create_engine(self._url)
        self._sqlite = self._url.get_backend_name() == "sqlite"

    # ------------------------------------------------------------------ plumbing
    @property
    def url(self) -> str:
        """str: The resolved database URL (password included)."""
        return self._url.render_as_string(hide_password=False)

    @property
    def dialect(self) -> str:
        """str: ``"sqlite"`` or ``"postgresql"``."""
        return self._engine.dialect.name

    def __repr__(self) -> str:
        return f"Store({self._url.render_as_string(hide_password=True)!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.dispose()

    def dispose(self) -> None:
        """Close all pooled connections."""
        self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        """A write transaction (``BEGIN IMMEDIATE`` on SQLite), committed on success."""
        with self._engine.connect() as conn:
            conn.execution_options(**{WRITE_OPTION: True})
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        """A read-only transaction (rolled back on exit)."""
        with self._engine.connect() as conn:
            yield conn

    def _upsert_ignore(self) -> Any:
        dialect = sqlite_dialect if self._sqlite else pg_dialect
        return dialect.insert(_strata).on_conflict_do_nothing(index_elements=["job_id", "key"])

    @staticmethod
    def _fence(conn: sa.Connection, job_id: int, attempt: int) -> None:
        """Lock the job row and check it is running at ``attempt``."""
        row = conn.execute(
            select(_jobs.c.status, _jobs.c.attempt)
            .where(_jobs.c.id == job_id)
            .with_for_update()
        ).one_or_none()
        if row is None:
            raise JobNotFound(job_id)
        if row.status != JobStatus.RUNNING or row.attempt != attempt:
            raise StaleAttemptError(job_id, attempt, row.attempt, row.status)

    @staticmethod
    def _set_job(conn: sa.Connection, job_id: int, **values: Any) -> JobRecord:
        """Update the job row and return the new record."""
        row = conn.execute(
            update(_jobs).where(_jobs.c.id == job_id).values(**values).returning(_jobs)
        ).one()
        return _record(row)

    @staticmethod
    def _exists(conn: sa.Connection, job_id: int) -> None:
        if conn.execute(select(_jobs.c.id).where(_jobs.c.id == job_id)).first() is None:
            raise JobNotFound(job_id)

    @staticmethod
    def _counts(conn: sa.Connection, job_id: int) -> dict[str, int]:
        counts = {s.value: 0 for s in StratumStatus}
        rows = conn.execute(
            select(_strata.c.status, func.count())
            .where(_strata.c.job_id == job_id)
            .group_by(_strata.c.status)
        )
        for status, n in rows:
            counts[status] = int(n)
        return counts

    # ------------------------------------------------------------------ schema
    @_wrap_db_errors
    def upgrade(self) -> None:
        """Create or migrate the schema to the latest Alembic revision.

        Idempotent, and safe when several processes call it at once (PostgreSQL: an
        advisory lock; SQLite: the write lock).
        """
        with self._write() as conn:
            migrate.upgrade_head(conn)

    # ------------------------------------------------------------------ queue
    @_wrap_db_errors
    def submit_job(
        self,
        *,
        name: str,
        spec: dict[str, Any],
        spec_hash: str,
        idempotency_key: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """Queue a job, or return the existing job with the same idempotency key.

        Parameters
        ----------
        name : str
            Human-readable job name.
        spec : dict
            The validated job spec (JSON-serialisable).
        spec_hash : str
            Hash of the canonical spec.
        idempotency_key : str, optional
            Client-chosen key; submitting it again (even concurrently) returns the first
            job instead of creating another. The existing job is returned as is, even if
            its ``spec_hash`` differs: compare it if that matters.

        Returns
        -------
        (JobRecord, bool)
            The job, and True if this call created it.
        """
        try:
            json_dumps(spec)
        except (TypeError, ValueError) as exc:
            raise InvalidRecordError(f"job spec is not JSON-serialisable: {exc}") from None
        by_key = select(_jobs).where(_jobs.c.idempotency_key == idempotency_key)
        with self._write() as conn:
            if idempotency_key is not None:
                existing = conn.execute(by_key).one_or_none()
                if existing is not None:
                    return _record(existing), False
            values = {
                "name": name, "spec": spec, "spec_hash": spec_hash, "attempt": 0,
                "status": JobStatus.QUEUED.value, "idempotency_key": idempotency_key,
                "created_at": utcnow(),
            }
            try:
                with conn.begin_nested():
                    row = conn.execute(insert(_jobs).values(values).returning(_jobs)).one()
            except sa.exc.IntegrityError:
                if idempotency_key is None:
                    raise
                # Lost a race with a concurrent submit of the same key: return its job.
                return _record(conn.execute(by_key).one()), False
            return _record(row), True

    @_wrap_db_errors
    def claim_job(
        self, owner: str, *, lease_seconds: float = 60.0, job_id: int | None = None
    ) -> JobRecord | None:
        """Atomically claim the oldest claimable job and lease it to ``owner``.

        Claimable: ``queued``, or ``running`` with an expired lease (its owner stopped
        heartbeating; the claim resumes it). The claim sets status ``running``, the lease
        and ``heartbeat_at``, ``started_at`` if unset, and increments ``attempt``, the
        fencing token every later write must present.

        Parameters
        ----------
        owner : str
            Identifies the claimer (e.g. ``"host:pid:uuid"``).
        lease_seconds : float, default 60
            Lease length; renew it with :meth:`heartbeat` well before it expires.
        job_id : int, optional
            Only claim this job.

        Returns
        -------
        JobRecord or None
            The claimed job, or None if nothing is claimable.
        """
        now = utcnow()
        claimable = sa.or_(
            _jobs.c.status == JobStatus.QUEUED.value,
            sa.and_(_jobs.c.status == JobStatus.RUNNING.value, _jobs.c.lease_expires_at < now),
        )
        candidate = select(_jobs.c.id, _jobs.c.status).where(claimable)
        if job_id is not None:
            candidate = candidate.where(_jobs.c.id == job_id)
        candidate = (
            candidate.order_by(_jobs.c.created_at, _jobs.c.id)
            .limit(1)
            .with_for_update(skip_locked=True)
        )
        with self._write() as conn:
            found = conn.execute(candidate).one_or_none()
            if found is None:
                return None
            event = JobEvent.CLAIM if found.status == JobStatus.QUEUED else (
                JobEvent.LEASE_EXPIRED_CLAIM
            )
            new_status = next_job_status(found.status, event)
            row = conn.execute(
                update(_jobs)
                .where(_jobs.c.id == found.id, claimable)  # guard: still claimable
                .values(
                    status=new_status.value,
                    attempt=_jobs.c.attempt + 1,
                    lease_owner=owner,
                    lease_expires_at=now + timedelta(seconds=lease_seconds),
                    heartbeat_at=now,
                    started_at=func.coalesce(_jobs.c.started_at, sa.literal(now, UTCDateTime())),
                )
                .returning(_jobs)
            ).one_or_none()
            return None if row is None else _record(row)

    @_wrap_db_errors
    def heartbeat(
        self, job_id: int, owner: str, attempt: int, *, lease_seconds: float = 60.0
    ) -> bool:
        """Extend the lease of a job the caller still owns.

        Parameters
        ----------
        job_id : int
        owner : str
            The owner that claimed the job.
        attempt : int
            The attempt returned by the claim.
        lease_seconds : float, default 60
            New lease length from now.

        Returns
        -------
        bool
            True if extended; False if the job is no longer running at this attempt for
            this owner (lease lost to another claimer, cancelled, finished): stop working.
        """
        now = utcnow()
        with self._write() as conn:
            result = conn.execute(
                update(_jobs)
                .where(
                    _jobs.c.id == job_id,
                    _jobs.c.status == JobStatus.RUNNING.value,
                    _jobs.c.attempt == attempt,
                    _jobs.c.lease_owner == owner,
                )
                .values(lease_expires_at=now + timedelta(seconds=lease_seconds), heartbeat_at=now)
            )
            return result.rowcount == 1

    @_wrap_db_errors
    def finish_job(
        self,
        job_id: int,
        attempt: int,
        status: JobStatus | str | None = None,
        message: str | None = None,
    ) -> JobRecord:
        """Finish a running job (fenced) and release its lease.

        Parameters
        ----------
        job_id : int
        attempt : int
            The caller's attempt.
        status : {"succeeded", "succeeded_with_errors", "failed"}, optional
            Default: computed by :func:`~storage.states.final_job_status` from the ledger.
        message : str, optional
            Default: a summary from :func:`~storage.states.final_job_message`.

        Returns
        -------
        JobRecord

        Notes
        -----
        Strata still ``pending`` become ``failed`` (``error_class`` kept, else
        ``"NotFitted"``), so a finished job's ledger has no pending strata.

        Raises
        ------
        StaleAttemptError
            The caller no longer owns the job.
        InvalidTransition
            ``status`` is not a completion status.
        """
        now = utcnow()
        with self._write() as conn:
            self._fence(conn, job_id, attempt)
            counts = self._counts(conn, job_id)
            pending = counts[StratumStatus.PENDING.value]
            # Pending strata will never be fitted now: they count (and are stored) as failed.
            counts[StratumStatus.FAILED.value] += pending
            counts[StratumStatus.PENDING.value] = 0
            outcome = final_job_status(counts) if status is None else status
            new_status = next_job_status(JobStatus.RUNNING, JobEvent.COMPLETE, outcome)
            if message is None:
                message = final_job_message(counts)
            if pending:
                conn.execute(
                    update(_strata)
                    .where(
                        _strata.c.job_id == job_id,
                        _strata.c.status == StratumStatus.PENDING.value,
                    )
                    .values(
                        status=StratumStatus.FAILED.value,
                        error_class=func.coalesce(_strata.c.error_class, _NOT_FITTED_CLASS),
                        error_message=func.coalesce(
                            _strata.c.error_message, _NOT_FITTED_MESSAGE
                        ),
                        updated_at=now,
                    )
                )
            return self._set_job(
                conn, job_id, status=new_status.value, finished_at=now, lease_owner=None,
                lease_expires_at=None, message=message,
            )

    @_wrap_db_errors
    def requeue_job(self, job_id: int, attempt: int, message: str | None = None) -> JobRecord:
        """Put a running job back in the queue after an infrastructure failure (fenced).

        The ledger is kept: the next claim resumes with :meth:`pending_strata`.

        Parameters
        ----------
        job_id : int
        attempt : int
        message : str, optional
            Why (e.g. the scheduler went away).

        Returns
        -------
        JobRecord
        """
        with self._write() as conn:
            self._fence(conn, job_id, attempt)
            new_status = next_job_status(JobStatus.RUNNING, JobEvent.REQUEUE)
            return self._set_job(
                conn, job_id, status=new_status.value, lease_owner=None,
                lease_expires_at=None, message=message,
            )

    @_wrap_db_errors
    def cancel_job(self, job_id: int, message: str | None = None) -> JobRecord:
        """Cancel a queued or running job (not fenced: an operator action).

        A running job's owner finds out through :meth:`heartbeat` returning False and
        :class:`~storage.errors.StaleAttemptError` on its next write.

        Parameters
        ----------
        job_id : int
        message : str, optional
            Default ``"cancelled"``.

        Returns
        -------
        JobRecord

        Raises
        ------
        JobNotFound
        InvalidTransition
            The job already finished (or was cancelled).
        """
        with self._write() as conn:
            current = conn.execute(
                select(_jobs.c.status).where(_jobs.c.id == job_id).with_for_update()
            ).scalar_one_or_none()
            if current is None:
                raise JobNotFound(job_id)
            new_status = next_job_status(current, JobEvent.CANCEL)
            return self._set_job(
                conn, job_id, status=new_status.value, finished_at=utcnow(), lease_owner=None,
                lease_expires_at=None, message=message or "cancelled",
            )

    @_wrap_db_errors
    def get_job(self, job_id: int) -> JobRecord:
        """Return a job.

        Raises
        ------
        JobNotFound
        """
        with self._read() as conn:
            row = conn.execute(select(_jobs).where(_jobs.c.id == job_id)).one_or_none()
        if row is None:
            raise JobNotFound(job_id)
        return _record(row)

    @_wrap_db_errors
    def list_jobs(
        self, limit: int = 50, status: JobStatus | str | None = None
    ) -> list[JobRecord]:
        """Return the newest jobs first.

        Parameters
        ----------
        limit : int, default 50
        status : str, optional
            Only jobs with this status (ValueError if not a :class:`JobStatus` name).

        Returns
        -------
        list of JobRecord
        """
        query = select(_jobs).order_by(_jobs.c.id.desc()).limit(int(limit))
        if status is not None:
            try:
                wanted = JobStatus(status)
            except ValueError:
                valid = ", ".join(s.value for s in JobStatus)
                raise ValueError(f"unknown job status {status!r}; valid: {valid}") from None
            query = query.where(_jobs.c.status == wanted.value)
        with self._read() as conn:
            return [_record(r) for r in conn.execute(query)]

    # ------------------------------------------------------------------ ledger
    @_wrap_db_errors
    def register_strata(self, job_id: int, attempt: int, plans: Sequence[StratumPlan]) -> None:
        """Add the planned strata to the ledger as ``pending`` (fenced, idempotent).

        Strata already in the ledger (same key) are left untouched, so registering again
        on resume is safe. Sets ``jobs.n_strata`` to the number of ledger rows.

        Parameters
        ----------
        job_id : int
        attempt : int
        plans : sequence of StratumPlan
        """
        rows = strata_rows(job_id, plans, utcnow())
        stmt = self._upsert_ignore()
        with self._write() as conn:
            self._fence(conn, job_id, attempt)
            for chunk in chunks(rows):
                conn.execute(stmt, list(chunk))
            n = conn.execute(
                select(func.count()).select_from(_strata).where(_strata.c.job_id == job_id)
            ).scalar_one()
            conn.execute(update(_jobs).where(_jobs.c.id == job_id).values(n_strata=n))

    @_wrap_db_errors
    def pending_strata(self, job_id: int) -> list[StratumPlan]:
        """Return the strata still to fit (status ``pending``), ordered by key.

        Raises
        ------
        JobNotFound
        """
        query = select(_strata.c.key, _strata.c["values"], _strata.c.nrows).where(
            _strata.c.job_id == job_id, _strata.c.status == StratumStatus.PENDING.value
        )
        with self._read() as conn:
            rows = conn.execute(query).all()
            if not rows:
                self._exists(conn, job_id)
        plans = [StratumPlan(key=r.key, values=r[1], nrows=r.nrows) for r in rows]
        return sorted(plans, key=lambda p: p.key)

    @_wrap_db_errors
    def mark_strata_error(
        self,
        job_id: int,
        attempt: int,
        keys: Iterable[str],
        error_class: str,
        message: str,
    ) -> int:
        """Record an infrastructure error (worker died, ...) on pending strata (fenced).

        ``attempts`` is incremented and the error stored; the strata stay ``pending`` so a
        retry or resume fits them. Strata that already have a result are not touched.

        Returns
        -------
        int
            Number of ledger rows updated.
        """
        keys = list(dict.fromkeys(keys))
        now = utcnow()
        updated = 0
        with self._write() as conn:
            self._fence(conn, job_id, attempt)
            for chunk in chunks(keys):
                result = conn.execute(
                    update(_strata)
                    .where(
                        _strata.c.job_id == job_id,
                        _strata.c.key.in_(chunk),
                        _strata.c.status == StratumStatus.PENDING.value,
                    )
                    .values(
                        attempts=_strata.c.attempts + 1,
                        error_class=str(error_class)[:ERROR_CLASS_MAX],
                        error_message=str(message),
                        updated_at=now,
                    )
                )
                updated += result.rowcount
        return updated

    @_wrap_db_errors
    def progress(self, job_id: int) -> dict[str, int]:
        """Return stratum counts per status (every status present) plus ``"total"``.

        Raises
        ------
        JobNotFound
        """
        with self._read() as conn:
            self._exists(conn, job_id)
            counts = self._counts(conn, job_id)
        counts["total"] = sum(counts.values())
        return counts

    # ------------------------------------------------------------------ results
    @_wrap_db_errors
    def record_results(
        self,
        job_id: int,
        attempt: int,
        results: Sequence[StratumResult],
        *,
        store_random_effects: bool = True,
    ) -> int:
        """Store stratum results and update the ledger, in one fenced transaction.

        Each stratum's previous fit and child rows (if any) are replaced, so retries are
        idempotent. A ``failed`` result stores no fit and removes an earlier one.

        Parameters
        ----------
        job_id : int
        attempt : int
            The caller's attempt (fencing token).
        results : sequence of StratumResult
            For registered strata; a key given twice keeps its last result.
        store_random_effects : bool, default True
            If False, conditional modes are not stored.

        Returns
        -------
        int
            Number of strata written.

        Raises
        ------
        StaleAttemptError
            The caller no longer owns the job; nothing was written.
        InvalidRecordError
            A result breaks the record contract or names an unregistered stratum;
            nothing was written.
        """
        prepared = prepare_results(results, store_random_effects=store_random_effects)
        now = utcnow()
        with self._write() as conn:
            self._fence(conn, job_id, attempt)
            write_results(conn, job_id, attempt, prepared, now)
        return len(prepared)

    @_wrap_db_errors
    def read_table(self, job_id: int, table: str) -> pd.DataFrame:
        """Return one result table of a job as a DataFrame.

        Parameters
        ----------
        job_id : int
        table : {"fits", "coefficients", "variance", "ranef", "strata"}
            ``fits``: one row per fitted stratum; ``coefficients``, ``variance``,
            ``ranef``: the child rows; ``strata``: the ledger.

        Returns
        -------
        pandas.DataFrame
            First column ``stratum`` (the stratum key), then the table's columns (no
            surrogate ids). Rows ordered by stratum key (code-point order, the same on
            every backend), then in the order they were stored. Float columns are
            float64 with NaN for NULL; timestamps are timezone-aware UTC.

        Raises
        ------
        ValueError
            Unknown ``table``.
        JobNotFound
        """
        with self._read() as conn:
            frame = read_result_table(conn, job_id, table)
            if frame.empty:
                self._exists(conn, job_id)
        return frame

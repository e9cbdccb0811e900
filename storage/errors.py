"""Exceptions raised by :mod:`storage`.

Every error the :class:`~storage.store.Store` raises is a :class:`StorageError`, so callers
(the service) can handle storage failures without importing SQLAlchemy. Database driver
errors are wrapped in a plain :class:`StorageError` (the original is chained as
``__cause__``); the subclasses below carry a specific meaning.
"""
from __future__ import annotations

__all__ = [
    "StorageError",
    "StaleAttemptError",
    "JobNotFound",
    "InvalidTransition",
    "InvalidRecordError",
    "MigrationError",
]


class StorageError(Exception):
    """Base class of all storage errors; also wraps database/driver failures."""


class StaleAttemptError(StorageError):
    """A fenced write came from an attempt that no longer owns the job.

    Raised when the job's current ``attempt`` differs from the caller's (another worker
    claimed it after the lease expired) or the job is no longer ``running`` (cancelled,
    finished or requeued). The caller must stop working on the job.

    Parameters
    ----------
    job_id : int
        The job.
    attempt : int
        The caller's attempt (fencing token).
    current_attempt : int or None
        The job's attempt in the database.
    status : str or None
        The job's status in the database.
    """

    def __init__(
        self,
        job_id: int,
        attempt: int,
        current_attempt: int | None = None,
        status: str | None = None,
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self.current_attempt = current_attempt
        self.status = status
        super().__init__(
            f"job {job_id}: attempt {attempt} is stale (job is {status!r} at attempt "
            f"{current_attempt})"
        )


class JobNotFound(StorageError, LookupError):
    """No job with this id.

    Parameters
    ----------
    job_id : int
        The missing job id.
    """

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        super().__init__(f"job {job_id} not found")


class InvalidTransition(StorageError, ValueError):
    """A job or stratum status change that the state machine does not allow."""


class InvalidRecordError(StorageError, ValueError):
    """A record handed to the store violates the contract in :mod:`storage.records`.

    Raised before anything is written (unknown status, unknown column names, a fitted
    status without a ``fit`` dict, a result for an unregistered stratum, ...).
    """


class MigrationError(StorageError):
    """The schema could not be migrated (Alembic's own error, e.g. an unknown revision)."""

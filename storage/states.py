"""Pure job and stratum state machines (no I/O, no SQLAlchemy).

The :class:`~storage.store.Store` asks these functions whether a status change is allowed
and what a finished job's status is; they are tested on their own.

Job lifecycle::

    queued --claim--> running --complete(outcome)--> succeeded | succeeded_with_errors | failed
      |                 |  ^ \\--fail--> failed
      |                 |  |  \\--requeue--> queued       (infrastructure failure)
      |                 |  \\--lease_expired_claim--       (another worker resumes it)
      \\--cancel--> cancelled <--cancel--/

``succeeded``, ``succeeded_with_errors``, ``failed`` and ``cancelled`` are terminal.

Stratum lifecycle: every stratum starts ``pending``; storing a result sets it to the
result's status (``succeeded``, ``not_converged`` or ``failed``). A stored result may be
overwritten by a retry (the store upserts), so any result status may follow any other.
An infrastructure error leaves the stratum ``pending``.
"""
from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from storage.errors import InvalidTransition

__all__ = [
    "JobStatus",
    "JobEvent",
    "StratumStatus",
    "TERMINAL_JOB_STATUSES",
    "COMPLETION_STATUSES",
    "RESULT_STATUSES",
    "FITTED_STATUSES",
    "next_job_status",
    "next_stratum_status",
    "final_job_status",
    "final_job_message",
]


class JobStatus(StrEnum):
    """Status of a job (stored as its string value)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    SUCCEEDED_WITH_ERRORS = "succeeded_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"


class JobEvent(StrEnum):
    """Events that move a job between statuses."""

    CLAIM = "claim"
    LEASE_EXPIRED_CLAIM = "lease_expired_claim"
    COMPLETE = "complete"
    CANCEL = "cancel"
    REQUEUE = "requeue"
    FAIL = "fail"


class StratumStatus(StrEnum):
    """Status of one stratum in the ledger."""

    PENDING = "pending"
    SUCCEEDED = "succeeded"
    NOT_CONVERGED = "not_converged"
    FAILED = "failed"


#: Statuses a job never leaves.
TERMINAL_JOB_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.SUCCEEDED_WITH_ERRORS, JobStatus.FAILED, JobStatus.CANCELLED}
)
#: Outcomes of the ``complete`` event.
COMPLETION_STATUSES = frozenset(
    {JobStatus.SUCCEEDED, JobStatus.SUCCEEDED_WITH_ERRORS, JobStatus.FAILED}
)
#: Stratum statuses a :class:`~storage.records.StratumResult` may carry.
RESULT_STATUSES = frozenset(
    {StratumStatus.SUCCEEDED, StratumStatus.NOT_CONVERGED, StratumStatus.FAILED}
)
#: Stratum statuses with estimates stored (a non-converged fit is stored, flagged).
FITTED_STATUSES = frozenset({StratumStatus.SUCCEEDED, StratumStatus.NOT_CONVERGED})

_JOB_TRANSITIONS: dict[tuple[JobStatus, JobEvent], JobStatus | None] = {
    (JobStatus.QUEUED, JobEvent.CLAIM): JobStatus.RUNNING,
    (JobStatus.QUEUED, JobEvent.CANCEL): JobStatus.CANCELLED,
    (JobStatus.RUNNING, JobEvent.LEASE_EXPIRED_CLAIM): JobStatus.RUNNING,
    (JobStatus.RUNNING, JobEvent.COMPLETE): None,  # the outcome decides
    (JobStatus.RUNNING, JobEvent.FAIL): JobStatus.FAILED,
    (JobStatus.RUNNING, JobEvent.REQUEUE): JobStatus.QUEUED,
    (JobStatus.RUNNING, JobEvent.CANCEL): JobStatus.CANCELLED,
}


def _parse(enum: type[StrEnum], value: str, what: str) -> StrEnum:
    try:
        return enum(value)
    except ValueError:
        valid = ", ".join(m.value for m in enum)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None


def next_job_status(
    current: JobStatus | str,
    event: JobEvent | str,
    outcome: JobStatus | str | None = None,
) -> JobStatus:
    """Return the status a job moves to when ``event`` happens in status ``current``.

    Parameters
    ----------
    current : JobStatus or str
        The job's status now.
    event : JobEvent or str
        ``claim``, ``lease_expired_claim``, ``complete``, ``cancel``, ``requeue`` or
        ``fail``.
    outcome : JobStatus or str, optional
        Required for ``complete``: ``succeeded``, ``succeeded_with_errors`` or ``failed``
        (usually from :func:`final_job_status`). Ignored for other events.

    Returns
    -------
    JobStatus
        The new status.

    Raises
    ------
    InvalidTransition
        If ``event`` is not allowed in ``current`` (e.g. anything on a terminal job), or
        ``complete`` is given an outcome that is not a completion status.
    ValueError
        If ``current``, ``event`` or ``outcome`` is not a known name.
    """
    cur = _parse(JobStatus, current, "job status")
    ev = _parse(JobEvent, event, "job event")
    key = (cur, ev)
    if key not in _JOB_TRANSITIONS:
        raise InvalidTransition(f"job cannot {ev.value!r} when {cur.value!r}")
    new = _JOB_TRANSITIONS[key]
    if new is not None:
        return new
    if outcome is None:
        raise InvalidTransition("event 'complete' needs an outcome status")
    out = _parse(JobStatus, outcome, "job status")
    if out not in COMPLETION_STATUSES:
        valid = ", ".join(sorted(s.value for s in COMPLETION_STATUSES))
        raise InvalidTransition(f"'complete' outcome must be one of {valid}, not {out.value!r}")
    return out


def next_stratum_status(current: StratumStatus | str, result_status: str | None) -> StratumStatus:
    """Return a stratum's status after a result (or an infrastructure error) arrives.

    Parameters
    ----------
    current : StratumStatus or str
        The stratum's status now.
    result_status : str or None
        A :class:`~storage.records.StratumResult` status (``succeeded``,
        ``not_converged``, ``failed``), or None for an infrastructure error (the stratum
        was not fitted and will be retried).

    Returns
    -------
    StratumStatus
        The new status: the result's status, or ``current`` for an infrastructure error.

    Raises
    ------
    InvalidTransition
        If ``result_status`` is ``pending`` (a result cannot un-fit a stratum).
    ValueError
        If a name is unknown.
    """
    cur = _parse(StratumStatus, current, "stratum status")
    if result_status is None:
        return cur
    new = _parse(StratumStatus, result_status, "stratum status")
    if new not in RESULT_STATUSES:
        valid = ", ".join(sorted(s.value for s in RESULT_STATUSES))
        raise InvalidTransition(f"a result status must be one of {valid}, not {new.value!r}")
    return new


def _counts(counts: Mapping[str, int]) -> dict[StratumStatus, int]:
    out = {s: 0 for s in StratumStatus}
    for name, n in counts.items():
        if name == "total":
            continue
        out[_parse(StratumStatus, name, "stratum status")] += int(n)
    return out


def final_job_status(counts: Mapping[str, int]) -> JobStatus:
    """Return a finished job's status from its ledger counts.

    Parameters
    ----------
    counts : mapping of str to int
        Number of strata per :class:`StratumStatus` name (missing names count 0; a
        ``"total"`` entry is ignored). Strata still ``pending`` when the job finishes
        count as not fitted.

    Returns
    -------
    JobStatus
        ``succeeded`` if every stratum succeeded; ``succeeded_with_errors`` if at least
        one stratum was fitted (``succeeded`` or ``not_converged``) but not all
        succeeded; ``failed`` if none was fitted, including a job with zero strata.
    """
    c = _counts(counts)
    total = sum(c.values())
    fitted = sum(c[s] for s in FITTED_STATUSES)
    if total == 0 or fitted == 0:
        return JobStatus.FAILED
    if c[StratumStatus.SUCCEEDED] == total:
        return JobStatus.SUCCEEDED
    return JobStatus.SUCCEEDED_WITH_ERRORS


def final_job_message(counts: Mapping[str, int]) -> str:
    """Return a one-line human summary matching :func:`final_job_status`.

    Parameters
    ----------
    counts : mapping of str to int
        As for :func:`final_job_status`.

    Returns
    -------
    str
        E.g. ``"no strata to fit"`` or ``"8 of 10 strata fitted (1 not converged,
        1 failed)"``.
    """
    c = _counts(counts)
    total = sum(c.values())
    if total == 0:
        return "no strata to fit"
    fitted = sum(c[s] for s in FITTED_STATUSES)
    problems = [
        f"{c[s]} {s.value.replace('_', ' ')}"
        for s in (StratumStatus.NOT_CONVERGED, StratumStatus.FAILED, StratumStatus.PENDING)
        if c[s]
    ]
    tail = f" ({', '.join(problems)})" if problems else ""
    return f"{fitted} of {total} strata fitted{tail}"

"""Pure state-machine tests (no I/O)."""
from __future__ import annotations

import itertools

import pytest

from storage.errors import InvalidTransition
from storage.states import (
    TERMINAL_JOB_STATUSES,
    JobEvent,
    JobStatus,
    StratumStatus,
    final_job_message,
    final_job_status,
    next_job_status,
    next_stratum_status,
)

ALLOWED = [
    ("queued", "claim", None, "running"),
    ("queued", "cancel", None, "cancelled"),
    ("running", "lease_expired_claim", None, "running"),
    ("running", "complete", "succeeded", "succeeded"),
    ("running", "complete", "succeeded_with_errors", "succeeded_with_errors"),
    ("running", "complete", "failed", "failed"),
    ("running", "fail", None, "failed"),
    ("running", "requeue", None, "queued"),
    ("running", "cancel", None, "cancelled"),
]


@pytest.mark.parametrize(("current", "event", "outcome", "expected"), ALLOWED)
def test_allowed_job_transitions(current, event, outcome, expected):
    assert next_job_status(current, event, outcome) == expected
    assert next_job_status(JobStatus(current), JobEvent(event), outcome) is JobStatus(expected)


def _forbidden():
    allowed = {(c, e) for c, e, _, _ in ALLOWED}
    for status, event in itertools.product(JobStatus, JobEvent):
        if (status.value, event.value) not in allowed:
            yield status.value, event.value


@pytest.mark.parametrize(("current", "event"), list(_forbidden()))
def test_forbidden_job_transitions(current, event):
    with pytest.raises(InvalidTransition):
        next_job_status(current, event, "succeeded")


def test_terminal_statuses_accept_no_event():
    for status, event in itertools.product(TERMINAL_JOB_STATUSES, JobEvent):
        with pytest.raises(InvalidTransition):
            next_job_status(status, event, "succeeded")


@pytest.mark.parametrize("outcome", [None, "queued", "running", "cancelled"])
def test_complete_needs_a_completion_outcome(outcome):
    with pytest.raises(InvalidTransition):
        next_job_status("running", "complete", outcome)


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError, match="valid: queued, running"):
        next_job_status("bogus", "claim")
    with pytest.raises(ValueError, match="valid: claim"):
        next_job_status("queued", "explode")


@pytest.mark.parametrize(
    ("current", "result", "expected"),
    [
        ("pending", "succeeded", "succeeded"),
        ("pending", "not_converged", "not_converged"),
        ("pending", "failed", "failed"),
        ("succeeded", "failed", "failed"),  # a retry overwrites
        ("failed", "succeeded", "succeeded"),
        ("pending", None, "pending"),  # infrastructure error: stays pending
        ("succeeded", None, "succeeded"),
    ],
)
def test_stratum_transitions(current, result, expected):
    assert next_stratum_status(current, result) == expected


def test_stratum_result_cannot_be_pending():
    with pytest.raises(InvalidTransition):
        next_stratum_status("pending", "pending")
    with pytest.raises(ValueError):
        next_stratum_status("pending", "converged")


@pytest.mark.parametrize(
    ("counts", "expected", "message"),
    [
        ({"succeeded": 5}, "succeeded", "5 of 5 strata fitted"),
        ({"succeeded": 4, "failed": 1}, "succeeded_with_errors", "4 of 5 strata fitted (1 failed)"),
        (
            {"succeeded": 3, "not_converged": 1, "failed": 1},
            "succeeded_with_errors",
            "4 of 5 strata fitted (1 not converged, 1 failed)",
        ),
        ({"not_converged": 2}, "succeeded_with_errors", "2 of 2 strata fitted (2 not converged)"),
        ({"failed": 3}, "failed", "0 of 3 strata fitted (3 failed)"),
        ({"pending": 2}, "failed", "0 of 2 strata fitted (2 pending)"),
        (
            {"succeeded": 1, "pending": 1},
            "succeeded_with_errors",
            "1 of 2 strata fitted (1 pending)",
        ),
        ({}, "failed", "no strata to fit"),
        ({"succeeded": 0, "failed": 0, "total": 0}, "failed", "no strata to fit"),
        ({"succeeded": 2, "total": 2}, "succeeded", "2 of 2 strata fitted"),
    ],
)
def test_final_job_status(counts, expected, message):
    assert final_job_status(counts) == expected
    assert final_job_message(counts) == message


def test_final_job_status_rejects_unknown_status():
    with pytest.raises(ValueError, match="stratum status"):
        final_job_status({"done": 1})


def test_enum_values_are_strings():
    assert JobStatus.SUCCEEDED_WITH_ERRORS == "succeeded_with_errors"
    assert {s.value for s in StratumStatus} == {"pending", "succeeded", "not_converged", "failed"}

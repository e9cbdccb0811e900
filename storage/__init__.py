"""stratafit storage: the durable job queue, the strata ledger and the result tables.

The only package that imports SQLAlchemy. The service talks to it through
:class:`~storage.store.Store` and the plain records of :mod:`storage.records`.
"""
from storage import errors, records, states
from storage.errors import (
    InvalidRecordError,
    InvalidTransition,
    JobNotFound,
    StaleAttemptError,
    StorageError,
)
from storage.records import JobRecord, StratumPlan, StratumResult
from storage.states import JobStatus, StratumStatus
from storage.store import TABLES, Store

__all__ = [
    "Store",
    "TABLES",
    "records",
    "states",
    "errors",
    "JobRecord",
    "StratumPlan",
    "StratumResult",
    "JobStatus",
    "StratumStatus",
    "StorageError",
    "StaleAttemptError",
    "JobNotFound",
    "InvalidTransition",
    "InvalidRecordError",
]

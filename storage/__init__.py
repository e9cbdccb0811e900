"""stratafit storage: the durable job queue, the strata ledger and the result tables.

The only package that imports SQLAlchemy. The service talks to it through
:class:`~storage.store.Store` and the plain records of :mod:`storage.records`.

:class:`Store` and :data:`TABLES` are imported on first access (PEP 562): a Dask worker
needs only the plain records (``storage.records``), and importing SQLAlchemy, Alembic
and pandas' SQL layer for them cost every worker process ~0.4 s of its start-up.
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

_LAZY = {"Store": "storage.store", "TABLES": "storage.store"}


def __getattr__(name: str):
    """``storage.Store`` / ``storage.TABLES``: import :mod:`storage.store` when asked."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'storage' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value

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

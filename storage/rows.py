"""Validate :class:`~storage.records.StratumResult` records and turn them into table rows.

Pure functions (no database access): everything a result could get wrong is caught here,
before a write transaction starts, and reported as
:class:`~storage.errors.InvalidRecordError` naming the stratum and the culprit.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from storage.engine import json_dumps, to_python
from storage.errors import InvalidRecordError
from storage.records import StratumPlan, StratumResult
from storage.states import FITTED_STATUSES, StratumStatus, next_stratum_status

__all__ = [
    "FIT_COLUMNS",
    "COEFFICIENT_COLUMNS",
    "VARIANCE_COLUMNS",
    "RANEF_COLUMNS",
    "ERROR_CLASS_MAX",
    "PreparedResult",
    "prepare_results",
    "strata_rows",
]

#: Keys a result's ``fit`` dict may carry (missing keys are stored as NULL).
FIT_COLUMNS: tuple[str, ...] = (
    "nobs", "ngroups", "loglik", "aic", "bic", "deviance", "converged", "singular",
    "max_grad", "evaluations", "elapsed", "warnings", "optinfo", "formula", "family",
    "link", "method", "reml", "sigma", "hessian_pd",
)
#: Keys of a coefficient row (``term`` required).
COEFFICIENT_COLUMNS: tuple[str, ...] = (
    "term", "estimate", "std_error", "statistic", "p_value", "conf_low", "conf_high",
)
#: Keys of a variance-component row (``grp`` required; ``term2`` None for a variance).
VARIANCE_COLUMNS: tuple[str, ...] = ("grp", "term1", "term2", "variance", "sd", "correlation")
#: Keys of a random-effect row (``grp``, ``level``, ``term`` required).
RANEF_COLUMNS: tuple[str, ...] = ("grp", "level", "term", "mode", "cond_sd")
#: Longest stored ``error_class`` (longer names are truncated).
ERROR_CLASS_MAX = 255

_INT_COLUMNS = frozenset({"nobs", "evaluations", "nrows"})
_BOOL_COLUMNS = frozenset({"converged", "singular", "reml", "hessian_pd"})
_TEXT_COLUMNS = frozenset(
    {"formula", "family", "link", "method", "term", "grp", "level", "term1", "term2"}
)
_JSON_COLUMNS = frozenset({"ngroups", "warnings", "optinfo"})


@dataclass(frozen=True)
class PreparedResult:
    """A validated result: the ledger update plus fit and child rows (without ids)."""

    key: str
    status: str
    fit: dict[str, Any] | None
    coefficients: list[dict[str, Any]]
    variance: list[dict[str, Any]]
    ranef: list[dict[str, Any]]
    error_class: str | None
    error_message: str | None


def _check_json(value: Any, where: str) -> Any:
    """Fail here, naming the culprit, rather than mid-transaction."""
    try:
        json_dumps(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"{where}: not JSON-serialisable: {exc}") from None
    return value


def _convert(column: str, value: Any, where: str) -> Any:
    value = to_python(value)
    if value is None:
        return None
    if column in _JSON_COLUMNS:
        return _check_json(value, f"{where}: column {column!r}")
    try:
        if column in _INT_COLUMNS:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value!r} is not an integer")
            return int(value)
        if column in _BOOL_COLUMNS:
            return bool(value)
        if column in _TEXT_COLUMNS:
            return str(value)
    except (TypeError, ValueError) as exc:
        raise InvalidRecordError(f"{where}: column {column!r}: {exc}") from None
    return value  # float columns: FiniteFloat converts and maps NaN/inf to NULL


def _row(
    data: Mapping[str, Any], columns: Sequence[str], required: Sequence[str], where: str
) -> dict[str, Any]:
    if not isinstance(data, Mapping):
        raise InvalidRecordError(f"{where}: expected a dict, got {type(data).__name__}")
    unknown = sorted(set(data) - set(columns))
    if unknown:
        raise InvalidRecordError(
            f"{where}: unknown column(s) {unknown}; valid: {', '.join(columns)}"
        )
    row = {c: _convert(c, data.get(c), where) for c in columns}
    missing = [c for c in required if row[c] is None]
    if missing:
        raise InvalidRecordError(f"{where}: missing required column(s) {missing}")
    return row


def _prepare(result: StratumResult, store_random_effects: bool) -> PreparedResult:
    where = f"stratum {result.key!r}"
    try:
        status = next_stratum_status(StratumStatus.PENDING, result.status).value
    except ValueError as exc:  # InvalidTransition is a ValueError too
        raise InvalidRecordError(f"{where}: {exc}") from None
    fitted = status in FITTED_STATUSES
    if fitted and result.fit is None:
        raise InvalidRecordError(f"{where}: status {status!r} needs a 'fit' dict")
    if not fitted and (result.fit is not None or result.coefficients or result.variance
                       or result.ranef):
        raise InvalidRecordError(f"{where}: a 'failed' result carries no estimates")
    fit = _row(result.fit, FIT_COLUMNS, (), f"{where} fit") if fitted else None
    coefs = [
        _row(r, COEFFICIENT_COLUMNS, ("term",), f"{where} coefficients[{i}]")
        for i, r in enumerate(result.coefficients)
    ]
    variance = [
        _row(r, VARIANCE_COLUMNS, ("grp",), f"{where} variance[{i}]")
        for i, r in enumerate(result.variance)
    ]
    ranef = (
        [
            _row(r, RANEF_COLUMNS, ("grp", "level", "term"), f"{where} ranef[{i}]")
            for i, r in enumerate(result.ranef)
        ]
        if store_random_effects
        else []
    )
    error_class = result.error_class
    if error_class is not None:
        error_class = str(error_class)[:ERROR_CLASS_MAX]
    error_message = None if result.error_message is None else str(result.error_message)
    return PreparedResult(
        result.key, status, fit, coefs, variance, ranef, error_class, error_message
    )


def prepare_results(
    results: Sequence[StratumResult], *, store_random_effects: bool = True
) -> list[PreparedResult]:
    """Validate results and convert them to rows; a repeated key keeps its last result.

    Parameters
    ----------
    results : sequence of StratumResult
    store_random_effects : bool, default True
        If False, random-effect rows are dropped.

    Returns
    -------
    list of PreparedResult
        In input order of each key's last occurrence.

    Raises
    ------
    InvalidRecordError
        If any result breaks the contract of :class:`~storage.records.StratumResult`.
    """
    last: dict[str, PreparedResult] = {}
    for result in results:
        if not isinstance(result, StratumResult):
            raise InvalidRecordError(
                f"expected StratumResult, got {type(result).__name__}"
            )
        prepared = _prepare(result, store_random_effects)
        last.pop(prepared.key, None)
        last[prepared.key] = prepared
    return list(last.values())


def strata_rows(job_id: int, plans: Sequence[StratumPlan], now: datetime) -> list[dict[str, Any]]:
    """Return ``strata`` ledger rows (status ``pending``) for planned strata.

    Parameters
    ----------
    job_id : int
    plans : sequence of StratumPlan
    now : datetime
        The ``updated_at`` timestamp.

    Returns
    -------
    list of dict

    Raises
    ------
    InvalidRecordError
        If a plan's ``values`` are not JSON-serialisable or ``nrows`` is not an integer.
    """
    rows = []
    for plan in plans:
        where = f"stratum {plan.key!r}"
        rows.append(
            {
                "job_id": job_id,
                "key": str(plan.key),
                "values": _check_json(plan.values, f"{where}: values"),
                "nrows": _convert("nrows", plan.nrows, where),
                "status": StratumStatus.PENDING.value,
                "attempts": 0,
                "updated_at": now,
            }
        )
    return rows

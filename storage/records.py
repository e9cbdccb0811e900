"""Plain records passed between :mod:`service` and :mod:`storage`.

No SQLAlchemy here: these are what the service builds from fitted models and what the
storage layer writes (idempotently, one transaction per stratum) and reads back.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["StratumResult", "JobRecord", "StratumPlan", "table_rows"]


@dataclass(frozen=True)
class StratumPlan:
    """One stratum as listed by the planner (before fitting).

    key : str
        Canonical stratum key, e.g. ``"region=north/year=2021"`` (``""`` when the job
        has no strata columns).
    values : dict
        Strata column -> value (JSON-serialisable).
    nrows : int
        Rows in the stratum (after filters).
    """

    key: str
    values: dict[str, Any]
    nrows: int


@dataclass(frozen=True)
class StratumResult:
    """The outcome of fitting one stratum.

    status : str
        ``"succeeded"`` (converged fit), ``"not_converged"`` (fit stored, flagged) or
        ``"failed"`` (no estimates; ``error_class``/``error_message`` say why).
    fit : dict or None
        Columns of the ``fits`` table: nobs, ngroups (JSON dict), loglik, aic, bic,
        deviance, converged, singular, max_grad, evaluations, elapsed, warnings (list),
        optinfo (JSON dict), formula, family, link, method; optionally reml, sigma,
        hessian_pd (``storage.rows.FIT_COLUMNS``). Missing keys are stored as NULL,
        unknown keys are rejected; NaN/inf floats are stored as NULL. Required for
        ``succeeded``/``not_converged``; must be None (and the lists empty) for ``failed``.
    coefficients : list of dict, or dict of columns
        term, estimate, std_error, statistic, p_value, conf_low, conf_high.
    variance : list of dict, or dict of columns
        grp, term1, term2 (None for a variance), variance, sd, correlation.
    ranef : list of dict, or dict of columns
        grp, level, term, mode, cond_sd.

    Notes
    -----
    A child table (``coefficients``, ``variance``, ``ranef``) is given either as rows
    (a list of dicts, one per row, missing keys stored as NULL) or as columns (a dict
    column → list or 1-d NumPy array, all of one length; a missing column is stored as
    NULL). The columnar form is what :mod:`service.convert` produces: it pickles into a
    few objects per column instead of one dict per row and is validated a column at a
    time. Float columns may hold NaN/inf (stored as NULL) in either form.
    :func:`table_rows` gives the rows of either form.
    """

    key: str
    status: str
    fit: dict[str, Any] | None = None
    coefficients: list[dict[str, Any]] = field(default_factory=list)
    variance: list[dict[str, Any]] = field(default_factory=list)
    ranef: list[dict[str, Any]] = field(default_factory=list)
    error_class: str | None = None
    error_message: str | None = None


def table_rows(table: Any) -> list[dict[str, Any]]:
    """The rows of a :class:`StratumResult` child table, whichever form it was given in.

    Parameters
    ----------
    table : list of dict, or dict of columns
        ``result.coefficients``, ``result.variance`` or ``result.ranef``.

    Returns
    -------
    list of dict
        One dict per row (the given dicts themselves for the row form; for the
        columnar form, column → value with NumPy values as Python scalars).
    """
    if not isinstance(table, Mapping):
        return list(table)
    names = [c for c, v in table.items() if v is not None]
    columns = [v.tolist() if hasattr(v, "tolist") else list(v) for v in
               (table[c] for c in names)]
    return [dict(zip(names, row)) for row in zip(*columns)]


@dataclass(frozen=True)
class JobRecord:
    """A job row as the service sees it (immutable snapshot)."""

    id: int
    name: str
    spec: dict[str, Any]
    spec_hash: str
    status: str
    attempt: int
    idempotency_key: str | None
    lease_owner: str | None
    lease_expires_at: Any
    created_at: Any
    started_at: Any
    finished_at: Any
    n_strata: int | None = None
    message: str | None = None
    heartbeat_at: Any = None

"""Plain records passed between :mod:`service` and :mod:`storage`.

No SQLAlchemy here: these are what the service builds from fitted models and what the
storage layer writes (idempotently, one transaction per stratum) and reads back.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["StratumResult", "JobRecord", "StratumPlan"]


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
    coefficients : list of dict
        term, estimate, std_error, statistic, p_value, conf_low, conf_high.
    variance : list of dict
        grp, term1, term2 (None for a variance), variance, sd, correlation.
    ranef : list of dict
        grp, level, term, mode, cond_sd.
    """

    key: str
    status: str
    fit: dict[str, Any] | None = None
    coefficients: list[dict[str, Any]] = field(default_factory=list)
    variance: list[dict[str, Any]] = field(default_factory=list)
    ranef: list[dict[str, Any]] = field(default_factory=list)
    error_class: str | None = None
    error_message: str | None = None


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

"""Separation and degenerate data in binomial (and Poisson) models.

* :func:`detect_separation`: the linear-programming check of Konis (2007), as in R's
  ``safeBinaryRegression`` and ``detectseparation``. With the data expanded into
  successes (``y > 0``) and failures (``y < 1``), the maximum-likelihood estimate is
  infinite exactly when some direction ``b != 0`` has ``x_i'b >= 0`` for every success
  and ``x_i'b <= 0`` for every failure (the likelihood then increases without bound
  along ``b``). Such a direction is found by the LP

  .. math:: \\max_b \\sum_i s_i x_i'b \\quad\\text{s.t.}\\quad s_i x_i'b \\ge 0,\\;
            -1 \\le b_j \\le 1,

  with ``s_i = +1`` for successes and ``-1`` for failures: the optimum is 0 when the
  estimates are finite, positive otherwise. The culprits are an irreducible set of
  columns that still separate the data (columns are dropped, last first, while
  separation persists; one small LP each): every one of them is non-zero along the
  separating direction found, so its estimate diverges. Separation is *complete*
  when a direction makes every inequality strict, *quasi-complete* otherwise.
* :func:`degenerate_groups`: groups of a grouping factor whose outcomes are all 0 (or
  all 1): their conditional modes go to the boundary and carry no information about
  the fixed effects of within-group covariates.
* :func:`penalty_deviance`, :func:`penalty_scales`: an opt-in weak normal prior on the
  non-intercept coefficients (Gelman et al. 2008; rstanarm's default
  ``normal(0, 2.5)`` with autoscaling), which keeps estimates finite under separation.

Reporting a penalised fit
-------------------------
The core optimiser adds ``penalty_deviance(beta, scales)[0]`` to the deviance it
minimises (and its gradient to the gradient). The result is a *penalised*
(maximum a posteriori) estimate, so:

* label the method ``"<method>+penalised"`` and add a diagnostics warning such as
  ``"penalised: normal(0, s_j) prior on <terms>; estimates are shrunk, not MLE"``;
* report ``loglik`` as the *unpenalised* log-likelihood at the penalised estimates
  and, separately, the penalised deviance; AIC/BIC/likelihood-ratio tests of
  penalised fits are not comparable with unpenalised ones;
* standard errors come from the Hessian of the penalised deviance (the penalty adds
  ``diag(2 / s_j**2)``), i.e. the curvature of the posterior mode.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize

__all__ = [
    "SeparationReport",
    "detect_separation",
    "degenerate_groups",
    "penalty_scales",
    "penalty_deviance",
    "DEFAULT_PRIOR_SCALE",
]

#: Prior scale (on a standardised coefficient) of the opt-in penalty.
DEFAULT_PRIOR_SCALE = 2.5
_INTERCEPT = "(Intercept)"


@dataclass(frozen=True)
class SeparationReport:
    """Outcome of :func:`detect_separation`.

    Attributes
    ----------
    separated : bool
        Whether some maximum-likelihood estimate is infinite.
    kind : {"none", "quasi", "complete"}
    terms : tuple of str
        Culprits: an irreducible set of coefficients that separate the outcomes, all
        non-zero along ``direction`` (their estimates diverge). Other coefficients can
        diverge too (under complete separation, all of them do), but only as a
        consequence.
    message : str
    direction : tuple of float
        A separating direction in the original coefficient scale, normalised to max
        abs 1 (empty when not separated); signs tell which way estimates diverge.
    """

    separated: bool
    kind: str
    terms: tuple[str, ...]
    message: str
    direction: tuple[float, ...] = ()


def _expand(X, y, weights):
    """Rows of ``s_i x_i`` (successes +, failures -), deduplicated with counts."""
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    if X.ndim != 2 or X.shape[0] != y.shape[0] or w.shape != y.shape:
        raise ValueError(f"X {X.shape}, y {y.shape} and weights {w.shape} do not conform")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y)) and np.all(np.isfinite(w))):
        raise ValueError("X, y and weights must be finite")
    if np.any((y < 0) | (y > 1)):
        raise ValueError("y must be proportions in [0, 1] (binomial response)")
    use = w > 0
    succ = X[use & (y > 0)]
    fail = X[use & (y < 1)]
    rows = np.vstack([succ, -fail])
    if rows.shape[0] == 0:
        return rows, np.zeros(0)
    uniq, counts = np.unique(rows, axis=0, return_counts=True)
    return uniq, counts.astype(float)


def _lp(c, A, p, extra_bounds=None):
    bounds = [(-1.0, 1.0)] * p if extra_bounds is None else extra_bounds
    res = optimize.linprog(c, A_ub=-A, b_ub=np.zeros(A.shape[0]), bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"separation LP failed: {res.message}")
    return res


def detect_separation(X, y, weights=None, names=None, *, tol: float = 1e-7) -> SeparationReport:
    """Check a binomial fixed-effects design for (quasi-)complete separation.

    Parameters
    ----------
    X : array_like (n, p)
        Fixed-effects model matrix (full column rank, as :class:`~fitting.design.Design`
        holds it).
    y : array_like (n,)
        Proportions of successes in ``[0, 1]`` (0/1 for binary data).
    weights : array_like (n,), optional
        Number of trials (rows with weight 0 are ignored). Rows with ``0 < y < 1``
        count as both a success and a failure.
    names : sequence of str, optional
        Column names (default ``x0, x1, ...``).
    tol : float
        Threshold on the LP optimum and direction components, relative to the
        column-scaled problem.

    Returns
    -------
    SeparationReport

    Notes
    -----
    The columns of ``X`` are scaled to max abs 1 before solving, which changes neither
    the answer nor which coefficients diverge. A random-effects term does not remove
    separation in the fixed effects (the fixed effects still diverge), so checking the
    fixed-effects design alone is the relevant test for a GLMM too; within-group
    separation of a random effect shows up as degenerate groups instead
    (:func:`degenerate_groups`).
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D, got shape {X.shape}")
    p = X.shape[1]
    names = tuple(f"x{j}" for j in range(p)) if names is None else tuple(names)
    if len(names) != p:
        raise ValueError(f"{len(names)} names for {p} columns")
    if p == 0:
        return SeparationReport(False, "none", (), "no fixed effects")
    colscale = np.max(np.abs(X), axis=0)
    colscale[colscale == 0] = 1.0
    A, counts = _expand(X / colscale, y, weights)
    if A.shape[0] == 0:
        return SeparationReport(False, "none", (), "no observations with positive weight")
    # 1. is there a separating direction?
    obj = counts @ A
    res = _lp(-obj, A, p)
    b = res.x
    total = counts.sum()
    if -res.fun <= tol * total or np.max(np.abs(b)) <= tol:
        return SeparationReport(False, "none", (), "no separation: all estimates are finite")
    # 2. complete separation: a direction making every inequality strict (t > 0)
    Ac = np.hstack([A, -np.ones((A.shape[0], 1))])
    c = np.zeros(p + 1)
    c[-1] = -1.0
    rc = _lp(c, Ac, p + 1, extra_bounds=[(-1.0, 1.0)] * p + [(None, 1.0)])
    complete = -rc.fun > tol
    # 3. culprits: an irreducible set of columns that still separates (completely, if
    # the separation is complete), found by dropping columns, last first (so the
    # intercept is kept in preference), while separation of that kind persists; every
    # column of the set is non-zero along its separating direction
    keep = np.ones(p, dtype=bool)
    cone = rc.x[:p] if complete else b
    for j in range(p - 1, -1, -1):
        trial = keep.copy()
        trial[j] = False
        if not trial.any():
            continue
        bounds = [(-1.0, 1.0) if t else (0.0, 0.0) for t in trial]
        if complete:
            rj = _lp(c, Ac, p + 1, extra_bounds=bounds + [(None, 1.0)])
            ok = -rj.fun > tol
        else:
            rj = _lp(-obj, A, p, extra_bounds=bounds)
            ok = -rj.fun > tol * total and np.max(np.abs(rj.x)) > tol
        if ok:
            keep, cone = trial, rj.x[:p]
    culprit = keep & (np.abs(cone) > tol)
    direction = cone / colscale
    direction = direction / np.max(np.abs(direction))
    terms = tuple(n for n, cflag in zip(names, culprit) if cflag)
    kind = "complete" if complete else "quasi"
    signs = ", ".join(
        f"{n} -> {'+' if d > 0 else '-'}inf" if abs(d) > tol else f"{n} (diverges)"
        for n, d, cflag in zip(names, direction, culprit) if cflag
    )
    if complete:
        msg = (
            f"complete separation: {signs} separate successes from failures perfectly; "
            "no coefficient has a finite maximum-likelihood estimate"
        )
    else:
        msg = f"quasi-complete separation: the maximum-likelihood estimates of {signs} are infinite"
    msg += "; remove or merge the offending terms, or use a penalised fit (penalty_deviance)"
    return SeparationReport(True, kind, terms, msg, tuple(float(d) for d in direction))


def degenerate_groups(y, weights, codes, n_levels: int, family: str = "binomial") -> dict:
    """Count groups whose outcomes are all 0 (or all 1, binomial).

    Parameters
    ----------
    y : array_like (n,)
        Binomial proportions or Poisson counts.
    weights : array_like (n,) or None
        Prior weights (trials for binomial); rows with weight 0 are ignored.
    codes : array_like of int (n,)
        Group index of each row, in ``range(n_levels)``.
    n_levels : int
    family : {"binomial", "poisson"}
        For Poisson only all-zero groups are degenerate.

    Returns
    -------
    dict
        ``n_groups``, ``n_empty`` (no rows with positive weight), ``n_all_zero``,
        ``n_all_one`` (0 for Poisson), ``n_degenerate`` (all-zero + all-one),
        ``fraction_degenerate`` (of non-empty groups), ``all_zero`` and ``all_one``
        (sorted group indices), ``message``.
    """
    y = np.asarray(y, dtype=float)
    w = np.ones_like(y) if weights is None else np.asarray(weights, dtype=float)
    codes = np.asarray(codes, dtype=np.int64)
    if y.shape != w.shape or y.shape != codes.shape:
        raise ValueError(f"y {y.shape}, weights {w.shape} and codes {codes.shape} do not conform")
    if codes.size and (codes.min() < 0 or codes.max() >= n_levels):
        raise ValueError(f"codes must lie in [0, {n_levels})")
    fam = str(family).lower()
    if fam not in ("binomial", "poisson"):
        raise ValueError(f"family must be 'binomial' or 'poisson', got {family!r}")
    use = w > 0
    nrows = np.bincount(codes, weights=use.astype(float), minlength=n_levels)
    total = np.bincount(codes, weights=np.where(use, w * y, 0.0), minlength=n_levels)
    present = nrows > 0
    eps = 1e-8
    all_zero = present & (total <= eps)
    if fam == "binomial":
        fails = np.bincount(codes, weights=np.where(use, w * (1.0 - y), 0.0), minlength=n_levels)
        all_one = present & (fails <= eps)
    else:
        all_one = np.zeros(n_levels, dtype=bool)
    n_present = int(present.sum())
    n_deg = int(all_zero.sum() + all_one.sum())
    frac = n_deg / n_present if n_present else 0.0
    what = "all 0 or all 1" if fam == "binomial" else "all 0"
    msg = f"{n_deg} of {n_present} groups have outcomes {what}"
    return {
        "n_groups": int(n_levels),
        "n_empty": int(n_levels - n_present),
        "n_all_zero": int(all_zero.sum()),
        "n_all_one": int(all_one.sum()),
        "n_degenerate": n_deg,
        "fraction_degenerate": float(frac),
        "all_zero": np.flatnonzero(all_zero).tolist(),
        "all_one": np.flatnonzero(all_one).tolist(),
        "message": msg,
    }


def penalty_scales(X, names=None, scale: float = DEFAULT_PRIOR_SCALE) -> np.ndarray:
    """Per-coefficient prior sds ``scale / sd(x_j)`` (rstanarm-style autoscaling).

    The intercept (a column named ``"(Intercept)"``, or any constant column) gets
    ``inf``: it is not penalised. A prior sd of ``scale`` on the coefficient of a
    standardised predictor is ``scale / sd(x_j)`` on the raw one.

    Parameters
    ----------
    X : array_like (n, p)
    names : sequence of str, optional
    scale : float

    Returns
    -------
    ndarray (p,)
    """
    X = np.asarray(X, dtype=float)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale!r}")
    sd = X.std(axis=0, ddof=1) if X.shape[0] > 1 else np.zeros(X.shape[1])
    out = np.full(X.shape[1], np.inf)
    ok = sd > 0
    out[ok] = scale / sd[ok]
    if names is not None:
        for j, n in enumerate(names):
            if n == _INTERCEPT:
                out[j] = np.inf
    return out


def penalty_deviance(beta, scale=DEFAULT_PRIOR_SCALE, *, names=None, penalized=None):
    """Deviance penalty ``sum_j (beta_j / s_j)**2`` of independent normal priors.

    ``-2 log`` of ``prod_j N(beta_j; 0, s_j^2)`` up to a constant; add it to the
    deviance (``-2 loglik``) to get a penalised (MAP) fit that stays finite under
    separation. Its Hessian is ``diag(2 / s_j**2)``.

    Parameters
    ----------
    beta : array_like (p,)
    scale : float or array_like (p,)
        Prior sds ``s_j`` (``inf`` = unpenalised); see :func:`penalty_scales`.
    names : sequence of str, optional
        Coefficient names; ``"(Intercept)"`` is not penalised.
    penalized : array_like of bool (p,), optional
        Explicit mask of penalised coefficients (overrides ``names``).

    Returns
    -------
    penalty : float
    gradient : ndarray (p,)
    """
    beta = np.asarray(beta, dtype=float)
    s = np.broadcast_to(np.asarray(scale, dtype=float), beta.shape).copy()
    if np.any(~(s > 0)):
        raise ValueError("prior scales must be positive (inf = unpenalised)")
    mask = np.ones(beta.shape, dtype=bool)
    if penalized is not None:
        mask = np.asarray(penalized, dtype=bool)
        if mask.shape != beta.shape:
            raise ValueError(f"penalized has shape {mask.shape}, beta {beta.shape}")
    elif names is not None:
        if len(names) != beta.size:
            raise ValueError(f"{len(names)} names for {beta.size} coefficients")
        mask = np.array([n != _INTERCEPT for n in names], dtype=bool)
    prec = np.where(mask & np.isfinite(s), 1.0 / (s * s), 0.0)
    return float(np.sum(prec * beta * beta)), 2.0 * prec * beta

"""Post-fit checks of binomial/Poisson GLMMs: Laplace adequacy, separation, degenerate groups.

Run by :func:`fitting.fit` after the Laplace fit (each a named validator with its own
``control`` switch, lme4 style); each adds a field of :class:`~fitting.result.Diagnostics`
and, when it finds a problem, a warning text:

:func:`check_laplace`
    One grouping factor only: the log-likelihood at the estimates by adaptive quadrature
    (``nagq`` nodes) against Laplace, both warm-started at the fit's conditional modes
    (two vectorised evaluations, ~0.3-1 ms on cbpp/Contraception, i.e. ~5-12% of the fit).
    Flagged when the change exceeds :data:`ADEQUACY_THRESHOLD` = 0.5 (``"AGQ would move
    the log-likelihood by X; consider method='agq'"``); the value is always recorded.
    ``control["check_laplace"]``: ``True`` (default) / ``False``.
:func:`check_separation`
    Binomial fits: the linear-programming check of
    :func:`fitting.separation.detect_separation` (5-10 ms, more than a Contraception fit,
    so not run always). Run when ``control["check_separation"]`` is ``True``, never when
    ``False``, and by default (``None``) only when the fit looks separated: some
    ``|beta| > 10`` with ``|beta / se| < 1``, a non-finite or huge (> 100) standard error,
    or a fit that did not converge; and always for penalised fits.
:func:`check_degenerate`
    Counts per grouping factor of groups whose outcomes are all 0 (or all 1): vectorised
    ``bincount``s, always run.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .agq import agq_loglik, lambda_matrix, prepare_agq
from .errors import FittingError
from .quadrature import MAX_GRID_POINTS
from .separation import degenerate_groups, detect_separation

__all__ = ["run_checks", "check_laplace", "check_separation", "check_degenerate",
           "looks_separated", "ADEQUACY_NAGQ", "ADEQUACY_THRESHOLD"]

#: nodes per dimension of the adequacy check (5 is within 1e-3 of 25 on the reference data)
ADEQUACY_NAGQ = 5
#: a Laplace → AGQ log-likelihood change above this is flagged (and warned about): a
#: deviance change of 1, enough to move a likelihood-ratio test; the reference data sets
#: change by 0.04 (cbpp) and 0.13 (Contraception), with estimates moving by ~1e-3
ADEQUACY_THRESHOLD = 0.5
_BIG_BETA, _SMALL_Z, _HUGE_SE = 10.0, 1.0, 100.0
_MAX_LISTED = 20


def _spherical_modes(fit, data):
    """The fit's conditional modes as spherical ``u`` (m, k) in AGQ layout, or None.

    With one grouping factor ``fit.ranef`` holds, term column by term column (lme4 order
    = formula order), the ``m`` modes ``b = Λu`` in level order.
    """
    m, k = data.n_groups, data.k
    rf = fit.ranef
    if len(rf) != m * k:
        return None
    b = rf["mode"].to_numpy(float).reshape(k, m).T
    lam = lambda_matrix(fit.theta, data.blocks)
    if k == 1:
        u = b / lam[0, 0] if lam[0, 0] > 0 else np.zeros_like(b)
    else:
        u = np.linalg.lstsq(lam, b.T, rcond=None)[0].T
    return u if np.all(np.isfinite(u)) else None


def check_laplace(fit, design, family, *, nagq: int = ADEQUACY_NAGQ,
                  threshold: float = ADEQUACY_THRESHOLD, data=None) -> dict | None:
    """Laplace vs adaptive quadrature at the fit's estimates (one grouping factor).

    Parameters
    ----------
    fit : FitResult
        A Laplace fit of ``design``.
    design : Design
    family : Family
    nagq : int
        Nodes per dimension for a scalar term; 3 for vector-valued terms (``3**k``
        points), lower if needed to stay within :data:`fitting.quadrature.MAX_GRID_POINTS`.
    threshold : float
    data : AGQData, optional
        ``prepare_agq(design)`` if already built.

    Returns
    -------
    dict or None
        The keys of :func:`fitting.agq.laplace_adequacy` (``loglik_laplace, loglik_agq,
        nagq, difference, abs_difference, threshold, flag, worst_groups, message``);
        ``worst_groups`` are level labels. None when not applicable (several grouping
        factors, a Gaussian family).
    """
    if family.estimates_scale or len({t.group for t in design.re_terms}) != 1:
        return None
    try:
        data = prepare_agq(design) if data is None else data
    except FittingError:
        return None
    if data.k > 1:
        nagq = min(nagq, 3)  # 3**k points: a screen, keeps the check cheap for vector terms
    while nagq > 1 and nagq ** data.k > MAX_GRID_POINTS:
        nagq -= 2
    if nagq <= 1:
        return None
    u0 = _spherical_modes(fit, data)
    l1, p1, u = agq_loglik(data, family, fit.theta, fit.beta, 1, u0=u0)
    lq, pq, _ = agq_loglik(data, family, fit.theta, fit.beta, nagq, u0=u)
    diff = float(lq - l1)
    flag = bool(abs(diff) > threshold)
    worst = np.argsort(-np.abs(pq - p1))[:5]
    msg = (f"log-likelihood changes by {diff:+.4g} from Laplace to nAGQ={nagq}"
           + ("; consider method='agq'" if flag else "; Laplace is adequate"))
    return {"loglik_laplace": float(l1), "loglik_agq": float(lq), "nagq": int(nagq),
            "difference": diff, "abs_difference": abs(diff), "threshold": float(threshold),
            "flag": flag, "worst_groups": [data.levels[i] for i in worst], "message": msg}


def looks_separated(fit) -> bool:
    """Cheap screen for separation: large ``|beta|`` with tiny ``|z|``, huge SEs, no convergence."""
    est = fit.fixed["estimate"].to_numpy(float)
    se = fit.fixed["std_error"].to_numpy(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(est / se)
    return bool(not fit.diagnostics.converged
                or np.any(~np.isfinite(se)) or np.any(se > _HUGE_SE)
                or np.any((np.abs(est) > _BIG_BETA) & ~(z >= _SMALL_Z)))


def check_separation(design) -> dict:
    """:func:`fitting.separation.detect_separation` on the fixed-effects design, as a dict."""
    rep = detect_separation(design.X, design.y, design.weights, design.x_names)
    return {"separated": rep.separated, "kind": rep.kind, "terms": list(rep.terms),
            "message": rep.message, "direction": list(rep.direction)}


def check_degenerate(design, family_name: str) -> dict:
    """Per grouping factor: counts of groups with all-0 (all-1) outcomes.

    Returns
    -------
    dict
        Grouping factor -> the dict of :func:`fitting.separation.degenerate_groups`,
        with ``all_zero``/``all_one`` as level labels (at most 20 listed).
    """
    out = {}
    for t in design.re_terms:
        if t.group in out:
            continue
        d = degenerate_groups(design.y, design.weights, t.codes, len(t.levels), family_name)
        for key in ("all_zero", "all_one"):
            d[key] = [t.levels[i] for i in d[key][:_MAX_LISTED]]
        out[t.group] = d
    return out


def run_checks(fit, design, family, ctl) -> object:
    """Add the post-fit checks to a binomial/Poisson GLMM fit's diagnostics.

    Parameters
    ----------
    fit : FitResult
    design : Design
    family : Family
    ctl : dict
        Checked control dict (keys ``check_laplace``, ``check_separation``).

    Returns
    -------
    FitResult
        ``fit`` with ``diagnostics`` (and ``optinfo.extra["checks_elapsed"]``) updated.
    """
    if family.name not in ("binomial", "poisson") or not design.re_terms:
        return fit
    t0 = time.perf_counter()
    diag = fit.diagnostics
    warn = list(diag.warnings)
    deg = check_degenerate(design, family.name)
    for g, d in deg.items():
        if d["fraction_degenerate"] >= 0.5:
            warn.append(f"{d['message']} ({g}): their conditional modes sit near the boundary")
    ad = None
    if ctl.get("check_laplace", True) and str(fit.method) == "laplace":
        ad = check_laplace(fit, design, family)
        if ad is not None and ad["flag"]:
            warn.append(f"AGQ would move the log-likelihood by {ad['difference']:+.3g} "
                        f"(nAGQ={ad['nagq']}); consider method='agq'")
    sep = None
    want = ctl.get("check_separation")
    auto = fit.diagnostics.penalized or looks_separated(fit)
    if family.name == "binomial" and (want is True or (want is None and auto)):
        sep = check_separation(design)
        if sep["separated"]:
            hint = "" if fit.diagnostics.penalized else " (fitting.fit(..., control={'penalty': 'normal'}))"
            warn.append(sep["message"] + hint)
    diag = replace(diag, warnings=tuple(dict.fromkeys(warn)), laplace_adequacy=ad, separation=sep,
                   degenerate_groups=deg)
    extra = dict(fit.optinfo.extra)
    extra["checks_elapsed"] = time.perf_counter() - t0
    return replace(fit, diagnostics=diag, optinfo=replace(fit.optinfo, extra=extra))

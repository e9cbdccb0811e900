"""``method="agq"`` of :func:`fitting.fit`: Laplace fit → adaptive quadrature → FitResult.

Stages: :func:`check_agq` validates the request before any fitting (family, one
grouping factor, node count, grid size); the Laplace fit supplies the start;
:func:`fitting.agq.fit_agq` (a fixed node count) or :func:`fitting.agq.auto_nagq`
(``nagq="auto"``: raise the node count until the fit stops changing) maximises the
quadrature log-likelihood; :func:`agq_result` packages the :class:`~fitting.agq.AGQFit`
like a Laplace fit (``method="agq"``, ``nagq`` recorded in the result and in
``optinfo.extra``, log-likelihood with full normalising constants, Wald table from the
finite-difference Hessian over ``(theta, beta)``).
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd

from . import inference
from .agq import AGQData, auto_nagq, fit_agq, prepare_agq
from .errors import FamilyError, FittingError
from .fitcommon import information_criteria, ngroups, vcov_frame
from .quadrature import MAX_GRID_POINTS
from .result import Diagnostics, FitResult, OptInfo
from .structure import build_structure

__all__ = ["check_nagq", "check_agq", "agq_result", "fit_agq_from_laplace"]


def check_nagq(nagq):
    """``control["nagq"]`` as an int >= 1 or ``"auto"`` (None means ``"auto"``).

    Raises
    ------
    ValueError
    """
    if nagq is None:
        return "auto"
    if isinstance(nagq, str):
        if nagq.lower() == "auto":
            return "auto"
        raise ValueError(f"control['nagq'] must be a positive integer or 'auto', got {nagq!r}")
    if isinstance(nagq, bool) or not isinstance(nagq, (int, np.integer)) or nagq < 1:
        raise ValueError(f"control['nagq'] must be a positive integer or 'auto', got {nagq!r}")
    return int(nagq)


def check_agq(design, family, nagq) -> AGQData:
    """Validate an AGQ request before fitting.

    Raises
    ------
    FamilyError
        A family with a scale parameter (Gaussian).
    FittingError
        No random effects, or terms on several grouping factors (named).
    ValueError
        A grid of ``nagq**k`` points above :data:`fitting.quadrature.MAX_GRID_POINTS`.
    """
    if family.estimates_scale:
        raise FamilyError(f"method='agq' is for binomial and poisson GLMMs, not the {family.name!r} "
                          "family (its Laplace/ML fit is exact)")
    if not design.re_terms:
        raise FittingError("method='agq' needs a random-effects term; the formula has none")
    data = prepare_agq(design)  # names the terms when there are several grouping factors
    if nagq != "auto" and nagq ** data.k > MAX_GRID_POINTS:
        terms = ", ".join(f"({' + '.join(t.term_names)} | {t.group})" for t in design.re_terms)
        raise ValueError(f"nagq={nagq} gives {nagq}**{data.k} = {nagq ** data.k} quadrature points for "
                         f"{terms}; at most {MAX_GRID_POINTS} allowed")
    return data


def _ranef_frame(data: AGQData, design, agq) -> pd.DataFrame:
    """Conditional modes and sds in the layout of :func:`fitting.inference.ranef_table`."""
    groups, levels, terms, modes, sds = [], [], [], [], []
    lv = np.asarray(data.levels, dtype=object)
    m = data.n_groups
    col = 0
    for t in design.re_terms:  # one grouping factor: lme4 order is formula order
        for j, name in enumerate(t.term_names):
            groups.append(np.full(m, t.group, dtype=object))
            levels.append(lv)
            terms.append(np.full(m, name, dtype=object))
            modes.append(agq.ranef[:, col + j])
            sds.append(agq.ranef_sd[:, col + j])
        col += t.k
    return pd.DataFrame({"group": np.concatenate(groups), "level": np.concatenate(levels),
                         "term": np.concatenate(terms), "mode": np.concatenate(modes),
                         "cond_sd": np.concatenate(sds)})


def agq_result(lap: FitResult, design, family, agq, ctl, t0, *, auto=None) -> FitResult:
    """Package an :class:`~fitting.agq.AGQFit` started from the Laplace fit ``lap``.

    Parameters
    ----------
    lap : FitResult
        The Laplace fit (its diagnostics, e.g. ``laplace_adequacy``, are kept).
    design : Design
    family : Family
    agq : AGQFit
    ctl : dict
    t0 : float
        ``time.perf_counter()`` at the start of the whole fit.
    auto : AutoNAGQ, optional
        The node selection record when ``nagq="auto"``.

    Returns
    -------
    FitResult
    """
    data = prepare_agq(design)
    struct = build_structure(design.re_terms, design.nobs)
    nt, p = struct.ntheta, design.p
    theta, beta = np.asarray(agq.theta, float), np.asarray(agq.beta, float)
    warn = [w for w in lap.diagnostics.warnings if "consider method='agq'" not in w]
    names = struct.theta_names + tuple(design.x_names)
    if agq.vcov is not None:
        V = agq.vcov[nt:, nt:]
        vfull = vcov_frame(0.5 * (agq.vcov + agq.vcov.T), names)
    else:
        V, vfull = lap.vcov.to_numpy(float), None
        warn.append("Hessian of the AGQ deviance not positive definite: standard errors from the "
                    "Laplace fit")
    se = np.sqrt(np.diag(V))
    aic, bic = information_criteria(agq.loglik, p + nt, design.nobs)
    singular = inference.is_singular(struct, theta, float(ctl["check_singular_tol"]))
    if not agq.converged:
        warn.append(f"AGQ (nAGQ={agq.nagq}) optimizer: {agq.message} (max|grad| = {agq.max_grad:.3g})")
    if auto is not None and not auto.converged:
        warn.append(f"nagq='auto': {auto.message}")
    if agq.hessian_pd is False and not singular and agq.vcov is None:
        warn.append("Hessian of the AGQ deviance is not positive definite")
    extra = {"objective": f"AGQ (nAGQ={agq.nagq})", "parameters": "theta, beta", "nagq": int(agq.nagq),
             "nagq_auto": auto is not None, "max_grad": float(agq.max_grad),
             "agq_elapsed": float(agq.elapsed), "laplace_loglik": float(lap.loglik),
             "laplace_evaluations": int(lap.optinfo.evaluations),
             "laplace_elapsed": float(lap.optinfo.elapsed)}
    if auto is not None:
        extra["nagq_history"] = [{"nagq": h["nagq"], "loglik": h["loglik"], "evaluations": h["evaluations"]}
                                 for h in auto.history]
        extra["nagq_message"] = auto.message
    opt = OptInfo("L-BFGS-B (central-difference gradient)", int(agq.evaluations), time.perf_counter() - t0,
                  (), str(agq.message), tuple(lap.optinfo.final), tuple(map(float, np.concatenate([theta, beta]))),
                  0 if agq.converged else 2, extra=extra)
    diag = replace(lap.diagnostics, converged=bool(agq.converged), singular=singular,
                   max_grad=float(agq.max_grad), hessian_pd=bool(agq.hessian_pd),
                   warnings=tuple(dict.fromkeys(warn)))
    return FitResult(
        formula=lap.formula, family=lap.family, link=lap.link, method="agq", reml=False,
        nobs=design.nobs, ngroups=ngroups(struct), fixed=inference.wald_table(design.x_names, beta, se),
        varcorr=inference.varcorr_table(struct, theta, 1.0, residual=False),
        ranef=_ranef_frame(data, design, agq), loglik=float(agq.loglik), aic=float(aic), bic=float(bic),
        deviance=float(agq.deviance), theta=theta, theta_names=struct.theta_names, beta=beta,
        vcov=vcov_frame(V, design.x_names), sigma=1.0, optinfo=opt, diagnostics=diag,
        nagq=int(agq.nagq), vcov_full=vfull,
    )


def fit_agq_from_laplace(lap: FitResult, design, family, nagq, ctl, t0) -> FitResult:
    """AGQ fit started at the Laplace estimates; ``nagq=1`` returns ``lap`` itself.

    Parameters
    ----------
    lap : FitResult
    design : Design
    family : Family
    nagq : int or "auto"
    ctl : dict
    t0 : float

    Returns
    -------
    FitResult
    """
    data = check_agq(design, family, nagq)
    if nagq == 1:
        return lap
    maxiter, gtol = int(ctl["maxiter"]), float(ctl["gtol"])
    if nagq == "auto":
        sel = auto_nagq(data, family, lap.theta, lap.beta)
        if sel.nagq == 1:
            return lap
        return agq_result(lap, design, family, sel.fit, ctl, t0, auto=sel)
    agq = fit_agq(data, family, nagq, start_theta=lap.theta, start_beta=lap.beta, maxiter=maxiter, gtol=gtol)
    return agq_result(lap, design, family, agq, ctl, t0)

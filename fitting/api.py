"""``fitting.fit``: build the design, the objective, optimise, infer, package.

Stages (each callable alone): :func:`fitting.frame.build_design` → objective
(:mod:`fitting.lmm` / :mod:`fitting.glmm`) → :func:`fitting.optimize.minimize` →
:mod:`fitting.inference` → :class:`fitting.result.FitResult`. :func:`fit_design` starts
from a ready :class:`~fitting.design.Design`.

Control keys (``control=`` dict; unknown keys are rejected by name):

``start``
    ``{"theta": [...], "beta": [...]}`` warm start (lme4 order of θ; GLMMs use both,
    LMMs use ``theta``).
``maxiter`` (int, 500)
    Iteration cap of the optimiser.
``gtol`` (float, 1e-5)
    Convergence tolerance on the largest gradient component in the optimiser's whitened
    coordinates (units of standard errors). When a final Hessian is computed (GLMMs with
    ``se="hessian"``, all LMMs) BFGS stops at ``max(gtol, 1e-3)`` and one Newton step with
    that Hessian finishes (quadratically); if that step cannot be taken, BFGS resumes down
    to ``gtol``.
``se`` ("hessian" | "rx")
    GLMM standard errors from the Hessian of the Laplace deviance over (θ, β) (lme4's
    default): forward differences of the analytic gradient, with an exact ββ block for
    canonical links on one grouping factor or a crossed (dense-rest) layout
    (:mod:`fitting.laplace_hessian`); or from ``RX`` conditional on θ (faster: no Hessian). LMMs
    always use ``RX`` (like lme4).
``na_action`` ("error" | "omit")
    Passed to the design stage.
``check_singular_tol`` (float, 1e-4)
    A diagonal θ below this flags a singular fit.
``pirls_tol`` (float, 1e-10)
    PIRLS takes a last Newton step and stops once the decrement ``δ'Hδ`` is below this.
``nagq`` (int >= 1 or "auto"; default "auto")
    Quadrature nodes per dimension for ``method="agq"`` (adaptive Gauss-Hermite, one
    grouping factor, binomial/Poisson). ``1`` returns the Laplace fit; ``"auto"`` raises
    the node count until the fit stops changing (:func:`fitting.agq.auto_nagq`) and
    records the choice in ``FitResult.nagq``.
``check_laplace`` (bool, True)
    Binomial/Poisson GLMMs with one grouping factor: compare the Laplace log-likelihood
    with quadrature at the estimates (``diagnostics.laplace_adequacy``; ~5-12% of a fit).
``check_separation`` (None | bool, None)
    Binomial fits: the LP separation check (``diagnostics.separation``). ``None`` runs it
    only when the fit looks separated (see :mod:`fitting.glmm_checks`).
``penalty`` (None | "normal" | {"prior": "normal", "scale": s})
    Penalised Laplace fit with a weak normal prior on the non-intercept fixed effects
    (:mod:`fitting.penalized`); ``method`` becomes ``"laplace+penalized"``.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd

from . import inference, linalg
from .design import Design
from .errors import ConvergenceError, DataError, FamilyError
from .families import Family, get_family
from .glm import fit_glm
from .fitcommon import (LOOSE_GTOL, information_criteria, is_pd, newton_step, ngroups,
                        start_vector, vcov_frame, zero_small_diagonals)
from .lmm import make_lmm, profiled_deviance
from .optimize import Affine, bfgs, hessian_along, minimize_whitened
from .response import make_response
from .agq_fit import check_agq, check_nagq, fit_agq_from_laplace
from .glmm_checks import run_checks
from .penalized import check_penalty, fit_glmm_penalized
from .result import Diagnostics, FitResult, OptInfo
from .structure import build_structure

__all__ = ["fit", "fit_design", "CONTROL_DEFAULTS", "METHODS", "check_control", "check_method",
           "single_thread_blas"]

CONTROL_DEFAULTS = {
    "start": None,
    "maxiter": 500,
    "gtol": 1e-5,
    "se": "hessian",
    "na_action": "error",
    "check_singular_tol": 1e-4,
    "pirls_tol": 1e-10,
    "nagq": None,
    "check_laplace": True,
    "check_separation": None,
    "penalty": None,
}
METHODS = ("laplace", "agq")


# --------------------------------------------------------------------------- helpers
_CONTROLLER = None


@contextmanager
def single_thread_blas():
    """Context manager limiting BLAS to one thread (the matrices are small: threads only add overhead).

    Used by :func:`fit`, :func:`fit_design` and :func:`fitting.batch.fit_many`; a no-op
    when BLAS already runs single-threaded (e.g. in a batch worker) or without
    ``threadpoolctl``.
    """
    global _CONTROLLER
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover
        yield
        return
    if _CONTROLLER is None:
        _CONTROLLER = ThreadpoolController().select(user_api="blas")
    if all(lib.num_threads == 1 for lib in _CONTROLLER.lib_controllers):
        yield  # already single-threaded (e.g. a batch worker): nothing to change
        return
    with _CONTROLLER.limit(limits=1):
        yield


def check_control(control) -> dict:
    """Validate a ``control`` dict and fill in the defaults of :data:`CONTROL_DEFAULTS`.

    Parameters
    ----------
    control : dict or None
        See the module docstring for the keys.

    Returns
    -------
    dict
        A new dict with every key of :data:`CONTROL_DEFAULTS` (``penalty`` normalised to
        a prior scale or None, ``nagq`` checked).

    Raises
    ------
    ValueError
        Not a dict, an unknown key (all valid keys listed) or an invalid value (named).
    """
    ctl = dict(CONTROL_DEFAULTS)
    if control is None:
        return ctl
    if not isinstance(control, dict):
        raise ValueError(f"control must be a dict, got {type(control).__name__}")
    unknown = sorted(set(control) - set(CONTROL_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown control key(s) {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(sorted(CONTROL_DEFAULTS))}")
    ctl.update(control)
    if ctl["se"] not in ("hessian", "rx"):
        raise ValueError(f"control['se'] must be 'hessian' or 'rx', got {ctl['se']!r}")
    if int(ctl["maxiter"]) < 1:
        raise ValueError(f"control['maxiter'] must be positive, got {ctl['maxiter']!r}")
    for key in ("gtol", "pirls_tol", "check_singular_tol"):
        if not float(ctl[key]) > 0:
            raise ValueError(f"control[{key!r}] must be positive, got {ctl[key]!r}")
    for key in ("check_laplace", "check_separation"):
        if not (isinstance(ctl[key], bool) or (key == "check_separation" and ctl[key] is None)):
            raise ValueError(f"control[{key!r}] must be True or False, got {ctl[key]!r}")
    ctl["nagq"] = None if ctl["nagq"] is None else check_nagq(ctl["nagq"])
    ctl["penalty"] = check_penalty(ctl["penalty"])
    if ctl["start"] is not None:
        st = ctl["start"]
        if not isinstance(st, dict) or set(st) - {"theta", "beta"}:
            raise ValueError("control['start'] must be a dict with keys 'theta' and/or 'beta'")
    return ctl







# --------------------------------------------------------------------------- API
def fit(formula: str, data, family: str | Family = "gaussian", link: str | None = None, *,
        weights=None, offset=None, reml: bool = False, method: str = "laplace",
        control: dict | None = None) -> FitResult:
    """Fit a (generalised) linear mixed model like lme4's ``lmer``/``glmer``.

    Parameters
    ----------
    formula : str
        lme4 formula, e.g. ``"y ~ x + (1 | g)"``.
    data : pandas.DataFrame
    family : str or Family
        ``"gaussian"``, ``"binomial"`` or ``"poisson"``.
    link : str, optional
        Defaults to the canonical link.
    weights, offset : str or array-like, optional
        Prior weights and offset (column names or arrays).
    reml : bool
        REML for Gaussian/identity models only.
    method : str
        ``"laplace"`` (default) or ``"agq"`` (adaptive Gauss-Hermite quadrature for
        binomial/Poisson GLMMs with one grouping factor; ``control["nagq"]``: nodes or
        ``"auto"``). Ignored for LMMs and models without random effects.
    control : dict, optional
        See the module docstring for the keys.

    Returns
    -------
    FitResult

    Raises
    ------
    FormulaError, DataError, FamilyError, ConvergenceError, ValueError
    """
    t0 = time.perf_counter()
    ctl = check_control(control)
    fam = get_family(family, link)
    method = check_method(method, fam, reml, ctl)
    from .frame import build_design

    with single_thread_blas():
        design = build_design(formula, data, fam.name, weights=weights, offset=offset,
                              na_action=ctl["na_action"])
        return _fit(design, fam, str(formula), reml, method, ctl, t0)


def check_method(method, fam, reml, ctl=None) -> str:
    """Validate ``method`` against the family (and the control dict, when given).

    Parameters
    ----------
    method : str
        ``"laplace"`` or ``"agq"`` (case-insensitive).
    fam : Family
    reml : bool
    ctl : dict, optional
        A checked control dict (:func:`check_control`); with it, ``ctl["nagq"]`` is set to
        ``"auto"`` for ``method="agq"`` when not given (the dict is modified).

    Returns
    -------
    str
        The method, lower case.

    Raises
    ------
    ValueError, FamilyError
    """
    m = str(method).lower()
    if ctl is None:
        ctl = {"penalty": None, "nagq": "auto" if m == "agq" else None}
    if m not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")
    if reml and not (fam.name == "gaussian" and fam.link.name == "identity"):
        raise FamilyError(f"reml=True is only available for the gaussian family with identity link, "
                          f"not {fam.name!r}/{fam.link.name!r}")
    if m == "agq":
        if fam.estimates_scale:
            raise FamilyError(f"method='agq' is for binomial and poisson GLMMs, not the {fam.name!r} family "
                              "(its ML fit needs no quadrature)")
        if ctl["penalty"] is not None:
            raise ValueError("control['penalty'] is only available with method='laplace'")
        if ctl["nagq"] is None:
            ctl["nagq"] = "auto"
    elif ctl["nagq"] is not None:
        raise ValueError("control['nagq'] only applies to method='agq'")
    if ctl["penalty"] is not None and fam.name not in ("binomial", "poisson"):
        raise FamilyError(f"control['penalty'] is for binomial and poisson GLMMs, not {fam.name!r}")
    return m


def fit_design(design: Design, family: str | Family = "gaussian", link: str | None = None, *,
               formula: str | None = None, reml: bool = False, method: str = "laplace",
               control: dict | None = None) -> FitResult:
    """Fit a ready :class:`~fitting.design.Design` (the stages after ``build_design``)."""
    t0 = time.perf_counter()
    ctl = check_control(control)
    fam = get_family(family, link)
    method = check_method(method, fam, reml, ctl)
    with single_thread_blas():
        return _fit(design, fam, formula or design.response, reml, method, ctl, t0)


def _fit(design, fam, formula, reml, method, ctl, t0):
    if design.nobs <= design.p:
        raise DataError(f"{design.nobs} observations are not enough for {design.p} fixed effects")
    if method == "agq":
        check_agq(design, fam, ctl["nagq"])  # before any fitting: names the offending terms
    if ctl["penalty"] is not None and not design.re_terms:
        raise ValueError("control['penalty'] is implemented for GLMMs (a formula with random effects)")
    if not design.re_terms:
        res = _fit_glm(design, fam, formula, reml, ctl, t0)
    elif fam.name == "gaussian":
        if fam.link.name != "identity":
            raise FamilyError("gaussian family with a non-identity link and random effects is not "
                              "supported; use link='identity' or a GLM without random effects")
        res = _fit_lmm(design, fam, formula, reml, ctl, t0)
    else:
        res = _fit_glmm(design, fam, formula, ctl, t0)  # with its post-fit checks
        if method == "agq":
            res = fit_agq_from_laplace(res, design, fam, ctl["nagq"], ctl, t0)
    return replace(res, design=design)


# --------------------------------------------------------------------------- GLM
def _fit_glm(design, fam, formula, reml, ctl, t0):
    resp = make_response(design.y, design.weights, design.offset, fam)
    start = start_vector(ctl, "beta", design.p, "fixed effects")
    g = fit_glm(design.X, resp, beta0=start, maxit=int(ctl["maxiter"]))
    n, p = design.nobs, design.p
    gauss = fam.name == "gaussian"
    w = design.weights
    if gauss:
        dev = g.ev.dev
        pos = w > 0
        npos = int(pos.sum())
        loglik = -0.5 * npos * (np.log(2 * np.pi * dev / npos) + 1.0) + 0.5 * np.log(w[pos]).sum()
        disp = float(np.sum(w * (design.y - g.ev.mu) ** 2 / fam.variance(g.ev.mu)) / (n - p))
        sigma = float(np.sqrt(disp))
        df = p + 1
    else:
        loglik = resp.loglik(g.ev.dev)
        disp, sigma, df = 1.0, 1.0, p
    V = inference.vcov_from_rx(g.R, disp)
    se = np.sqrt(np.diag(V))
    aic, bic = information_criteria(loglik, df, n)
    warn = list(design.warnings)
    if not g.converged:
        warn.append(f"IRLS did not converge in {g.iterations} iterations")
    elapsed = time.perf_counter() - t0
    opt = OptInfo("IRLS", g.iterations, elapsed, (), "converged" if g.converged else "iteration limit",
                  (), tuple(map(float, g.beta)), 0 if g.converged else 1)
    diag = Diagnostics(bool(g.converged), False, 0.0, None, tuple(warn))
    return FitResult(
        formula=formula, family=fam.name, link=fam.link.name, method="irls", reml=bool(reml),
        nobs=n, ngroups={}, fixed=inference.wald_table(design.x_names, g.beta, se),
        varcorr=pd.DataFrame(columns=["group", "term1", "term2", "variance", "sd", "correlation"]),
        ranef=pd.DataFrame(columns=["group", "level", "term", "mode", "cond_sd"]),
        loglik=float(loglik), aic=float(aic), bic=float(bic), deviance=float(-2 * loglik),
        theta=np.zeros(0), theta_names=(), beta=g.beta, vcov=vcov_frame(V, design.x_names),
        sigma=sigma, optinfo=opt, diagnostics=diag,
    )


# --------------------------------------------------------------------------- LMM
@dataclass(frozen=True, eq=False)
class ProfiledObjective:
    """``obj(θ, state) -> (d(θ), ∇d, state)``: the profiled (RE)ML deviance (no state)."""

    model: object
    reml: bool

    def __call__(self, theta, state):
        try:
            ev = profiled_deviance(self.model, theta, self.reml)
        except linalg.NotPositiveDefinite:
            return np.inf, None, state
        return ev.deviance, ev.gradient, state


def _fit_lmm(design, fam, formula, reml, ctl, t0):
    struct = build_structure(design.re_terms, design.nobs)
    model = make_lmm(struct, design.X, design.y, design.weights, design.offset)
    theta0 = start_vector(ctl, "theta", struct.ntheta, "covariance parameters")
    if theta0 is None:
        theta0 = struct.theta_start()
    obj = ProfiledObjective(model, reml)
    gtol = float(ctl["gtol"])
    try:
        wres = minimize_whitened(obj, theta0, None, maxiter=int(ctl["maxiter"]), gtol=max(gtol, LOOSE_GTOL))
    except FloatingPointError:
        raise ConvergenceError("LMM: the profiled deviance is not finite at the starting values "
                               "(is X rank deficient?)") from None
    out = wres.outcome
    if not np.isfinite(out.fun):
        raise ConvergenceError("LMM: the profiled deviance is not finite at any evaluated theta")
    evaluations, status, message, log = out.evaluations, out.status, out.message, list(out.log)
    theta = inference.canonical_theta(struct, wres.z)
    cand = zero_small_diagonals(struct, theta)
    if cand is not None and profiled_deviance(model, cand, reml, gradient=False).deviance <= out.fun + 1e-7:
        theta = cand
    ev = profiled_deviance(model, theta, reml)
    H = hessian_along(lambda th: profiled_deviance(model, th, reml).gradient, theta, wres.C, ev.gradient)
    n_final = 2 + struct.ntheta
    polished = False
    step = newton_step(struct, theta, H, ev.gradient)
    if step is not None:
        tn = theta - step  # a Newton step finishes the optimisation
        try:
            evn = profiled_deviance(model, tn, reml)
        except linalg.NotPositiveDefinite:
            evn = None
        if (evn is not None and evn.deviance <= ev.deviance + 1e-10
                and np.array_equal(inference.canonical_theta(struct, tn), tn)):
            theta, ev, polished = tn, evn, True
    if not polished and np.abs(wres.C.T @ ev.gradient).max() > gtol:
        more = bfgs(Affine(obj, theta, wres.C), np.zeros(theta.size), maxiter=int(ctl["maxiter"]), gtol=gtol)
        evaluations += more.evaluations
        log += list(more.log)
        status, message = more.status, more.message
        if np.isfinite(more.fun) and more.fun <= ev.deviance:
            theta = inference.canonical_theta(struct, theta + wres.C @ more.x)
            ev = profiled_deviance(model, theta, reml)
    p = model.p
    sigma = ev.sigma
    V = inference.vcov_from_rx(ev.RX, sigma ** 2)
    se = np.sqrt(np.diag(V))
    loglik = -0.5 * ev.deviance
    df = p + struct.ntheta + 1
    aic, bic = information_criteria(loglik, df, design.nobs)
    warn = list(design.warnings)
    hpd = is_pd(H)
    grad_ok, maxmin = inference.scaled_gradient_ok(ev.gradient, H if hpd else None)
    singular = inference.is_singular(struct, theta, float(ctl["check_singular_tol"]))
    if not grad_ok:
        warn.append(f"Model failed to converge with max|grad| = {maxmin:.6g} (tol = 0.002)")
    if not hpd and not singular:
        warn.append("Hessian of the profiled deviance is not positive definite")
    converged = status == 0 and grad_ok and (hpd or singular)
    if status != 0:
        warn.append(f"optimizer: {message}")
    elapsed = time.perf_counter() - t0
    opt = OptInfo("BFGS", evaluations, elapsed, tuple(map(float, ev.gradient)), message,
                  tuple(map(float, theta0)), tuple(map(float, theta)), status,
                  extra={"objective": "REML" if reml else "ML", "parameters": "theta",
                         "iterations": out.iterations, "start_evaluations": wres.start_evaluations,
                         "final_evaluations": n_final, "gtol": gtol, "log": log})
    diag = Diagnostics(bool(converged), singular, float(np.abs(ev.gradient).max()), bool(hpd), tuple(warn))
    return FitResult(
        formula=formula, family=fam.name, link=fam.link.name, method="reml" if reml else "ml",
        reml=bool(reml), nobs=design.nobs, ngroups=ngroups(struct),
        fixed=inference.wald_table(design.x_names, ev.beta, se),
        varcorr=inference.varcorr_table(struct, theta, sigma, residual=True),
        ranef=inference.ranef_table(struct, theta, ev.u, ev.fac, sigma),
        loglik=float(loglik), aic=float(aic), bic=float(bic), deviance=float(ev.deviance),
        theta=theta, theta_names=struct.theta_names, beta=ev.beta, vcov=vcov_frame(V, design.x_names),
        sigma=float(sigma), optinfo=opt, diagnostics=diag,
    )





# --------------------------------------------------------------------------- GLMM
def _fit_glmm(design, fam, formula, ctl, t0):
    if ctl["penalty"] is not None:
        return run_checks(fit_glmm_penalized(design, fam, formula, ctl, t0, ctl["penalty"]), design, fam, ctl)
    from .glmm_fit import fit_glmm

    return fit_glmm(design, fam, formula, ctl, t0)

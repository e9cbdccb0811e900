"""Penalised Laplace fit (``control={"penalty": "normal"}``): a weak normal prior on β.

The objective is the Laplace deviance of :class:`fitting.glmm_fit.LaplaceObjective` plus
``penalty_deviance(beta, scales)`` (:mod:`fitting.separation`; ``scales = 2.5 / sd(x_j)``,
intercept unpenalised), minimised over ``(theta, beta)`` by the same whitened BFGS; the
Laplace core is not modified: :class:`PenalizedObjective` composes with it, so the core
objective stays the one the unpenalised fit uses. Standard errors come from the
Hessian of the *penalised* deviance (the curvature of the posterior mode).

Reported as the module docstring of :mod:`fitting.separation` asks: ``method
"laplace+penalized"``, ``diagnostics.penalized`` and a warning naming the penalised
terms; ``loglik``/``deviance``/AIC/BIC are the *unpenalised* Laplace values at the
penalised estimates, the penalised deviance is in ``optinfo.extra["penalized_deviance"]``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from . import inference, linalg
from .errors import ConvergenceError
from .fitcommon import full_vcov_frame, information_criteria, is_pd, ngroups, start_vector, vcov_frame
from .glmm import GlmmModel, laplace
from .glmm_fit import THETA_START_SCALE, LaplaceObjective, ModeState
from .optimize import hessian_along, minimize_whitened
from .response import make_response
from .result import Diagnostics, FitResult, OptInfo
from .separation import DEFAULT_PRIOR_SCALE, penalty_deviance, penalty_scales
from .structure import build_structure

__all__ = ["PenalizedObjective", "check_penalty", "fit_glmm_penalized", "METHOD"]

METHOD = "laplace+penalized"
_FD_STEP = 1e-4


def check_penalty(penalty) -> float | None:
    """``control["penalty"]`` → prior scale (None: no penalty).

    Accepts ``None``, ``"normal"`` (scale 2.5 on standardised predictors),
    ``{"prior": "normal", "scale": s}`` or a positive number ``s`` (the scale).

    Raises
    ------
    ValueError
    """
    if penalty is None or penalty is False:
        return None
    if isinstance(penalty, (int, float, np.floating)) and not isinstance(penalty, bool):
        if penalty > 0 and np.isfinite(penalty):
            return float(penalty)
    if isinstance(penalty, str) and penalty.lower() == "normal":
        return DEFAULT_PRIOR_SCALE
    if isinstance(penalty, dict) and str(penalty.get("prior", "normal")).lower() == "normal" \
            and set(penalty) <= {"prior", "scale"}:
        s = float(penalty.get("scale", DEFAULT_PRIOR_SCALE))
        if s > 0 and np.isfinite(s):
            return s
    raise ValueError(f"control['penalty'] must be None, 'normal', a scale s > 0 or "
                     f"{{'prior': 'normal', 'scale': s > 0}}, "
                     f"got {penalty!r}")


@dataclass(frozen=True, eq=False)
class PenalizedObjective:
    """``obj(z, state) -> (deviance + penalty, gradient, state)`` over ``z = (θ, β)``."""

    laplace: LaplaceObjective
    scales: np.ndarray

    def penalty(self, z):
        """``(penalty, gradient over z)``."""
        nt = self.laplace.model.ntheta
        pen, gb = penalty_deviance(z[nt:], self.scales)
        return pen, np.concatenate([np.zeros(nt), gb])

    def __call__(self, z, state):
        f, g, state = self.laplace(z, state)
        if g is None or not np.isfinite(f):
            return f, g, state
        pen, gp = self.penalty(z)
        return f + pen, g + gp, state


def _start_beta(design, resp_mean, link):
    beta = np.zeros(design.p)
    if "(Intercept)" in design.x_names:
        mu = float(np.clip(resp_mean, 1e-3, None if link.name == "log" else 1 - 1e-3))
        beta[list(design.x_names).index("(Intercept)")] = float(link.link(np.array([mu]))[0])
    return beta


def fit_glmm_penalized(design, fam, formula, ctl, t0, scale: float = DEFAULT_PRIOR_SCALE) -> FitResult:
    """Penalised (MAP) Laplace fit of a binomial/Poisson GLMM design.

    Parameters
    ----------
    design : Design
    fam : Family
    formula : str
    ctl : dict
        Checked control dict (``start``, ``maxiter``, ``gtol``, ``pirls_tol``, ...).
    t0 : float
    scale : float
        Prior sd on a standardised coefficient.

    Returns
    -------
    FitResult
    """
    struct = build_structure(design.re_terms, design.nobs)
    resp = make_response(design.y, design.weights, design.offset, fam, fused=struct.K > 1)
    model = GlmmModel(struct, design.X, resp)
    nt, p = struct.ntheta, design.p
    tol = float(ctl["pirls_tol"])
    scales = penalty_scales(design.X, design.x_names, scale)
    theta0 = start_vector(ctl, "theta", nt, "covariance parameters")
    beta0 = start_vector(ctl, "beta", p, "fixed effects")
    if theta0 is None:
        theta0 = THETA_START_SCALE * struct.theta_start()
    if beta0 is None:
        ybar = float(np.sum(design.weights * design.y) / np.sum(design.weights))
        beta0 = _start_beta(design, ybar, fam.link)
    z0 = np.concatenate([theta0, beta0])
    obj = PenalizedObjective(LaplaceObjective(model, tol), scales)
    gtol = float(ctl["gtol"])
    try:
        wres = minimize_whitened(obj, z0, None, state=None, maxiter=int(ctl["maxiter"]), gtol=gtol)
    except FloatingPointError:
        raise ConvergenceError("penalised Laplace deviance is not finite at the starting values") from None
    out = wres.outcome
    if not np.isfinite(out.fun):
        raise ConvergenceError("penalised Laplace deviance not finite at any evaluated point")
    # canonical θ (non-negative diagonal) and its modes
    theta = inference.canonical_theta(struct, wres.z[:nt])
    u = inference.flip_u(struct, wres.z[:nt], theta, out.state.u)
    z = np.concatenate([theta, wres.z[nt:]])
    ev = laplace(model, theta, z[nt:], u, tol=tol, jacobian=True)
    if ev.gradient is None:
        raise ConvergenceError("Laplace deviance not finite at the penalised estimate")
    pen, gpen = obj.penalty(z)
    gtot = ev.gradient + gpen
    mstate = ModeState(z.copy(), ev.pirls.u, ev.jacobian)

    def grad(zz):
        g = laplace(model, zz[:nt], zz[nt:], mstate.predict(zz), tol=tol).gradient
        if g is None:
            raise ConvergenceError("Laplace deviance not finite near the penalised estimate")
        return g + obj.penalty(zz)[1]

    H = hessian_along(grad, z, wres.C, gtot, _FD_STEP)
    hpd = is_pd(H)
    warn = list(design.warnings)
    V, _ = inference.vcov_from_hessian(H, nt)
    if V is None:
        warn.append("Hessian not positive definite: standard errors from RX (conditional on theta)")
        pr = ev.pirls
        fb = linalg.fixed_blocks(struct, pr.fac, pr.V, pr.ev.W, design.X)
        V = inference.vcov_from_rx(fb.R, 1.0)
    se = np.sqrt(np.diag(V))
    beta = z[nt:]
    loglik = -0.5 * ev.deviance
    aic, bic = information_criteria(loglik, p + nt, design.nobs)
    singular = inference.is_singular(struct, theta, float(ctl["check_singular_tol"]))
    grad_ok, maxmin = inference.scaled_gradient_ok(gtot, H if hpd else None)
    if not grad_ok:
        warn.append(f"Model failed to converge with max|grad| = {maxmin:.6g} (tol = 0.002)")
    if out.status != 0:
        warn.append(f"optimizer: {out.message}")
    pterms = [n for n, s in zip(design.x_names, scales) if np.isfinite(s)]
    desc = ", ".join(f"{n} (sd {s:.3g})" for n, s in zip(design.x_names, scales) if np.isfinite(s))
    warn.append(f"penalised: normal(0, s_j) prior on {desc or 'no terms'}; estimates are shrunk, not MLE; "
                "loglik is the unpenalised Laplace log-likelihood at these estimates, AIC/BIC and "
                "likelihood-ratio tests are not comparable with unpenalised fits")
    converged = out.status == 0 and grad_ok and (hpd or singular) and ev.pirls.converged
    opt = OptInfo(
        "BFGS", out.evaluations, time.perf_counter() - t0, tuple(map(float, gtot)), out.message,
        tuple(map(float, z0)), tuple(map(float, z)), out.status,
        extra={"objective": "Laplace + normal prior on beta", "parameters": "theta, beta",
               "iterations": out.iterations, "start_evaluations": wres.start_evaluations,
               "final_evaluations": 2 + nt + p, "gtol": gtol, "pirls_tol": tol,
               "penalty": {"prior": "normal", "scale": float(scale), "terms": pterms,
                           "sd": [float(s) for s in scales if np.isfinite(s)]},
               "penalized_deviance": float(ev.deviance + pen), "penalty_value": float(pen),
               "log": list(out.log)},
    )
    diag = Diagnostics(bool(converged), singular, float(np.abs(gtot).max()), hpd, tuple(warn), penalized=True)
    return FitResult(
        formula=formula, family=fam.name, link=fam.link.name, method=METHOD, reml=False,
        nobs=design.nobs, ngroups=ngroups(struct), fixed=inference.wald_table(design.x_names, beta, se),
        varcorr=inference.varcorr_table(struct, theta, 1.0, residual=False),
        ranef=inference.ranef_table(struct, theta, ev.pirls.u, ev.pirls.fac, 1.0),
        loglik=float(loglik), aic=float(aic), bic=float(bic), deviance=float(ev.deviance),
        theta=theta, theta_names=struct.theta_names, beta=beta, vcov=vcov_frame(V, design.x_names),
        sigma=1.0, optinfo=opt, diagnostics=diag,
        vcov_full=full_vcov_frame(H, struct.theta_names + tuple(design.x_names)),
    )

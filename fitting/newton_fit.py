"""Laplace fit of a one-grouping-factor GLMM by exact Newton (``fitting.fit``'s fast path).

For a binomial/Poisson model with a single random-effects term the batched engine of
:func:`fitting.fit_many` has the exact gradient *and Hessian* of the Laplace deviance
over (θ, β) (:func:`fitting.batch_laplace.evaluate`, any ``k``, any link). With it a
single fit needs ~5-7 evaluations and no finite-difference Hessian: this module runs
that engine on a one-stratum :class:`~fitting.batch_stack.Stack`.

Stages: GLM start (:func:`fitting.batch_newton.glm_start`, as ``fit_many``) → Newton
over (θ, β) (:func:`newton_one`: the line search of :func:`fitting.batch_newton.newton`
for one stratum, without its working-set bookkeeping, every evaluation logged) →
canonical θ, snapping, vcov and lme4's checks (:func:`fitting.batch_results.finish_chunk`)
→ tables (:func:`fitting.batch_results.chunk_tables`) → :class:`FitResult`.
→ post-fit checks (:func:`fitting.glmm_checks.run_checks`, given the optimum's modes,
``A_g⁻¹`` and Laplace log-likelihood, so the adequacy check runs no mode search).

:func:`fit_glmm_newton` returns None where this path does not apply or cannot vouch for
its answer (whatever ``fit_many`` would refit: iteration limit, failure, Hessian not
positive definite, nearly flat deviance, gradient check); the caller then runs the
BFGS path of :mod:`fitting.glmm_fit`, so ``fit`` is never worse than before.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .batch_kernels import RowKernel, row_kernel
from .batch_laplace import BatchEval, evaluate
from .batch_newton import (ARMIJO, GRAD_TOL, LAMBDA2_TOL, MAX_BACKTRACK, MAX_STEP, NewtonResult,
                           directions, glm_start, moment_theta,
                           moment_theta_vector)
from .batch_results import chunk_tables, finish_chunk, newton_decrement, theta_names
from .batch_stack import Stack, stack_designs, tril_layout
from .fitcommon import full_vcov_frame, information_criteria, start_vector, vcov_frame
from .glmm_checks import run_checks
from .result import Diagnostics, FitResult, OptInfo

__all__ = ["applies", "fit_glmm_newton", "newton_one", "MAX_K", "MAX_NEWTON", "TRIAL_LAMBDA2"]

#: largest ``k`` (random-effects columns) sent here: for ``k = 2`` the general evaluator
#: (:func:`fitting.batch_laplace.evaluate_general`, ~0.8 ms per evaluation with Hessian on
#: Contraception ``(urban | district)``, 7 evaluations) beats the BFGS path (measured
#: 14-15 ms vs 18-22 ms CPU); on Contraception ``(age + urban | district)`` (k = 3) 11
#: evaluations and 73 ms against BFGS's 33 and 134 ms, and with a fourth column (k = 4)
#: 21 and 102 ms against 41 and 180 ms, same optimum (CPU, 2026-12-07); larger ``k`` is
#: not measured
MAX_K = 4
#: Newton decrements ``g'H⁻¹g`` above this make :func:`newton_one` evaluate line-search
#: trials for the deviance alone (a rejected trial then costs no derivatives; an accepted
#: one is re-evaluated with them from its modes, one PIRLS iteration)
TRIAL_LAMBDA2 = 1.0
#: Newton iterations at most (``fit_many``'s cap; ``control["maxiter"]`` if smaller)
MAX_NEWTON = 200
_NUMERIC = (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError, OverflowError)


def applies(design, fam) -> bool:
    """Binomial/Poisson with one random-effects term of at most :data:`MAX_K` columns."""
    return (fam.name in ("binomial", "poisson") and len(design.re_terms) == 1
            and design.re_terms[0].k <= MAX_K and design.p >= 1 and design.nobs > design.p)


@dataclass(frozen=True)
class NewtonOne:
    """:func:`newton_one`'s outcome: a one-stratum :class:`NewtonResult` and the log of
    every evaluation's deviance (rejected line-search trials included)."""

    res: NewtonResult
    log: tuple


def newton_one(st: Stack, kern: RowKernel, z0: np.ndarray, *, maxiter: int, rx: bool) -> NewtonOne:
    """Newton over (θ, β) for a one-stratum stack, with the exact Hessian.

    The rules of :func:`fitting.batch_newton.newton` (modified-Newton direction, step cap,
    Armijo test with quadratic back-tracking, modes predicted by ``dû/dz``, convergence on
    the decrement or the gradient with a positive definite Hessian) for ``S = 1``:
    no working set to compact, and every evaluation is logged.

    Parameters
    ----------
    st : Stack
        One stratum.
    kern : RowKernel
    z0 : ndarray (d,)
        Start (θ, β).
    maxiter : int
    rx : bool
        Also keep the fixed-effects information conditional on θ (``se="rx"``).
    """
    nt = st.k * (st.k + 1) // 2
    z = np.asarray(z0, dtype=float).copy()
    ev = evaluate(st, kern, z[None, :nt], z[None, nt:], None, rx=rx)
    nev, npirls, iters, status = 1, int(ev.iterations[0]), 0, -1
    log = [float(ev.f[0])]
    hpd = False
    if not ev.ok[0]:
        status = 2
    while status == -1:
        step, lam2, pd = directions(ev.H, ev.g)
        hpd = bool(pd[0])
        if hpd and (lam2[0] <= LAMBDA2_TOL or np.abs(ev.g[0]).max() <= GRAD_TOL):
            status = 0
            break
        if iters >= maxiter:
            status = 1
            break
        step = step[0] * min(1.0, MAX_STEP / np.abs(step[0]).max())
        f0 = float(ev.f[0])
        slope = float(ev.g[0] @ step)
        alpha = 1.0
        # far from the optimum a trial is often rejected: try it for the deviance alone
        order = 0 if lam2[0] > TRIAL_LAMBDA2 else 2
        for _ in range(MAX_BACKTRACK):
            dz = alpha * step
            zt = z + dz
            upred = ev.u + np.einsum("gkd,d->gk", ev.du, dz)
            evt = evaluate(st, kern, zt[None, :nt], zt[None, nt:], upred, order=order, rx=rx and order == 2)
            nev += 1
            npirls += int(evt.iterations[0])
            ft = float(evt.f[0])
            log.append(ft)
            if evt.ok[0] and ft <= f0 + ARMIJO * alpha * slope + 1e-10 * (1.0 + abs(f0)):
                if order == 0:  # accepted: the derivatives at the same point (PIRLS from its modes)
                    evt = evaluate(st, kern, zt[None, :nt], zt[None, nt:], evt.u, rx=rx)
                    npirls += int(evt.iterations[0])
                    if not evt.ok[0]:
                        status = 2
                        break
                z, ev = zt, evt
                iters += 1
                break
            df = ft - f0 - alpha * slope if np.isfinite(ft) else np.inf
            with np.errstate(divide="ignore", invalid="ignore"):
                aq = -slope * alpha ** 2 / (2.0 * df)
            aq = aq if np.isfinite(aq) else 0.1 * alpha
            alpha = float(np.clip(aq, 0.1 * alpha, 0.5 * alpha))
        else:
            status = 2
    res = _one(ev, z, status, iters, nev, npirls, hpd, list(log))
    return NewtonOne(res, tuple(log))


def _one(ev: BatchEval, z, status, iters, nev, npirls, hpd, log) -> NewtonResult:
    d = z.size
    return NewtonResult(
        z=z[None, :].copy(), f=ev.f.copy(), g=ev.g.copy() if ev.g is not None else np.zeros((1, d)),
        H=ev.H.copy() if ev.H is not None else np.zeros((1, d, d)), u=ev.u.copy(), Ainv=ev.Ainv.copy(),
        du=ev.du.copy() if ev.du is not None else np.zeros((ev.u.shape[0], ev.u.shape[1], d)),
        info_rx=None if ev.info_rx is None else ev.info_rx.copy(), status=np.array([status]),
        iterations=np.array([iters]), evaluations=np.array([nev]), pirls_iterations=np.array([npirls]),
        hessian_pd=np.array([hpd]), log=[log])


def fit_glmm_newton(design, fam, formula: str, ctl: dict, t0: float) -> FitResult | None:
    """Laplace fit by exact Newton, or None when the BFGS path should answer instead.

    Parameters
    ----------
    design : Design
    fam : Family
    formula : str
    ctl : dict
        Checked control dict (``start``, ``maxiter``, ``se``, ``check_singular_tol``,
        ``gtol``/``pirls_tol`` recorded, as in ``fit_many``).
    t0 : float
        ``time.perf_counter()`` at the start of the fit.

    Raises
    ------
    ValueError
        A ``control["start"]`` of the wrong size (the same message as the BFGS path).
    """
    if not applies(design, fam) or ctl.get("penalty") is not None:
        return None
    term = design.re_terms[0]
    k, p = term.k, design.p
    nt = k * (k + 1) // 2
    theta0 = start_vector(ctl, "theta", nt, "covariance parameters")
    beta0 = start_vector(ctl, "beta", p, "fixed effects")
    from .batch import GLM_STEPS
    from .glmm_fit import THETA_START_SCALE

    rows, cols = tril_layout(k)
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            kern = row_kernel(fam)
            st = stack_designs([design], kern)
            if beta0 is None:
                beta0 = glm_start(st, kern, maxit=GLM_STEPS)[0]
            if theta0 is None:
                theta0 = np.where(rows == cols, THETA_START_SCALE, 0.0)
                if k == 1 and np.all(np.isfinite(beta0)):  # the same start as fit_many
                    theta0 = moment_theta(st, kern, beta0[None, :], THETA_START_SCALE)
                elif np.all(np.isfinite(beta0)):
                    theta0 = moment_theta_vector(st, kern, beta0[None, :], theta0)[0]
            z0 = np.concatenate([theta0, beta0])
            if not np.all(np.isfinite(z0)):
                return None
            out = newton_one(st, kern, z0, maxiter=min(int(ctl["maxiter"]), MAX_NEWTON), rx=ctl["se"] == "rx")
            fin = finish_chunk(st, kern, out.res, se=ctl["se"], singular_tol=float(ctl["check_singular_tol"]))
            if fin.refit[0]:
                return None
            tables = chunk_tables([design], fin, st, [0])
    except _NUMERIC:
        return None
    res = _package(design, fam, formula, ctl, t0, z0, out, fin, tables, term)
    # the checks from what the optimum already has: exact modes, A_g⁻¹, the Laplace deviance
    return run_checks(res, design, fam, ctl, modes=fin.u, loglik_laplace=-0.5 * float(fin.f[0]),
                      curvature=fin.Ainv, stack=(st, kern))


def _package(design, fam, formula, ctl, t0, z0, out: NewtonOne, fin, tables, term) -> FitResult:
    """The :class:`FitResult` (fields as :func:`fitting.glmm_fit.fit_glmm`'s; no checks yet)."""
    res = out.res
    k, p = term.k, design.p
    nt = k * (k + 1) // 2
    z = fin.z[0].copy()
    theta, beta, g = z[:nt], z[nt:], fin.g[0].copy()
    dev = float(fin.f[0])
    loglik = -0.5 * dev
    aic, bic = information_criteria(loglik, p + nt, design.nobs)
    want_h = ctl["se"] == "hessian"
    hpd = bool(fin.hessian_pd[0]) if want_h else None
    singular = bool(fin.singular[0])
    warn = list(design.warnings)
    if not fin.grad_ok[0]:  # never: such fits go to the BFGS path
        warn.append(f"Model failed to converge with max|grad| = {fin.maxmin[0]:.6g} (tol = 0.002)")
    converged = bool(res.status[0] == 0 and fin.grad_ok[0] and (hpd is not False or singular))
    extra_ev = int(fin.extra_evaluations[0])
    elapsed = time.perf_counter() - t0
    opt = OptInfo(
        "newton", int(res.evaluations[0]), elapsed, tuple(map(float, g)),
        "converged: Newton decrement below tolerance", tuple(map(float, z0)), tuple(map(float, z)),
        int(res.status[0]),
        extra={"objective": "Laplace", "parameters": "theta, beta", "iterations": int(res.iterations[0]),
               "newton_decrement": newton_decrement(res.g[0], res.H[0]),
               "pirls_iterations": int(res.pirls_iterations[0]), "hessian": "analytic",
               "start_evaluations": 0, "final_evaluations": extra_ev,
               "gtol": float(ctl["gtol"]), "pirls_tol": float(ctl["pirls_tol"]), "log": list(out.log)},
    )
    diag = Diagnostics(converged, singular, float(np.abs(g).max()), hpd, tuple(warn))
    fixed, varcorr, ranef = tables.for_stratum(0)
    names = list(design.x_names)
    tnames = theta_names(term.group, term.term_names)
    return FitResult(
        formula=formula, family=fam.name, link=fam.link.name, method="laplace", reml=False,
        nobs=design.nobs, ngroups={term.group: term.n_levels}, fixed=fixed, varcorr=varcorr, ranef=ranef,
        loglik=float(loglik), aic=float(aic), bic=float(bic), deviance=dev, theta=theta, theta_names=tnames,
        beta=beta, vcov=vcov_frame(fin.V[0].copy(), names), sigma=1.0,
        optinfo=opt, diagnostics=diag,
        vcov_full=full_vcov_frame(fin.H[0].copy(), tnames + tuple(names)) if want_h else None,
    )

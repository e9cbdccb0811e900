"""GLMM Laplace objective: PIRLS for the conditional modes and the Laplace deviance of (θ, β).

Verbs, each a function of explicit inputs (MixedModels.jl style):

* :func:`pirls` — conditional modes ``û(θ, β)`` by penalised IRLS with step-halving, NaN
  checks and an iteration cap; warm-started from a ``u0`` the caller passes in.
* :func:`laplace` — the Laplace deviance with full normalising constants,
  ``-2 Σ log p(y|μ̂) + ||û||² + log|L|²``, and its analytic gradient over (θ, β).

The gradient differentiates the exact Laplace deviance, including the dependence of
``û`` (implicit function theorem) and of the weights ``W(η̂)`` inside ``log|L|²``::

    ∇β = X's,     ∇θ_(r,c) of term t = Σ_i Z_t[i,r] (û_t[g,c] s_i + 2 W_i Y_t[i,c] - a_t[g,c] d1_i/2)
    s  = d1 + c - D2 ⊙ (ZΛ a),   c_i = dW_i/dη · v_i'A⁻¹v_i,   a = H⁻¹ Λ'Z'c,

with ``d1 = d(dev)/dη``, ``D2`` the observed weights, ``H = Λ'Z'D2 ZΛ + I`` (``= A`` for
canonical links), ``v_i`` the row of ``ZΛ`` and ``Y_i = A⁻¹ v_i`` restricted to the
observation's own columns. Only the entries of ``A⁻¹`` on the pattern of ``A`` are needed
(:func:`fitting.linalg.inverse_buffer`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import kernels, linalg
from .errors import ConvergenceError
from .response import Response, ResponseEval
from .structure import Structure

__all__ = ["GlmmModel", "PirlsResult", "LaplaceEval", "pirls", "laplace", "laplace_gradient"]


@dataclass(frozen=True, eq=False)
class GlmmModel:
    """Predictor structure, fixed-effects matrix and response of a GLMM (no state)."""

    struct: Structure
    X: np.ndarray
    resp: Response

    @property
    def ntheta(self) -> int:
        return self.struct.ntheta

    @property
    def p(self) -> int:
        return self.X.shape[1]


@dataclass(frozen=True, eq=False)
class PirlsResult:
    """Conditional modes and everything evaluated at them.

    Attributes
    ----------
    u : ndarray (q,)
        Conditional modes of the spherical random effects.
    V : ndarray (n, K)
        Own-entry rows of ``ZΛ``.
    ev : ResponseEval
        Family quantities at ``η̂``.
    fac : linalg.Factor
        Factor of ``A`` with the weights at ``η̂``.
    iterations : int
    converged : bool
    """

    u: np.ndarray
    V: np.ndarray
    ev: ResponseEval
    fac: linalg.Factor
    iterations: int
    converged: bool


@dataclass(frozen=True, eq=False)
class LaplaceEval:
    """Laplace deviance (and gradient) at one (θ, β).

    Attributes
    ----------
    deviance : float
        ``-2`` times the Laplace log-likelihood (``inf`` if PIRLS failed).
    gradient : ndarray or None
        Gradient over ``(θ, β)`` (lme4 order of θ).
    pirls : PirlsResult or None
    jacobian : ndarray or None
        ``dû/d(θ, β)`` (q × d) when requested.
    """

    deviance: float
    gradient: np.ndarray | None
    pirls: PirlsResult | None
    jacobian: np.ndarray | None = None


def pirls(model: GlmmModel, theta: np.ndarray, beta: np.ndarray, u0: np.ndarray | None = None,
          *, tol: float = 1e-10, maxit: int = 60, quad_tol: float | None = None,
          accept_tol: float | None = None) -> PirlsResult:
    """Conditional modes ``û`` at fixed (θ, β) by penalised IRLS (Newton).

    Each iteration factors ``H = Λ'Z'DZΛ + I`` at the current ``u`` (``D`` the observed
    weights; the Fisher weights ``W`` for canonical links, or when ``H`` is not positive
    definite), solves for the step ``δ = H⁻¹(Λ'Z'w(y-μ)μ'/V - u)`` and halves it until the
    penalised deviance ``Σ dev + ||u||²`` does not increase. Once the decrement ``δ'Hδ``
    is below ``tol`` a last full step is taken (Newton: its error is of order ``tol``) and
    ``A`` is factored with the Fisher weights at the returned ``u``, which the Laplace
    log-determinant needs to first order.

    Parameters
    ----------
    u0 : ndarray, optional
        Warm start (default zeros). A warm start giving a non-finite deviance is replaced by
        zeros.
    tol : float
        Tolerance on the decrement (deviance units).
    maxit : int
        Iteration cap.
    quad_tol : float, optional
        Also take the last step once the decrement is below ``quad_tol`` *and* the previous
        full step contracted it by a factor 10 or more (the Newton regime, where the
        decrement after a step is ``≈ κ dec²`` with ``κ ≪ 1``: the step then leaves an error
        of order ``quad_tol²`` instead of ``tol²``). For evaluations whose precision needs
        are those of an optimiser step, not of a finite-difference Hessian.
    accept_tol : float, optional
        Return the warm start itself, with the factor already computed there, when its
        decrement is below ``accept_tol`` at the first iteration (no step, no second
        factorisation): for gradients at points whose modes ``u0`` predicts to second order
        (finite-difference Hessian), where ``||û - u0||² ≲ accept_tol``.

    Raises
    ------
    ConvergenceError
        Non-finite deviance at ``u = 0`` or no decrease after 30 step-halvings.
    """
    struct, resp = model.struct, model.resp
    V = struct.zlambda(theta)
    fixed = model.X @ beta + resp.offset
    u = np.zeros(struct.q) if u0 is None else np.asarray(u0, dtype=float)
    ev = resp.evaluate(fixed + struct.z_times(V, u))
    if not np.isfinite(ev.dev) and u0 is not None:
        u = np.zeros(struct.q)
        ev = resp.evaluate(fixed)
    if not np.isfinite(ev.dev):
        raise ConvergenceError("PIRLS: non-finite deviance at the starting conditional modes "
                               f"(theta={np.round(theta, 6).tolist()}, beta={np.round(beta, 6).tolist()})")
    pdev = ev.dev + u @ u
    canonical = resp.canonical
    converged = False
    dec_prev = None  # decrement of the previous iteration if it took a full step
    it = 0
    for it in range(1, maxit + 1):
        fac = None
        if not canonical:
            try:
                fac = linalg.factorize(struct, V, resp.derivatives(ev)[2])
            except linalg.NotPositiveDefinite:
                fac = None
        fisher = fac is None
        if fisher:
            fac = linalg.factorize(struct, V, ev.W)
        rhs = struct.zt_times(V, ev.score(resp)) - u
        delta = linalg.solve_A(struct, fac, rhs)
        dec = float(delta @ rhs)
        if accept_tol is not None and it == 1 and dec < accept_tol and (canonical or fisher):
            return PirlsResult(u=u, V=V, ev=ev, fac=fac, iterations=1, converged=True)
        if dec < tol or (quad_tol is not None and dec < quad_tol and dec_prev is not None
                         and dec < 0.1 * dec_prev):
            un = u + delta
            evn = resp.evaluate(fixed + struct.z_times(V, un))
            if np.isfinite(evn.dev):
                u, ev = un, evn
            converged = True
            break
        step = 1.0
        for _ in range(30):
            un = u + step * delta
            evn = resp.evaluate(fixed + struct.z_times(V, un))
            pn = evn.dev + un @ un
            if np.isfinite(pn) and (pn <= pdev + 1e-10 * (1.0 + abs(pdev)) or dec < 1e-8):
                break
            step *= 0.5
        else:
            raise ConvergenceError(
                f"PIRLS: penalised deviance did not decrease after 30 step-halvings "
                f"(theta={np.round(theta, 6).tolist()})")
        u, ev, pdev = un, evn, pn
        dec_prev = dec if step == 1.0 else None
    fac = linalg.factorize(struct, V, ev.W)
    return PirlsResult(u=u, V=V, ev=ev, fac=fac, iterations=it, converged=converged)


def laplace_gradient(model: GlmmModel, pr: PirlsResult, jacobian: bool = False):
    """Analytic gradient of the Laplace deviance over (θ, β) at a PIRLS solution.

    With ``jacobian=True`` also returns ``dû/d(θ, β) = -H⁻¹ ∂g/∂(θ, β)`` (q × d), the
    sensitivity of the conditional modes, used to predict a warm start for PIRLS at the
    next (θ, β).
    """
    struct, resp, X = model.struct, model.resp, model.X
    V, u, ev, fac = pr.V, pr.u, pr.ev, pr.fac
    d1, dW, D2 = resp.derivatives(ev)
    # observation-major (K, n) arrays: Y[a] = Σ_b (A⁻¹)_(own a, own b) V[:, b]
    buf = linalg.inverse_buffer(struct, fac)
    if struct.K == 1:
        Y = linalg.own_products(struct, V, buf)
        q_own = V[:, 0] * Y[0]
    else:
        Y, q_own = kernels.own_products(V, buf, struct.gather_tgt_t)
    c = dW * q_own
    b = struct.zt_times(V, c)
    facH = fac
    if not resp.canonical:
        try:
            facH = linalg.factorize(struct, V, D2)
        except linalg.NotPositiveDefinite:
            facH = fac  # away from the mode the observed Hessian may be indefinite
    a = linalg.solve_A(struct, facH, b)
    cit = struct.col_index_t
    if struct.K == 1:
        s = d1 + c - D2 * struct.z_times(V, a)
        M = u[cit] * s + 2.0 * ev.W * Y - a[cit] * (0.5 * d1)
    else:
        s, M = kernels.gradient_rows(V, cit, u, a, d1, c, D2, ev.W, Y)
    g_beta = X.T @ s
    g_theta = np.empty(struct.ntheta)
    for t, cols in zip(struct.terms, struct.term_cols):
        G = (M[cols] @ t.Z).T  # Z_t' M_t
        g_theta[t.theta_offset:t.theta_offset + t.ntheta] = G[t.tril]
    grad = np.concatenate([g_theta, g_beta])
    if not jacobian:
        return grad
    # ∂g/∂z with g = Λ'Z'd1/2 + u;  J = -H⁻¹ ∂g/∂z
    nt = struct.ntheta
    Gz = np.empty((struct.q, nt + X.shape[1]))
    Gz[:, nt:] = struct.zt_times_matrix(V, D2[:, None] * X)
    half = 0.5 * d1
    uo = u[cit]  # (K, n)
    for t, cols in zip(struct.terms, struct.term_cols):
        rows, cc = t.tril
        for j, (r_, c_) in enumerate(zip(rows, cc)):
            E = t.Z[:, r_] * uo[cols.start + c_]
            col = struct.zt_times(V, D2 * E)
            col[t.offset + c_: t.offset + t.m * t.k: t.k] += np.bincount(
                t.codes, t.Z[:, r_] * half, minlength=t.m)
            Gz[:, t.theta_offset + j] = col
    J = -linalg.solve_A(struct, facH, Gz)
    return grad, J


def laplace(model: GlmmModel, theta: np.ndarray, beta: np.ndarray, u0: np.ndarray | None = None,
            *, gradient: bool = True, jacobian: bool = False, tol: float = 1e-10,
            maxit: int = 60, quad_tol: float | None = None,
            accept_tol: float | None = None) -> LaplaceEval:
    """Laplace deviance (full constants) and optionally its gradient at (θ, β).

    A PIRLS failure (non-finite deviance) gives ``deviance = inf`` and no gradient
    instead of raising, so that an optimiser can back off. With ``jacobian=True`` (and
    ``gradient=True``) the result also carries ``dû/d(θ, β)``.
    """
    try:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            return _laplace(model, theta, beta, u0, gradient, jacobian, tol, maxit, quad_tol, accept_tol)
    except (ConvergenceError, linalg.NotPositiveDefinite, FloatingPointError):
        return LaplaceEval(np.inf, None, None)


def _laplace(model, theta, beta, u0, gradient, jacobian, tol, maxit, quad_tol=None, accept_tol=None):
    pr = pirls(model, theta, beta, u0, tol=tol, maxit=maxit, quad_tol=quad_tol, accept_tol=accept_tol)
    dev = pr.ev.dev + model.resp.const + float(pr.u @ pr.u) + pr.fac.logdet
    J = None
    grad = None
    if gradient and np.isfinite(dev):
        out = laplace_gradient(model, pr, jacobian)
        grad, J = out if jacobian else (out, None)
    if not np.isfinite(dev):
        return LaplaceEval(np.inf, None, None)
    if grad is not None and not np.all(np.isfinite(grad)):
        return LaplaceEval(np.inf, None, None)
    return LaplaceEval(float(dev), grad, pr, J)

"""Linear mixed model: profiled (RE)ML deviance of θ with its analytic gradient.

Bates, Mächler, Bolker & Walker (2015), "Fitting Linear Mixed-Effects Models Using lme4",
section 3: with ``A = Λ'Z'WZΛ + I = L L'``, ``RZX = L⁻¹Λ'Z'WX``, ``RX'RX = X'WX - RZX'RZX``
and ``r²`` the penalised weighted residual sum of squares at the conditional estimates,

    ML:   d(θ)  = log|L|² + n (1 + log(2π r² / n)) - Σ log w
    REML: dR(θ) = log|L|² + log|RX|² + (n-p) (1 + log(2π r² / (n-p))) - Σ log w

The gradient uses the same own-block entries of ``A⁻¹`` as the GLMM gradient
(for REML, those of the full system including ``X``); ``r²`` is differentiated by the
envelope theorem.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.linalg import solve_triangular

from . import linalg
from .structure import Structure

__all__ = ["LmmModel", "LmmEval", "make_lmm", "profiled_deviance"]


@dataclass(frozen=True, eq=False)
class LmmModel:
    """Data of a weighted LMM (no state). ``y`` has the offset already subtracted."""

    struct: Structure
    X: np.ndarray
    y: np.ndarray
    weights: np.ndarray
    Xa: np.ndarray  # [X, y]
    XtWX: np.ndarray  # Xa' W Xa (constant)
    logw: float  # Σ log w over positive weights

    @property
    def n(self) -> int:
        return int(np.count_nonzero(self.weights > 0))

    @property
    def p(self) -> int:
        return self.X.shape[1]


def make_lmm(struct: Structure, X, y, weights, offset) -> LmmModel:
    """Build an :class:`LmmModel` (precomputes ``[X y]'W[X y]``)."""
    X = np.asarray(X, dtype=float)
    w = np.asarray(weights, dtype=float)
    yy = np.asarray(y, dtype=float) - np.asarray(offset, dtype=float)
    Xa = np.column_stack([X, yy])
    XtWX = Xa.T @ (w[:, None] * Xa)
    logw = float(np.log(w[w > 0]).sum())
    return LmmModel(struct, X, yy, w, Xa, XtWX, logw)


@dataclass(frozen=True, eq=False)
class LmmEval:
    """Profiled deviance and conditional estimates at one θ.

    Attributes
    ----------
    deviance : float
        ``d(θ)`` (ML) or ``dR(θ)`` (REML).
    gradient : ndarray or None
    beta, u : ndarray
        Conditional estimates of β and of the spherical random effects.
    sigma : float
        Residual sd (``r²/n`` or ``r²/(n-p)``).
    RX : ndarray (p, p)
    fac : linalg.Factor
    V : ndarray (n, K)
    pwrss : float
    """

    deviance: float
    gradient: np.ndarray | None
    beta: np.ndarray
    u: np.ndarray
    sigma: float
    RX: np.ndarray
    fac: linalg.Factor
    V: np.ndarray
    pwrss: float


def profiled_deviance(model: LmmModel, theta: np.ndarray, reml: bool = False, *,
                      gradient: bool = True) -> LmmEval:
    """Profiled ML/REML deviance of θ (see the module docstring).

    Raises
    ------
    linalg.NotPositiveDefinite
        ``X`` rank deficient given the random effects.
    """
    struct = model.struct
    W = model.weights
    p = model.p
    V = struct.zlambda(theta)
    fac = linalg.factorize(struct, V, W)
    fb = linalg.fixed_blocks(struct, fac, V, W, model.Xa, model.XtWX)
    R = fb.R
    RX = R[:p, :p]
    beta = solve_triangular(RX, R[:p, p], check_finite=False)
    u = linalg.solve_Lt(struct, fac, fb.RZX[:, p] - fb.RZX[:, :p] @ beta)
    pwrss = float(R[p, p] ** 2)
    n = model.n
    nd = n - p if reml else n
    logdet = fac.logdet + (2.0 * np.log(np.abs(np.diagonal(RX))).sum() if reml else 0.0)
    dev = logdet + nd * (1.0 + np.log(2.0 * np.pi * pwrss / nd)) - model.logw
    sigma = float(np.sqrt(pwrss / nd))
    grad = None
    if gradient:
        grad = _gradient(model, V, fac, fb, RX, beta, u, pwrss, nd, reml)
    return LmmEval(float(dev), grad, beta, u, sigma, RX, fac, V, pwrss)


def _gradient(model, V, fac, fb, RX, beta, u, pwrss, nd, reml):
    struct = model.struct
    W = model.weights
    p = model.p
    buf = linalg.inverse_buffer(struct, fac)
    own = linalg.own_inverse(struct, buf)
    Y = own[:, 0, :] * V if struct.K == 1 else np.einsum("nab,nb->na", own, V)
    ci = struct.col_index
    if reml:
        # top block of M⁻¹ ṽ_i: Y_i + F_own (F_own' v_i - RX⁻ᵀ x_i), F = L⁻ᵀ RZX RX⁻¹
        F = linalg.solve_Lt(struct, fac, solve_triangular(RX, fb.RZX[:, :p].T, trans="T",
                                                          check_finite=False).T)
        Fown = F[ci]  # (n, K, p)
        t = np.einsum("nkp,nk->np", Fown, V) - solve_triangular(RX, model.X.T, trans="T",
                                                                 check_finite=False).T
        Y = Y + np.einsum("nkp,np->nk", Fown, t)
    res = model.y - model.X @ beta - struct.z_times(V, u)
    M = 2.0 * W[:, None] * Y - (2.0 * nd / pwrss) * (W * res)[:, None] * u[ci]
    g = np.empty(struct.ntheta)
    for tl, cols in zip(struct.terms, struct.term_cols):
        G = tl.Z.T @ M[:, cols]
        g[tl.theta_offset:tl.theta_offset + tl.ntheta] = G[tl.tril]
    return g

"""Inference at the optimum: vcov (Hessian or RX based), Wald tables, diagnostics,
variance components and conditional modes as tables."""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import special
from scipy.linalg import solve_triangular

from . import linalg
from .structure import Structure

__all__ = [
    "Z975",
    "wald_table",
    "vcov_from_hessian",
    "vcov_from_rx",
    "scaled_gradient_ok",
    "is_singular",
    "canonical_theta",
    "varcorr_table",
    "ranef_table",
]

Z975 = float(special.ndtri(0.975))


def wald_table(names, beta: np.ndarray, se: np.ndarray) -> pd.DataFrame:
    """Wald table: term, estimate, std_error, statistic (z), p_value, 95% conf_low/high."""
    beta = np.asarray(beta, dtype=float)
    se = np.asarray(se, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = beta / se
    p = 2.0 * special.ndtr(-np.abs(z))
    return pd.DataFrame({
        "term": list(names), "estimate": beta, "std_error": se, "statistic": z, "p_value": p,
        "conf_low": beta - Z975 * se, "conf_high": beta + Z975 * se,
    })


def vcov_from_hessian(H: np.ndarray, ntheta: int):
    """lme4's Hessian-based vcov: the β block of ``(H/2)⁻¹`` over (θ, β).

    Returns
    -------
    V : ndarray (p, p) or None
        None if ``H`` is not positive definite (lme4 then falls back to RX).
    pd : bool
    """
    try:
        w = np.linalg.eigvalsh(H)
    except np.linalg.LinAlgError:
        return None, False
    if not np.all(np.isfinite(w)) or w.min() <= 0:
        return None, False
    Vfull = 2.0 * np.linalg.inv(H)
    Vfull = 0.5 * (Vfull + Vfull.T)
    return Vfull[ntheta:, ntheta:], True


def vcov_from_rx(RX: np.ndarray, scale2: float = 1.0) -> np.ndarray:
    """``σ² (RX'RX)⁻¹`` from the upper triangular ``RX``."""
    Ri = solve_triangular(RX, np.eye(RX.shape[0]), check_finite=False)
    return scale2 * (Ri @ Ri.T)


def scaled_gradient_ok(grad: np.ndarray, H: np.ndarray | None, tol: float = 2e-3) -> tuple[bool, float]:
    """lme4's ``checkConv`` gradient rule: ``max(min(|g|, |H⁻¹g|)) < tol``.

    Returns
    -------
    ok : bool
    maxmin : float
    """
    g = np.abs(np.asarray(grad, dtype=float))
    if H is not None:
        try:
            sc = np.abs(np.linalg.solve(np.linalg.cholesky(H), np.asarray(grad, dtype=float)))
            g = np.minimum(g, sc)
        except np.linalg.LinAlgError:
            pass
    m = float(g.max()) if g.size else 0.0
    return m < tol, m


def canonical_theta(struct: Structure, theta: np.ndarray) -> np.ndarray:
    """Flip signs of columns of each ``Λ_t`` so that its diagonal is non-negative.

    The deviance depends on ``Λ`` only through ``ΛΛ'``-invariant quantities up to sign
    flips of columns (``u`` flips with them), so this leaves every fit quantity unchanged.
    """
    th = np.array(theta, dtype=float)
    for t in struct.terms:
        seg = th[t.theta_offset:t.theta_offset + t.ntheta]
        rows, cols = t.tril
        for c in range(t.k):
            d = np.flatnonzero((rows == c) & (cols == c))[0]
            if seg[d] < 0:
                seg[cols == c] *= -1.0
        th[t.theta_offset:t.theta_offset + t.ntheta] = seg
    return th


def flip_u(struct: Structure, theta_old: np.ndarray, theta_new: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Conditional modes after :func:`canonical_theta` (flipped columns flip ``u``)."""
    u = np.array(u, dtype=float)
    for t in struct.terms:
        rows, cols = t.tril
        old = theta_old[t.theta_offset:t.theta_offset + t.ntheta]
        new = theta_new[t.theta_offset:t.theta_offset + t.ntheta]
        for c in range(t.k):
            d = np.flatnonzero((rows == c) & (cols == c))[0]
            if np.sign(old[d]) != np.sign(new[d]) and old[d] != 0:
                u[t.offset + np.arange(t.m) * t.k + c] *= -1.0
    return u


def is_singular(struct: Structure, theta: np.ndarray, tol: float = 1e-4) -> bool:
    """lme4's ``isSingular``: a diagonal θ (lower bound 0) below ``tol``."""
    th = np.asarray(theta)
    return bool(np.any(np.abs(th[struct.diag_theta]) < tol))


def varcorr_table(struct: Structure, theta: np.ndarray, sigma: float, residual: bool) -> pd.DataFrame:
    """Variance components in lme4 order.

    Rows: per group one variance row per term (``term2`` None: variance, sd), then one
    covariance row per pair (``variance`` = covariance, ``sd`` None, ``correlation``);
    a Gaussian fit adds ``"Residual"``.
    """
    rows = []
    s2 = sigma * sigma
    for t, lam in zip(struct.terms, struct.lambdas(theta)):
        S = s2 * (lam @ lam.T)
        sd = np.sqrt(np.diag(S))
        for i in range(t.k):
            rows.append((t.group, t.term_names[i], None, float(S[i, i]), float(sd[i]), None))
        for i in range(t.k):
            for j in range(i + 1, t.k):
                corr = float(S[i, j] / (sd[i] * sd[j])) if sd[i] > 0 and sd[j] > 0 else float("nan")
                rows.append((t.group, t.term_names[i], t.term_names[j], float(S[i, j]), None, corr))
    if residual:
        rows.append(("Residual", None, None, float(s2), float(sigma), None))
    return pd.DataFrame(rows, columns=["group", "term1", "term2", "variance", "sd", "correlation"])


def ranef_table(struct: Structure, theta: np.ndarray, u: np.ndarray, fac: linalg.Factor,
                sigma: float = 1.0) -> pd.DataFrame:
    """Conditional modes ``b = Λu`` and conditional sds (lme4's ``condVar``).

    ``cond_sd = σ sqrt(diag(Λ_t (A⁻¹)_gg Λ_t'))`` per level ``g`` of term ``t``.
    """
    buf = linalg.inverse_buffer(struct, fac)
    blocks = linalg.diag_blocks(struct, buf)
    groups, levels, terms, modes, sds = [], [], [], [], []
    for t, lam, Ainv in zip(struct.terms, struct.lambdas(theta), blocks):
        ut = u[t.offset:t.offset + t.m * t.k].reshape(t.m, t.k)
        b = ut @ lam.T
        if t.k == 1:
            var = lam[0, 0] ** 2 * Ainv[:, 0, 0][:, None]
        else:
            var = np.diagonal(np.einsum("ij,gjk,lk->gil", lam, Ainv, lam), axis1=1, axis2=2)
        sd = sigma * np.sqrt(np.maximum(var, 0.0))
        lv = np.asarray(t.levels, dtype=object)
        for j in range(t.k):
            groups.append(np.full(t.m, t.group, dtype=object))
            levels.append(lv)
            terms.append(np.full(t.m, t.term_names[j], dtype=object))
            modes.append(b[:, j])
            sds.append(sd[:, j])
    return pd.DataFrame({"group": np.concatenate(groups), "level": np.concatenate(levels),
                         "term": np.concatenate(terms), "mode": np.concatenate(modes),
                         "cond_sd": np.concatenate(sds)})

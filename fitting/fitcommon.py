"""Helpers shared by the fit drivers (:mod:`fitting.api`, :mod:`fitting.glmm_fit`)."""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import pandas as pd

__all__ = ["SNAP", "LOOSE_GTOL", "moment_sd", "moment_cov_theta", "start_vector", "ngroups", "information_criteria", "vcov_frame",
           "names_index", "is_pd", "newton_step", "zero_small_diagonals", "full_vcov_frame"]

#: a diagonal θ below this in absolute value is tried at exactly 0
SNAP = 1e-3
#: with a final Hessian, BFGS stops at this whitened gradient and a Newton step finishes
LOOSE_GTOL = 1e-3
#: moment starts of θ (:func:`moment_sd`) lie within [floor, cap]: the floor keeps a term
#: without evidence of a group effect off the symmetric stationary point θ = 0
MOMENT_FLOOR, MOMENT_CAP = 0.1, 10.0


def moment_sd(var):
    """Start θ of a scalar term from its moment estimate ``var`` of the random-effect
    variance: ``sqrt(var)`` within [:data:`MOMENT_FLOOR`, :data:`MOMENT_CAP`] (also for
    ``var <= 0``). Shared by the Newton paths (:func:`fitting.batch_newton.moment_theta`)
    and the BFGS path (:func:`fitting.glmm_fit.moment_theta_start`)."""
    return np.clip(np.sqrt(np.maximum(var, MOMENT_FLOOR ** 2)), MOMENT_FLOOR, MOMENT_CAP)


def moment_cov_theta(G: np.ndarray, s: np.ndarray, strata: np.ndarray, n_strata: int,
                     default: np.ndarray) -> np.ndarray:
    """Start θ of a vector-valued term (``k > 1``) by moments, for every stratum.

    The matrix version of :func:`moment_sd`'s estimate. At the GLM fit, each group's
    ``G_g = Σ W z z'`` and ``s_g = Σ score · z`` give ``b̂_g = G_g⁻¹ s_g`` with sampling
    covariance ``G_g⁻¹``. The mean over a stratum's groups of ``b̂_g b̂_g' - G_g⁻¹``
    estimates the random effects' covariance Σ. Its eigenvalues are clipped to
    [:data:`MOMENT_FLOOR`², :data:`MOMENT_CAP`²] and θ is read off the Cholesky factor of
    the result (lme4's column-major lower triangle). Groups whose ``G_g`` is singular
    (a slope column constant within the group, such as a district with no urban rows)
    are left out.

    Parameters
    ----------
    G : ndarray (m, k, k)
    s : ndarray (m, k)
    strata : ndarray (m,) of int
        Stratum of every group.
    n_strata : int
    default : ndarray (nt,)
        θ where the estimate cannot be formed (fewer than two usable groups).

    Returns
    -------
    ndarray (n_strata, nt)
    """
    m, k, _ = G.shape
    rows = np.array([r for c in range(k) for r in range(c, k)])
    cols = np.array([c for c in range(k) for r in range(c, k)])
    out = np.tile(np.asarray(default, dtype=float), (n_strata, 1))
    with np.errstate(all="ignore"):
        finite = np.all(np.isfinite(G), axis=(1, 2)) & np.all(np.isfinite(s), axis=1)
        Gf = np.where(finite[:, None, None], G, np.eye(k))
        lam = np.linalg.eigvalsh(Gf)
        ok = finite & (lam[:, -1] > 0) & (lam[:, 0] > 1e-8 * lam[:, -1])
        if not ok.any():
            return out
        Gi = np.linalg.inv(Gf[ok])
        b = np.einsum("gab,gb->ga", Gi, s[ok])
        c = (b[:, :, None] * b[:, None, :] - Gi).reshape(-1, k * k)
        where = strata[ok]
        cnt = np.bincount(where, minlength=n_strata)
        sums = np.stack([np.bincount(where, c[:, e], minlength=n_strata) for e in range(k * k)], axis=1)
        sig = sums.reshape(n_strata, k, k) / np.maximum(cnt, 1)[:, None, None]
        sig = 0.5 * (sig + np.swapaxes(sig, 1, 2))
        good = (cnt >= 2) & np.all(np.isfinite(sig), axis=(1, 2))
        if not good.any():
            return out
        w, U = np.linalg.eigh(sig[good])
        w = np.clip(w, MOMENT_FLOOR ** 2, MOMENT_CAP ** 2)
        L = np.linalg.cholesky((U * w[:, None, :]) @ np.swapaxes(U, 1, 2))
        out[good] = L[:, rows, cols]
    return out


def start_vector(ctl, key, size, what):
    """``control["start"][key]`` as a checked float vector, or None."""
    st = ctl["start"] or {}
    if st.get(key) is None:
        return None
    v = np.asarray(st[key], dtype=float).ravel()
    if v.size != size or not np.all(np.isfinite(v)):
        raise ValueError(f"control['start'][{key!r}] must have {size} finite values ({what}), got {v.size}")
    return v


def ngroups(struct) -> dict:
    """Number of levels per grouping factor, lme4 order."""
    return {t.group: t.m for t in struct.terms}


def information_criteria(loglik, df, n):
    """(AIC, BIC)."""
    return -2.0 * loglik + 2.0 * df, -2.0 * loglik + np.log(n) * df


@lru_cache(maxsize=512)
def names_index(names: tuple) -> pd.Index:
    """A shared (immutable) ``pd.Index`` of term names.

    Building an Index from a list of strings infers pandas' string dtype each time (~0.1 ms,
    half the cost of a small vcov frame); fits of the same model reuse one.
    """
    return pd.Index(list(names))


def vcov_frame(V, names):
    """vcov as a DataFrame labelled by term on both axes."""
    idx = names_index(tuple(names))
    return pd.DataFrame(V, index=idx, columns=idx)


def full_vcov_frame(H, names):
    """Covariance of ``(θ, β)``, ``2 H⁻¹``, labelled by ``names``; None without a PD ``H``.

    ``H`` is the Hessian of the deviance over ``(θ, β)`` the fit computed for its
    standard errors (stored as ``FitResult.vcov_full``).
    """
    if H is None or not is_pd(H):
        return None
    V = 2.0 * np.linalg.inv(H)
    return vcov_frame(0.5 * (V + V.T), names)


def is_pd(H) -> bool:
    """Finite and positive definite (a Cholesky factor exists)."""
    try:
        np.linalg.cholesky(H)
        return bool(np.all(np.isfinite(H)))
    except np.linalg.LinAlgError:
        return False


def newton_step(struct, z, H, g):
    """Newton step ``H⁻¹g`` over the free parameters, or None if ``H`` is not PD there.

    θ entries of a column of ``Λ`` whose diagonal is exactly 0 (a boundary fit) stay fixed:
    the deviance is flat to first order along them.
    """
    free = np.ones(z.size, dtype=bool)
    for t in struct.terms:
        rows, cols = t.tril
        seg = z[t.theta_offset:t.theta_offset + t.ntheta]
        for c in range(t.k):
            d = np.flatnonzero((rows == c) & (cols == c))[0]
            if seg[d] == 0.0:
                free[t.theta_offset + np.flatnonzero(cols == c)] = False
    Hf = H[np.ix_(free, free)]
    try:
        L = np.linalg.cholesky(Hf)
    except np.linalg.LinAlgError:
        return None
    step = np.zeros(z.size)
    step[free] = np.linalg.solve(L.T, np.linalg.solve(L, g[free]))
    if not np.all(np.isfinite(step)):
        return None
    return step


def zero_small_diagonals(struct, theta):
    """θ with near-zero diagonal entries (and the rest of their column) set to 0."""
    small = struct.diag_theta & (np.abs(theta) < SNAP) & (theta != 0)
    if not small.any():
        return None
    cand = theta.copy()
    for t in struct.terms:
        rows, cols = t.tril
        seg = cand[t.theta_offset:t.theta_offset + t.ntheta]
        for c in range(t.k):
            d = np.flatnonzero((rows == c) & (cols == c))[0]
            if small[t.theta_offset + d]:
                seg[cols == c] = 0.0
    return cand

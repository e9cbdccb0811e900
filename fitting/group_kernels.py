"""Compiled kernels of the batched one-grouping-factor path for vector-valued terms.

:mod:`fitting.batch_laplace` evaluates the Laplace deviance of many strata with one
grouping factor and ``k ≥ 2`` random-effects columns (``(urban | district)``) on rows
sorted by group. numpy spends a PIRLS iteration there in a dozen small calls over
per-group arrays and the derivatives in chains of ``(d, N)`` temporaries; here each is
one loop over the groups (numba, ``cache=True``), behind the switch of
:mod:`fitting.kernels` (``STRATAFIT_NUMBA=0``, or numba missing, turns them off). Every
function returns ``None`` when the kernels are off and the caller keeps its numpy path,
the twin the tests compare with.

Functions
---------
group_eta          ``η = base + Σ_c v_c u_{g(i)c}`` for rows sorted by group
group_step         one PIRLS step of every group: ``A_g = I + Σ W v v'``, ``A_g⁻¹`` (by
                   Cholesky), ``δ_g = A_g⁻¹(Σ s v - u_g)`` and the convergence test
group_derivatives  the gradient and Hessian of the deviance over (θ, β) and ``dû/dz``,
                   two passes over each group's rows
"""
from __future__ import annotations

import numpy as np

from . import kernels

__all__ = ["group_eta", "group_step", "group_derivatives"]

_compiled = None  # the jitted kernels (a namespace), built on first use


def _group_jit():
    """The jitted kernels, or ``False`` when :mod:`fitting.kernels` is switched off."""
    global _compiled
    if not kernels._jit():
        return False
    if _compiled is None:
        _compiled = _build()
    return _compiled


def _build():
    from types import SimpleNamespace

    from numba import njit

    @njit(cache=True, nogil=True)
    def group_eta(base, V, u, gstart, gsize):
        k = V.shape[0]
        out = base.copy()
        for g in range(gstart.shape[0]):
            a0 = gstart[g]
            for i in range(a0, a0 + gsize[g]):
                s = out[i]
                for c in range(k):
                    s += V[c, i] * u[g, c]
                out[i] = s
        return out

    @njit(cache=True, nogil=True)
    def group_step(W, sc, V, u, gstart, gsize, tol):
        k = V.shape[0]
        G = gstart.shape[0]
        A = np.empty((G, k, k))
        Ainv = np.empty((G, k, k))
        delta = np.empty((G, k))
        small = np.empty(G, dtype=np.bool_)
        acc = np.empty((k, k))
        r = np.empty(k)
        L = np.empty((k, k))
        Li = np.empty((k, k))
        for g in range(G):
            acc[:, :] = 0.0
            r[:] = 0.0
            a0 = gstart[g]
            for i in range(a0, a0 + gsize[g]):
                wi = W[i]
                si = sc[i]
                for a in range(k):
                    va = V[a, i]
                    r[a] += si * va
                    wva = wi * va
                    for b in range(a, k):
                        acc[a, b] += wva * V[b, i]
            for a in range(k):
                acc[a, a] += 1.0
                for b in range(a, k):
                    A[g, a, b] = acc[a, b]
                    A[g, b, a] = acc[a, b]
                r[a] -= u[g, a]
            # Cholesky A = LL' (A >= I for finite non-negative weights), then A⁻¹ = L⁻'L⁻¹
            good = True
            for j in range(k):
                d = acc[j, j]
                for m in range(j):
                    d -= L[j, m] * L[j, m]
                if not d > 0.0:
                    good = False
                    break
                L[j, j] = np.sqrt(d)
                for i in range(j + 1, k):
                    e = acc[j, i]
                    for m in range(j):
                        e -= L[i, m] * L[j, m]
                    L[i, j] = e / L[j, j]
            if not good:
                Ainv[g, :, :] = np.nan
                delta[g, :] = np.nan
                small[g] = False
                continue
            # Li = L⁻¹ (lower), column by column; then A⁻¹ = Li'Li. The same few lines as
            # kernels.inverse_dense1 on purpose: numba's cache notices edits to a kernel's own
            # file only, so a helper shared across the two files could run stale.
            for j in range(k):
                for i in range(k):
                    Li[i, j] = 0.0
                Li[j, j] = 1.0 / L[j, j]
                for i in range(j + 1, k):
                    e = 0.0
                    for m in range(j, i):
                        e -= L[i, m] * Li[m, j]
                    Li[i, j] = e / L[i, i]
            big = 0.0
            ubig = 0.0
            for a in range(k):
                for b in range(a, k):
                    e = 0.0
                    for m in range(b, k):
                        e += Li[m, a] * Li[m, b]
                    Ainv[g, a, b] = e
                    Ainv[g, b, a] = e
            for a in range(k):
                e = 0.0
                for b in range(k):
                    e += Ainv[g, a, b] * r[b]
                delta[g, a] = e
                if abs(e) > big:
                    big = abs(e)
                if abs(u[g, a]) > ubig:
                    ubig = abs(u[g, a])
            small[g] = big <= tol * (1.0 + ubig)
        return A, Ainv, delta, small

    @njit(cache=True, nogil=True)
    def group_derivatives(V, Z, X, u, Ainv, Huinv, W, d1, d2, d3, W1, W2, trow, tcol,
                          gstart, gsize, gstratum, S, order):
        k, N = V.shape
        p = X.shape[0]
        nt = trow.shape[0]
        d = nt + p
        G = gstart.shape[0]
        U1 = np.empty((G, k, d))
        grad = np.zeros((S, d))
        Hs = np.zeros((S, d, d))
        J = np.empty(d)
        E = np.empty(d)
        Y = np.empty(k)
        T = np.empty(nt)
        yv = np.empty(nt)
        B = np.empty((k, d))
        QP = np.empty((k, d))
        Ms = np.empty((nt, d))
        ZWZ = np.empty((k, k))
        Nm = np.empty((k, k))
        a = np.empty(k)
        sv = np.empty(k)
        Mg = np.empty((d, k, k))
        K = np.empty((d, k, k))
        Hrow = np.zeros((d, d))  # the row sums of the current stratum (upper triangle)
        for g in range(G):
            s = gstratum[g]
            if order >= 2 and (g == G - 1 or gstratum[g + 1] != s):
                last = True  # the stratum's last group: its row sums go to Hs below
            else:
                last = False
            a0 = gstart[g]
            a1 = a0 + gsize[g]
            B[:, :] = 0.0
            sv[:] = 0.0
            ZWZ[:, :] = 0.0
            Nm[:, :] = 0.0
            # pass 1: B = Σ d2 v J' (+ Σ d1 ∂v/∂θ), Σ c v, and the W-weighted Z products
            for i in range(a0, a1):
                q = 0.0
                for aa in range(k):
                    y = 0.0
                    for bb in range(k):
                        y += Ainv[g, aa, bb] * V[bb, i]
                    q += V[aa, i] * y
                cw = W1[i] * q
                for r in range(nt):
                    J[r] = Z[trow[r], i] * u[g, tcol[r]]
                for j in range(p):
                    J[nt + j] = X[j, i]
                d2i = d2[i]
                for aa in range(k):
                    va = V[aa, i]
                    sv[aa] += cw * va
                    dv = d2i * va
                    for j in range(d):
                        B[aa, j] += dv * J[j]
                d1i = d1[i]
                for r in range(nt):
                    B[tcol[r], r] += d1i * Z[trow[r], i]
                if order >= 2:
                    wi = W[i]
                    for aa in range(k):
                        wz = wi * Z[aa, i]
                        for bb in range(k):
                            ZWZ[aa, bb] += wz * Z[bb, i]
                            Nm[aa, bb] += wz * V[bb, i]
            # a = H_u⁻¹ Σ c v, U1 = dû/dz = -H_u⁻¹ B
            for aa in range(k):
                e = 0.0
                for bb in range(k):
                    e += Huinv[g, aa, bb] * sv[bb]
                a[aa] = e
                for j in range(d):
                    e = 0.0
                    for bb in range(k):
                        e += Huinv[g, aa, bb] * B[bb, j]
                    U1[g, aa, j] = -e
            QP[:, :] = 0.0
            Ms[:, :] = 0.0
            # pass 2: e_i = J_i + U1'v_i, the gradient rows and the Hessian's row sums
            for i in range(a0, a1):
                q = 0.0
                om = 0.0
                for aa in range(k):
                    y = 0.0
                    for bb in range(k):
                        y += Ainv[g, aa, bb] * V[bb, i]
                    Y[aa] = y
                    q += V[aa, i] * y
                    om += a[aa] * V[aa, i]
                cw = W1[i] * q
                for r in range(nt):
                    J[r] = Z[trow[r], i] * u[g, tcol[r]]
                for j in range(p):
                    J[nt + j] = X[j, i]
                for j in range(d):
                    e = J[j]
                    for c in range(k):
                        e += U1[g, c, j] * V[c, i]
                    E[j] = e
                d1i = d1[i]
                w2 = 2.0 * W[i]
                for j in range(d):
                    grad[s, j] += d1i * J[j] + cw * E[j]
                for r in range(nt):
                    yv[r] = Z[trow[r], i] * Y[tcol[r]]
                    grad[s, r] += w2 * yv[r]
                if order >= 2:
                    d2i = d2[i]
                    w1 = W1[i]
                    alpha = W2[i] * q - d3[i] * om
                    for r in range(nt):
                        T[r] = 2.0 * w1 * yv[r] - d2i * Z[trow[r], i] * a[tcol[r]]
                    # the symmetric part of d2 J J' + (αe + t)e' + e t' (t padded with
                    # zeros to d): d2 J J' + α e e' + t e' + e t', upper triangle
                    for j in range(d):
                        dj = d2i * J[j]
                        ej = E[j]
                        aj = alpha * ej
                        if j < nt:
                            aj += T[j]
                            for l in range(j, nt):
                                Hrow[j, l] += dj * J[l] + aj * E[l] + ej * T[l]
                        for l in range(max(j, nt), d):
                            Hrow[j, l] += dj * J[l] + aj * E[l]
                    cq = cw - d2i * om
                    for r in range(nt):
                        QP[tcol[r], r] += cq * Z[trow[r], i]
                        f = w1 * V[tcol[r], i] * V[trow[r], i]
                        for j in range(d):
                            Ms[r, j] += f * E[j]
            if order < 2:
                continue
            if last:
                for j in range(d):
                    for l in range(j, d):
                        Hs[s, j, l] += Hrow[j, l]
                        if l > j:
                            Hs[s, l, j] += Hrow[j, l]
                Hrow[:, :] = 0.0
            # per-group terms: (B + Q - P)'U1 + U1'(Q - P), 2 Vd'A⁻¹Vd, -tr(A⁻¹M_j A⁻¹M_l)
            for j in range(d):
                for l in range(d):
                    e = 0.0
                    for aa in range(k):
                        e += (B[aa, j] + QP[aa, j]) * U1[g, aa, l] + U1[g, aa, j] * QP[aa, l]
                    Hs[s, j, l] += e
            for r in range(nt):
                for r2 in range(nt):
                    Hs[s, r, r2] += 2.0 * ZWZ[trow[r], trow[r2]] * Ainv[g, tcol[r], tcol[r2]]
            for j in range(d):
                for r in range(nt):
                    Mg[j, tcol[r], trow[r]] = Ms[r, j]
                    Mg[j, trow[r], tcol[r]] = Ms[r, j]
            for r in range(nt):
                for c in range(k):
                    Mg[r, tcol[r], c] += Nm[trow[r], c]
                for c in range(k):
                    Mg[r, c, tcol[r]] += Nm[trow[r], c]
            for j in range(d):
                for aa in range(k):
                    for bb in range(k):
                        e = 0.0
                        for c in range(k):
                            e += Ainv[g, aa, c] * Mg[j, c, bb]
                        K[j, aa, bb] = e
            for j in range(d):
                for l in range(d):
                    e = 0.0
                    for aa in range(k):
                        for bb in range(k):
                            e += K[j, aa, bb] * K[l, bb, aa]
                    Hs[s, j, l] -= e
        return grad, Hs, U1


    return SimpleNamespace(group_eta=group_eta, group_step=group_step,
                           group_derivatives=group_derivatives)


# ----------------------------------------------------------------------------- API
def group_eta(base: np.ndarray, V: np.ndarray, u: np.ndarray, gstart: np.ndarray,
              gsize: np.ndarray):
    """``η_i = base_i + Σ_c V[c, i] u[g(i), c]`` for rows sorted by group.

    Parameters
    ----------
    base : ndarray (N,)
        Offset plus ``Xβ``.
    V : ndarray (k, N)
        ``v_i = Λ'z_i`` per row, one contiguous row per random-effects column.
    u : ndarray (G, k)
        Spherical modes of every group.
    gstart, gsize : ndarray (G,) of int
        First row and number of rows of every group (contiguous, non-empty).

    Returns
    -------
    ndarray (N,) or None
        ``None`` when numba is not in use (the caller takes its numpy path).
    """
    jit = _group_jit()
    if not jit:
        return None
    return jit.group_eta(base, V, u, gstart, gsize)


def group_step(W: np.ndarray, sc: np.ndarray, V: np.ndarray, u: np.ndarray,
               gstart: np.ndarray, gsize: np.ndarray, tol: float):
    """One penalised IRLS step of every group of a one-grouping-factor stack.

    ``A_g = I + Σ_{i∈g} W_i v_i v_i'``, its inverse (through its Cholesky factor), and the
    step ``δ_g = A_g⁻¹(Σ_{i∈g} s_i v_i - u_g)``, with ``small_g`` when
    ``max|δ_g| <= tol (1 + max|u_g|)``. A block that is not positive definite (non-finite
    weights) gets a NaN inverse and step.

    Parameters
    ----------
    W, sc : ndarray (N,)
        Fisher weights and scores (``-½ ∂d/∂η``) of the rows.
    V : ndarray (k, N)
    u : ndarray (G, k)
    gstart, gsize : ndarray (G,) of int
    tol : float

    Returns
    -------
    (A, Ainv, delta, small) or None
        ``(G, k, k)``, ``(G, k, k)``, ``(G, k)``, ``(G,)`` bool; ``None`` without numba.
    """
    jit = _group_jit()
    if not jit:
        return None
    return jit.group_step(W, sc, V, u, gstart, gsize, float(tol))


def group_derivatives(st, V: np.ndarray, u: np.ndarray, Ainv: np.ndarray, Huinv: np.ndarray,
                      W, d1, d2, d3, W1, W2, order: int):
    """Gradient, Hessian and ``dû/dz`` of the batched Laplace deviance of a one-factor stack.

    The formulas of :mod:`fitting.batch_laplace` (its module docstring), computed per group
    in two passes over the group's rows: the first sums ``B``, ``Σ c v`` and the
    ``W``-weighted ``Z`` products, the second forms ``e_i = J_i + U1'v_i`` and adds the
    gradient rows, the stratum's row sums ``Σ d2 J J' + (αe + t)e' + e t'`` and the
    group's ``Q - P`` and ``M`` sums, after which the per-group terms are added. No
    ``(d, N)`` temporaries.

    Parameters
    ----------
    st : fitting.batch_stack.Stack
    V : ndarray (k, N)
        ``v_i = Λ'z_i``.
    u, Ainv, Huinv : ndarray (G, k), (G, k, k), (G, k, k)
        Modes, ``A_g⁻¹`` and ``H_g⁻¹`` (the inverse curvature of the penalised deviance
        in ``u``; ``A_g⁻¹/2`` for canonical links).
    W, d1, d2, d3, W1, W2 : ndarray (N,)
        Fisher weights and the η-derivatives of the row deviance and of ``W``.
    order : {1, 2}
        2 adds the Hessian.

    Returns
    -------
    (g (S, d), Hs (S, d, d) or None, U1 (G, k, d)) or None
        ``Hs`` before symmetrisation; ``None`` without numba.
    """
    jit = _group_jit()
    if not jit:
        return None
    from .batch_stack import tril_layout

    trow, tcol = tril_layout(st.k)
    g, Hs, U1 = jit.group_derivatives(V, st.Z, st.X, u, Ainv, Huinv, W, d1, d2, d3, W1, W2,
                                      trow, tcol, st.group_start, st.group_size, st.group_stratum,
                                      st.S, int(order))
    return g, (Hs if order >= 2 else None), U1

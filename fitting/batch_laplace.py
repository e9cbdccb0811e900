"""Batched Laplace deviance of one-grouping-factor GLMMs: value, gradient, Hessian.

For a model with one grouping factor the random effects of different groups are
independent given (θ, β), so ``A = Λ'Z'WZΛ + I`` is block diagonal with one ``k×k``
block per group and the conditional modes solve one ``k``-dimensional problem per group.
:func:`evaluate` does this for all groups of all strata of a :class:`~fitting.batch_stack.Stack`
at once (penalised IRLS with per-group step-halving, like :func:`fitting.glmm.pirls`),
then the Laplace deviance with full constants

    ``f = Σ d_i(η̂_i) + const + Σ_g ||û_g||² + Σ_g log det A_g``   (one value per stratum)

and, on request, its exact gradient and Hessian over ``z = (θ, β)``.

Derivatives (per group; ``v_i = Λ'z_i``, ``η_i = x_i'β + v_i'u``, ``J_i = ∂η_i/∂z`` at fixed
``u``, ``Vd_i = ∂v_i/∂z`` (k×d), ``d1..d3`` the η-derivatives of the row deviance,
``W, W1, W2`` of the Fisher weight)::

    H   = Σ d2 v v' + 2I                 (curvature of the penalised deviance in u)
    B   = Σ d2 v J' + Σ d1 Vd            U1 = dû/dz = -H⁻¹B,   e_i = dη_i/dz = J_i + U1'v_i
    Y_i = A⁻¹v_i,  q_i = v_i'Y_i,  c_i = W1 q_i,  a = H⁻¹ Σ c v,  ω_i = a'v_i
    y_i = Vd_i'Y_i,  ζ_i = Vd_i'a

    ∇f  = Σ (d1 J + c e + 2 W y)
    ∇²f = Σ d2 J J' + B'U1                                     (penalised deviance)
        + Σ (W2 q - d3 ω) e e' + Σ (e t' + t e'),  t = 2 W1 y - d2 ζ
        + (Q-P)'U1 + U1'(Q-P),  Q - P = Σ (c - d2 ω) Vd
        + 2 Σ W Vd'A⁻¹Vd - [tr(A⁻¹ M_a A⁻¹ M_b)]_ab,  M_a = Σ W1 e_a v v' + W (Vd_a v' + v Vd_a')

(the log-determinant's Hessian needs the second derivatives of the modes only through
``a'(H d²û)``, which is why ``a`` appears). The gradient equals
:func:`fitting.glmm.laplace_gradient`; both are checked against finite differences in
the tests. Rows are summed by ``np.add.reduceat`` over 1-D arrays (one per column:
numpy's inner loops then run over the long axis); per-group ``k×k`` solves are batched
``np.linalg``. :func:`evaluate` sends ``k = 1`` to the faster
:func:`fitting.batch_scalar.evaluate_scalar`; :func:`evaluate_general` serves any ``k``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .batch_kernels import RowKernel
from .batch_stack import Stack, tril_layout

__all__ = ["BatchEval", "evaluate", "evaluate_general", "lambdas", "PIRLS_TOL", "PIRLS_MAXIT"]

#: PIRLS stops when every group's Fisher-scoring step is below this (max-abs, relative to 1 + |u|).
PIRLS_TOL = 1e-10
PIRLS_MAXIT = 60
_MAX_HALVINGS = 30


@dataclass(frozen=True, eq=False)
class BatchEval:
    """Laplace deviance (and derivatives) of every stratum of a stack at (θ, β).

    Attributes
    ----------
    f : ndarray (S,)
        Deviance ``-2 loglik`` (Laplace, full constants); ``inf`` where PIRLS failed.
    g : ndarray (S, d) or None
        Gradient over ``z = (θ, β)``.
    H : ndarray (S, d, d) or None
        Hessian over ``z``.
    u : ndarray (G, k)
        Conditional modes of the spherical random effects.
    Ainv : ndarray (G, k, k)
        ``A_g⁻¹`` (Fisher weights at the modes), for conditional variances.
    ok : ndarray (S,) of bool
        PIRLS converged and everything is finite.
    iterations : ndarray (S,) of int
        PIRLS iterations until all groups of the stratum converged.
    info_rx : ndarray (S, p, p) or None
        ``X'WX - X'WZΛ A⁻¹ Λ'Z'WX`` (the fixed-effects information conditional on θ).
    du : ndarray (G, k, d) or None
        ``dû/dz`` (order ≥ 1): predicts the modes at a nearby point (warm start).
    """

    f: np.ndarray
    g: np.ndarray | None
    H: np.ndarray | None
    u: np.ndarray
    Ainv: np.ndarray
    ok: np.ndarray
    iterations: np.ndarray
    info_rx: np.ndarray | None = None
    du: np.ndarray | None = None


def lambdas(theta: np.ndarray, k: int) -> np.ndarray:
    """Relative covariance factors ``Λ`` (S, k, k) from θ (S, nt), lme4's θ order."""
    rows, cols = tril_layout(k)
    lam = np.zeros((theta.shape[0], k, k))
    lam[:, rows, cols] = theta
    return lam


def _inv_blocks(A: np.ndarray) -> np.ndarray:
    if A.shape[1] == 1:
        return 1.0 / A
    return np.linalg.inv(A)


def _logdet_blocks(A: np.ndarray) -> np.ndarray:
    if A.shape[1] == 1:
        return np.log(A[:, 0, 0])
    sign, ld = np.linalg.slogdet(A)
    return np.where(sign > 0, ld, np.nan)


def _matvec(M: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``M @ x`` for stacks: (G, k, k) × (G, k) → (G, k)."""
    if M.shape[1] == 1:
        return M[:, :, 0] * x
    return np.einsum("gij,gj->gi", M, x)


def _gram(st: Stack, wv: list, v: list, eye: float) -> np.ndarray:
    """``eye·I + Σ_i wv_a v_b`` per group (symmetric, (G, k, k)); ``wv_a = weight·v_a``."""
    k = len(v)
    out = np.empty((st.G, k, k))
    for a in range(k):
        for b in range(a, k):
            out[:, a, b] = out[:, b, a] = st.by_group(wv[a] * v[b])
        out[:, a, a] += eye
    return out


# ----------------------------------------------------------------------- PIRLS
def _pirls(st, kern, v, base, u0, tol, maxit):
    """Per-group penalised IRLS; see :func:`evaluate`. Returns the state at the modes."""
    G, k = st.G, st.k
    u = np.zeros((G, k)) if u0 is None else np.array(u0, dtype=float).reshape(G, k)

    def at(uu):
        eta = base.copy()
        for c in range(k):
            eta += v[c] * st.to_rows(uu[:, c])
        W, sc, dev, aux = kern.basic(eta, st.y, st.w_arg, st.c_arg)
        h = st.by_group(dev)
        h += (uu * uu).sum(axis=1)
        return eta, W, sc, dev, aux, h

    state = at(u)
    if u0 is not None:
        bad_s = ~np.isfinite(st.groups_by_stratum(state[-1]))
        if bad_s.any():  # like fitting.glmm.pirls: a warm start giving a non-finite deviance → zeros
            u[st.strata_to_groups(bad_s)] = 0.0
            state = at(u)
    failed_s = ~np.isfinite(st.groups_by_stratum(state[-1]))
    iters = np.zeros(st.S, dtype=np.int64)
    conv_s = np.zeros(st.S, dtype=bool)
    for it in range(1, maxit + 1):
        eta, W, sc, dev, aux, h = state
        A = _gram(st, [W * vc for vc in v], v, 1.0)
        Ainv = _inv_blocks(A)
        grad = np.empty((G, k))
        for c in range(k):
            grad[:, c] = st.by_group(sc * v[c])
        delta = _matvec(Ainv, grad - u)
        small = np.abs(delta).max(axis=1) <= tol * (1.0 + np.abs(u).max(axis=1))
        small |= st.strata_to_groups(failed_s)
        newly = st.groups_by_stratum((~small).astype(np.int64)) == 0
        iters[newly & ~conv_s] = it
        conv_s |= newly
        if conv_s.all():
            break
        t = np.where(small, 0.0, 1.0)
        for _ in range(_MAX_HALVINGS):
            un = u + t[:, None] * delta
            new = at(un)
            bad = (t > 0) & ~(new[-1] <= h + 1e-10 * (1.0 + np.abs(h)))
            if not bad.any():
                break
            t[bad] *= 0.5
        else:
            # groups that never improved stay where they were; their strata have failed
            failed_s |= st.groups_by_stratum(bad.astype(np.int64)) > 0
            t[bad] = 0.0
            un = u + t[:, None] * delta
            new = at(un)
        u, state = un, new
    else:
        eta, W, sc, dev, aux, h = state
        A = _gram(st, [W * vc for vc in v], v, 1.0)
        Ainv = _inv_blocks(A)
        iters[~conv_s] = maxit
    return u, state, A, Ainv, conv_s & ~failed_s, iters


# --------------------------------------------------------------------- evaluate
def evaluate(st: Stack, kern: RowKernel, theta: np.ndarray, beta: np.ndarray,
             u0: np.ndarray | None = None, *, order: int = 2, tol: float = PIRLS_TOL,
             maxit: int = PIRLS_MAXIT, rx: bool = False) -> BatchEval:
    """Laplace deviance of every stratum of ``st`` at (θ, β), optionally with derivatives.

    Dispatches to :func:`fitting.batch_scalar.evaluate_scalar` for ``k = 1`` and to
    :func:`evaluate_general` otherwise (same arguments and result).
    """
    if st.k == 1:
        from .batch_scalar import evaluate_scalar

        return evaluate_scalar(st, kern, theta, beta, u0, order=order, tol=tol, maxit=maxit, rx=rx)
    return evaluate_general(st, kern, theta, beta, u0, order=order, tol=tol, maxit=maxit, rx=rx)


def evaluate_general(st: Stack, kern: RowKernel, theta: np.ndarray, beta: np.ndarray,
             u0: np.ndarray | None = None, *, order: int = 2, tol: float = PIRLS_TOL,
             maxit: int = PIRLS_MAXIT, rx: bool = False) -> BatchEval:
    """Laplace deviance of every stratum of ``st`` at (θ, β), optionally with derivatives.

    Parameters
    ----------
    st : Stack
    kern : RowKernel
    theta : ndarray (S, nt)
    beta : ndarray (S, p)
    u0 : ndarray (G, k), optional
        Warm start of the conditional modes (zeros by default).
    order : {0, 1, 2}
        0: deviance only; 1: and gradient; 2: and Hessian.
    tol, maxit : float, int
        PIRLS tolerance on every group's step and iteration cap.
    rx : bool
        Also return the fixed-effects information conditional on θ (``info_rx``).

    Returns
    -------
    BatchEval
    """
    k, p = st.k, st.p
    nt = k * (k + 1) // 2
    d = nt + p
    trow, tcol = tril_layout(k)
    Z, X = st.Z, st.X
    v = [np.zeros(st.N) for _ in range(k)]
    for r in range(nt):
        v[tcol[r]] += st.strata_to_rows(theta[:, r]) * Z[trow[r]]
    base = st.off.copy()
    for j in range(p):
        base += X[j] * st.strata_to_rows(beta[:, j])
    u, (eta, W, sc, dev, aux, _), A, Ainv, ok, iters = _pirls(st, kern, v, base, u0, tol, maxit)
    ld = _logdet_blocks(A)
    f = st.by_stratum(dev) + st.const + st.groups_by_stratum((u * u).sum(axis=1) + ld)
    ok = ok & np.isfinite(f)
    f = np.where(ok, f, np.inf)
    info = _info_rx(st, W, v, Ainv) if rx else None
    if order == 0:
        return BatchEval(f, None, None, u, Ainv, ok, iters, info)

    d2, d3, W1, W2 = kern.higher(eta, st.y, st.w_arg, aux)
    d1 = -2.0 * sc
    ur = [st.to_rows(u[:, c]) for c in range(k)]
    Y = [sum(st.to_rows(Ainv[:, c, b]) * v[b] for b in range(k)) for c in range(k)]
    q = sum(v[c] * Y[c] for c in range(k))
    cw = W1 * q
    d2v = [d2 * vc for vc in v]
    Huinv = _inv_blocks(_gram(st, d2v, v, 2.0))
    rvec = np.empty((st.G, k))
    for c in range(k):
        rvec[:, c] = st.by_group(cw * v[c])
    a = _matvec(Huinv, rvec)
    ar = [st.to_rows(a[:, c]) for c in range(k)]
    om = sum(v[c] * ar[c] for c in range(k))
    J = [Z[trow[r]] * ur[tcol[r]] for r in range(nt)] + [X[j] for j in range(p)]
    B = np.empty((st.G, k, d))
    for c in range(k):
        for i in range(d):
            B[:, c, i] = st.by_group(d2v[c] * J[i])
    for r in range(nt):
        B[:, tcol[r], r] += st.by_group(d1 * Z[trow[r]])
    U1 = -np.einsum("gij,gjd->gid", Huinv, B)
    e = []
    for i in range(d):
        ei = J[i].copy()
        for c in range(k):
            ei += st.to_rows(U1[:, c, i]) * v[c]
        e.append(ei)
    yv = [Z[trow[r]] * Y[tcol[r]] for r in range(nt)]
    W2x = 2.0 * W
    g = np.empty((st.S, d))
    for i in range(d):
        gi = d1 * J[i]
        gi += cw * e[i]
        if i < nt:
            gi += W2x * yv[i]
        g[:, i] = st.by_stratum(gi)
    ok = ok & np.all(np.isfinite(g), axis=1)
    if order == 1:
        return BatchEval(f, g, None, u, Ainv, ok, iters, info, U1)

    # ---------------------------------------------------------------- Hessian
    alpha = W2 * q - d3 * om
    t = [2.0 * W1 * yv[r] - d2 * Z[trow[r]] * ar[tcol[r]] for r in range(nt)]
    d2J = [d2 * Ji for Ji in J]
    ae = [alpha * ei for ei in e]
    Hs = np.empty((st.S, d, d))
    for i in range(d):
        for j in range(i, d):
            val = d2J[i] * J[j]
            val += ae[i] * e[j]
            if i < nt:
                val += t[i] * e[j]
            if j < nt:
                val += e[i] * t[j]
            Hs[:, i, j] = Hs[:, j, i] = st.by_stratum(val)
    QP = np.zeros((st.G, k, d))
    wq = cw - d2 * om
    for r in range(nt):
        QP[:, tcol[r], r] = st.by_group(wq * Z[trow[r]])
    Hg = np.einsum("gki,gkj->gij", B + QP, U1) + np.einsum("gki,gkj->gij", U1, QP)
    WZ = [W * Z[r] for r in range(k)]
    ZWZ = _gram(st, WZ, [Z[r] for r in range(k)], 0.0)
    Hg[:, :nt, :nt] += 2.0 * ZWZ[:, trow[:, None], trow[None, :]] * Ainv[:, tcol[:, None], tcol[None, :]]
    Nmat = np.empty((st.G, k, k))  # Σ W z_r v_c
    for r in range(k):
        for c in range(k):
            Nmat[:, r, c] = st.by_group(WZ[r] * v[c])
    Mg = np.empty((st.G, d, k, k))
    for b in range(k):
        for c in range(b, k):
            w1vv = W1 * v[b] * v[c]
            for i in range(d):
                Mg[:, i, b, c] = Mg[:, i, c, b] = st.by_group(w1vv * e[i])
    for r in range(nt):
        Mg[:, r, tcol[r], :] += Nmat[:, trow[r], :]
        Mg[:, r, :, tcol[r]] += Nmat[:, trow[r], :]
    if k == 1:
        Km = Mg[:, :, 0, 0] * Ainv[:, 0, 0][:, None]
        Hg -= Km[:, :, None] * Km[:, None, :]
    else:
        Km = np.einsum("gij,gajk->gaik", Ainv, Mg)
        Hg -= np.einsum("gaij,gbji->gab", Km, Km)
    H = Hs + st.groups_by_stratum(Hg)
    H = 0.5 * (H + np.swapaxes(H, 1, 2))
    ok = ok & np.all(np.isfinite(H), axis=(1, 2))
    return BatchEval(f, g, H, u, Ainv, ok, iters, info, U1)


def _info_rx(st: Stack, W: np.ndarray, v: list, Ainv: np.ndarray) -> np.ndarray:
    """``X'WX - Σ_g C_g'A_g⁻¹C_g`` per stratum with ``C_g = Σ W v x'``."""
    p, k = st.p, st.k
    X = st.X
    XtWX = np.empty((st.S, p, p))
    WX = [W * X[i] for i in range(p)]
    for i in range(p):
        for j in range(i, p):
            XtWX[:, i, j] = XtWX[:, j, i] = st.by_stratum(WX[i] * X[j])
    C = np.empty((st.G, k, p))
    for c in range(k):
        for j in range(p):
            C[:, c, j] = st.by_group(WX[j] * v[c])
    corr = np.einsum("gki,gkl,glj->gij", C, Ainv, C)
    info = XtWX - st.groups_by_stratum(corr)
    return 0.5 * (info + np.swapaxes(info, 1, 2))

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
the tests. Per-row quantities are ``(r, N)`` arrays (one contiguous row per column:
numpy's inner loops then run over the long axis), summed per group by one
``np.add.reduceat`` along the rows and per stratum by matrix products (``(d2 J) J'``,
``(αe + t) e'``, ``e t'``) for few strata; per-group ``k×k`` solves are batched
``np.linalg``/``matmul``. :func:`evaluate` sends ``k = 1`` to the faster
:func:`fitting.batch_scalar.evaluate_scalar`; :func:`evaluate_general` serves any ``k``.

With numba (:mod:`fitting.group_kernels`; only this ``k ≥ 2`` path loads it), a PIRLS
iteration's per-group work is :func:`~fitting.group_kernels.group_eta` and
:func:`~fitting.group_kernels.group_step`, and the gradient, Hessian and ``dû/dz`` are
:func:`~fitting.group_kernels.group_derivatives` (two passes over each group's rows, no
``(d, N)`` temporaries); the numpy code here is their twin (``STRATAFIT_NUMBA=0``) and
gives the same numbers to rounding.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import group_kernels, kernels
from .batch_kernels import RowKernel
from .batch_stack import Stack, tril_layout

__all__ = ["BatchEval", "evaluate", "halve_steps", "evaluate_general", "lambdas", "strata_sums", "strata_gram",
           "PIRLS_TOL", "PIRLS_MAXIT", "CHECK_STEP"]

#: PIRLS stops when every group's Fisher-scoring step is below this (max-abs, relative to 1 + |u|).
PIRLS_TOL = 1e-10
PIRLS_MAXIT = 60
_MAX_HALVINGS = 30
#: PIRLS steps up to this size (every component of every group) skip the step-halving check
CHECK_STEP = 0.1


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
    if A.shape[1] == 2:  # closed form: np.linalg's per-call overhead dominates 2×2 blocks
        det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
        if np.all(det > 0):
            out = np.empty_like(A)
            out[:, 0, 0] = A[:, 1, 1] / det
            out[:, 1, 1] = A[:, 0, 0] / det
            out[:, 0, 1] = -A[:, 0, 1] / det
            out[:, 1, 0] = -A[:, 1, 0] / det
            return out
    return np.linalg.inv(A)


def _logdet_blocks(A: np.ndarray) -> np.ndarray:
    if A.shape[1] == 1:
        return np.log(A[:, 0, 0])
    if A.shape[1] == 2:
        det = A[:, 0, 0] * A[:, 1, 1] - A[:, 0, 1] * A[:, 1, 0]
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(det > 0, np.log(det), np.nan)
    sign, ld = np.linalg.slogdet(A)
    return np.where(sign > 0, ld, np.nan)


def _matvec(M: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``M @ x`` for stacks: (G, k, k) × (G, k) → (G, k)."""
    if M.shape[1] == 1:
        return M[:, :, 0] * x
    if M.shape[1] == 2:  # closed form (einsum's setup dominates 2×2 products)
        out = np.empty_like(x)
        out[:, 0] = M[:, 0, 0] * x[:, 0] + M[:, 0, 1] * x[:, 1]
        out[:, 1] = M[:, 1, 0] * x[:, 0] + M[:, 1, 1] * x[:, 1]
        return out
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
def _pirls(st, kern, v, V, base, u0, tol, maxit):
    """Per-group penalised IRLS; see :func:`evaluate`. Returns the state at the modes.

    As in :mod:`fitting.batch_scalar`, a step of at most :data:`CHECK_STEP` (every
    component of every group) is taken without the deviance pass of the step-halving
    check: Newton is then inside its region of quadratic convergence. ``V`` is ``v``
    stacked, (k, N); with numba, :func:`fitting.group_kernels.group_eta` and
    :func:`~fitting.group_kernels.group_step` do the per-group work of an iteration in two
    loops (the numpy path below computes the same numbers in a dozen calls).
    """
    G, k = st.G, st.k
    u = np.zeros((G, k)) if u0 is None else np.array(u0, dtype=float).reshape(G, k)
    w_arg, c_arg = st.w_arg, st.c_arg
    fused = kernels.enabled()
    gstart, gsize = st.group_start, st.group_size

    def step(W, sc, uu):
        """``A, A⁻¹, δ, small`` of every group at the state's weights and scores."""
        if fused:
            return group_kernels.group_step(W, sc, V, uu, gstart, gsize, tol)
        A = _gram(st, [W * vc for vc in v], v, 1.0)
        Ainv = _inv_blocks(A)
        grad = np.empty((G, k))
        for c in range(k):
            grad[:, c] = st.by_group(sc * v[c])
        delta = _matvec(Ainv, grad - uu)
        small = np.abs(delta).max(axis=1) <= tol * (1.0 + np.abs(uu).max(axis=1))
        return A, Ainv, delta, small

    def at(uu, with_h=True):
        if fused:
            eta = group_kernels.group_eta(base, V, uu, gstart, gsize)
        else:
            eta = base.copy()
            for c in range(k):
                eta += v[c] * st.to_rows(uu[:, c])
        W, sc, _, aux = kern.basic(eta, st.y, w_arg, c_arg, deviance=False)
        state = [eta, W, sc, aux, None, None]
        if with_h:
            h_at(state, uu)
        return state

    def h_at(state, uu):
        """Row deviances and the per-group penalised deviance of a state (stored in it)."""
        state[4] = kern.deviance_rows(state[0], st.y, w_arg, c_arg, state[3])
        h = st.by_group(state[4])
        h += (uu * uu).sum(axis=1)
        state[5] = h
        return h

    state = at(u, False)
    if u0 is not None:
        bad_s = ~np.isfinite(st.by_stratum(state[0]))
        if bad_s.any():  # like fitting.glmm.pirls: a warm start giving non-finite values → zeros
            u[st.strata_to_groups(bad_s)] = 0.0
            state = at(u, False)
    failed_s = ~np.isfinite(st.by_stratum(state[0]))
    iters = np.zeros(st.S, dtype=np.int64)
    conv_s = np.zeros(st.S, dtype=bool)
    for it in range(1, maxit + 1):
        eta, W, sc, aux, _, h = state
        A, Ainv, delta, small = step(W, sc, u)
        small |= st.strata_to_groups(failed_s)
        newly = st.groups_by_stratum((~small).astype(np.int64)) == 0
        iters[newly & ~conv_s] = it
        conv_s |= newly
        if conv_s.all():
            break
        t = np.where(small, 0.0, 1.0)
        if np.abs(delta[~small]).max() <= CHECK_STEP:
            u = u + t[:, None] * delta
            state = at(u, False)
            continue
        if h is None:
            h = h_at(state, u)
        u, state, stuck_s = halve_steps(st, u, delta, t, h, at)
        failed_s |= stuck_s
    else:
        eta, W, sc, aux, _, h = state
        A, Ainv, _, _ = step(W, sc, u)
        iters[~conv_s] = maxit
    eta, W, sc, aux, dev, _ = state
    if dev is None:
        dev = kern.deviance_rows(eta, st.y, w_arg, c_arg, aux)
    return u, (eta, W, sc, dev, aux, None), A, Ainv, conv_s & ~failed_s, iters


# --------------------------------------------------------------------- evaluate
def halve_steps(st: Stack, u: np.ndarray, delta: np.ndarray, t: np.ndarray, h: np.ndarray,
                evaluate):
    """Step-halving of a PIRLS step for all groups at once.

    Parameters
    ----------
    st : Stack
    u, delta : ndarray (G,) or (G, k)
        Current modes and the full Newton step per group.
    t : ndarray (G,)
        Initial step fractions (0 for groups already converged, else 1).
    h : ndarray (G,)
        Current per-group penalised deviance.
    evaluate : callable
        ``evaluate(u_new)`` returning the state tuple whose last item is the new per-group
        penalised deviance.

    Returns
    -------
    u_new, state, stuck_s
        The accepted modes, their state, and a (S,) mask of strata with a group that never
        improved within ``_MAX_HALVINGS`` halvings (those groups stay where they were).
    """
    shape = (-1,) + (1,) * (delta.ndim - 1)
    for _ in range(_MAX_HALVINGS):
        un = u + t.reshape(shape) * delta
        new = evaluate(un)
        bad = (t > 0) & ~(new[-1] <= h + 1e-10 * (1.0 + np.abs(h)))
        if not bad.any():
            return un, new, np.zeros(st.S, dtype=bool)
        t[bad] *= 0.5
    stuck_s = st.groups_by_stratum(bad.astype(np.int64)) > 0
    t[bad] = 0.0
    un = u + t.reshape(shape) * delta
    return un, evaluate(un), stuck_s


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
    V = np.stack(v)
    u, (eta, W, sc, dev, aux, _), A, Ainv, ok, iters = _pirls(st, kern, v, V, base, u0, tol, maxit)
    ld = _logdet_blocks(A)
    f = st.by_stratum(dev) + st.const + st.groups_by_stratum((u * u).sum(axis=1) + ld)
    ok = ok & np.isfinite(f)
    f = np.where(ok, f, np.inf)
    info = _info_rx(st, W, v, Ainv) if rx else None
    if order == 0:
        return BatchEval(f, None, None, u, Ainv, ok, iters, info)

    d2, d3, W1, W2 = kern.higher(eta, st.y, st.w_arg, aux)
    d1 = -2.0 * sc
    if kernels.enabled():
        Huinv = 0.5 * Ainv if kern.canonical else _inv_blocks(_gram(st, list(d2 * V), v, 2.0))
        g, Hs, U1 = group_kernels.group_derivatives(st, V, u, Ainv, Huinv, W, d1, d2, d3, W1, W2, order)
        ok = ok & np.all(np.isfinite(g), axis=1)
        if order == 1:
            return BatchEval(f, g, None, u, Ainv, ok, iters, info, U1)
        H = 0.5 * (Hs + np.swapaxes(Hs, 1, 2))
        ok = ok & np.all(np.isfinite(H), axis=(1, 2))
        return BatchEval(f, g, H, u, Ainv, ok, iters, info, U1)
    # rows of (k, N) / (d, N) arrays: each sum below is one product and one reduction
    Zt = Z[trow]  # (nt, N): the Z column of every θ entry
    Ur = _rows(st, u)
    Y = (_rows(st, Ainv).reshape(k, k, st.N) * V[None, :, :]).sum(axis=1)  # Y_i = A⁻¹v_i
    q = (V * Y).sum(axis=0)
    cw = W1 * q
    d2V = d2 * V
    # H_u = Σ d2 v v' + 2I: with a canonical link d2 = 2W, so H_u = 2A (A at the modes)
    Huinv = 0.5 * Ainv if kern.canonical else _inv_blocks(_gram(st, list(d2V), v, 2.0))
    a = _matvec(Huinv, _group_sums(st, cw * V))
    Ar = _rows(st, a)
    om = (V * Ar).sum(axis=0)
    Jm = np.empty((d, st.N))
    np.multiply(Zt, Ur[tcol], out=Jm[:nt])
    Jm[nt:] = X
    B = _group_sums(st, (d2V[:, None, :] * Jm[None, :, :]).reshape(k * d, st.N)).reshape(st.G, k, d)
    B[:, tcol, np.arange(nt)] += _group_sums(st, d1 * Zt)
    U1 = -(Huinv @ B)
    Em = Jm + (_rows(st, U1).reshape(k, d, st.N) * V[:, None, :]).sum(axis=0)  # e_i = dη_i/dz
    yv = Zt * Y[tcol]
    Gm = d1 * Jm
    Gm += cw * Em
    Gm[:nt] += (2.0 * W) * yv
    g = strata_sums(st, Gm)
    ok = ok & np.all(np.isfinite(g), axis=1)
    if order == 1:
        return BatchEval(f, g, None, u, Ainv, ok, iters, info, U1)

    # ---------------------------------------------------------------- Hessian
    alpha = W2 * q - d3 * om
    T = 2.0 * W1 * yv - d2 * Zt * Ar[tcol]  # (nt, N)
    L = alpha * Em
    L[:nt] += T
    Hs = strata_gram(st, d2 * Jm, Jm) + strata_gram(st, L, Em)  # Σ d2 J J' + (αe + t) e'
    Hs[:, :, :nt] += strata_gram(st, Em, T)  # + e t'
    QP = np.zeros((st.G, k, d))
    QP[:, tcol, np.arange(nt)] = _group_sums(st, (cw - d2 * om) * Zt)
    # per-group terms, summed over each stratum's groups as they are formed (_group_cross)
    Hs += _group_cross(st, B + QP, U1) + _group_cross(st, U1, QP)
    WZ = W * Z
    ZWZ = _gram(st, list(WZ), list(Z), 0.0)
    Hs[:, :nt, :nt] += st.groups_by_stratum(
        2.0 * ZWZ[:, trow[:, None], trow[None, :]] * Ainv[:, tcol[:, None], tcol[None, :]])
    Nmat = _group_sums(st, (WZ[:, None, :] * V[None, :, :]).reshape(k * k, st.N)).reshape(st.G, k, k)
    pb, pc = tcol, trow  # the upper-triangle pairs (b <= c), in np.triu_indices(k) order
    w1vv = W1 * V[pb] * V[pc]  # (npair, N)
    sums = _group_sums(st, (w1vv[:, None, :] * Em[None, :, :]).reshape(pb.size * d, st.N))
    sums = sums.reshape(st.G, pb.size, d).transpose(0, 2, 1)  # (G, d, npair)
    Mg = np.empty((st.G, d, k, k))
    Mg[:, :, pb, pc] = sums
    Mg[:, :, pc, pb] = sums
    for r in range(nt):
        Mg[:, r, tcol[r], :] += Nmat[:, trow[r], :]
        Mg[:, r, :, tcol[r]] += Nmat[:, trow[r], :]
    if k == 1:
        Km = (Mg[:, :, 0, 0] * Ainv[:, 0, 0][:, None])[:, None, :]  # (G, 1, d)
        Hs -= _group_cross(st, Km, Km)
    else:  # tr(A⁻¹M_a A⁻¹M_b) = Σ_ij K_a[i,j] K_b[j,i], K_a = A⁻¹M_a
        Km = _blocks_times(Ainv, Mg)  # (G, d, k, k)
        Kf = Km.reshape(st.G, d, k * k).transpose(0, 2, 1)  # (G, k², d): entries (i, j)
        Kt = np.swapaxes(Km, 2, 3).reshape(st.G, d, k * k).transpose(0, 2, 1)  # entries (j, i)
        Hs -= _group_cross(st, Kf, Kt)
    H = 0.5 * (Hs + np.swapaxes(Hs, 1, 2))
    ok = ok & np.all(np.isfinite(H), axis=(1, 2))
    return BatchEval(f, g, H, u, Ainv, ok, iters, info, U1)


#: :func:`strata_gram` takes one matrix product per stratum for at most this many strata
#: or strata of at least :data:`_GRAM_ROWS` rows on average (measured faster on 40-100
#: strata of 130-200 rows), else sums the row products by segments
_GRAM_LOOP = 16
_GRAM_ROWS = 64


def _group_cross(st: Stack, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``Σ_g A_g' B_g`` over the groups of every stratum, for ``A`` (G, r, d1), ``B`` (G, r, d2).

    One matrix product for a single stratum (``fitting.fit``'s one-stratum stack), else
    the per-group products summed by stratum. Returns (S, d1, d2).
    """
    if st.S == 1:
        return (A.reshape(-1, A.shape[2]).T @ B.reshape(-1, B.shape[2]))[None]
    return st.groups_by_stratum(np.swapaxes(A, 1, 2) @ B)


def _blocks_times(Ainv: np.ndarray, M: np.ndarray) -> np.ndarray:
    """``A_g⁻¹ M_ga`` for ``Ainv`` (G, k, k) and ``M`` (G, d, k, k): (G, d, k, k).

    Closed form for ``k = 2`` (matmul's per-item overhead dominates 2×2 products).
    """
    if Ainv.shape[1] != 2:
        return Ainv[:, None, :, :] @ M
    a00, a01 = Ainv[:, 0, 0, None], Ainv[:, 0, 1, None]
    a10, a11 = Ainv[:, 1, 0, None], Ainv[:, 1, 1, None]
    m00, m01, m10, m11 = M[:, :, 0, 0], M[:, :, 0, 1], M[:, :, 1, 0], M[:, :, 1, 1]
    out = np.empty_like(M)
    out[:, :, 0, 0] = a00 * m00 + a01 * m10
    out[:, :, 0, 1] = a00 * m01 + a01 * m11
    out[:, :, 1, 0] = a10 * m00 + a11 * m10
    out[:, :, 1, 1] = a10 * m01 + a11 * m11
    return out


def _rows(st: Stack, per_group: np.ndarray) -> np.ndarray:
    """A per-group array (G, ...) broadcast to the rows as (r, N), ``r`` = its trailing size."""
    return np.repeat(per_group.reshape(st.G, -1).T, st.group_size, axis=1)


def _group_sums(st: Stack, M: np.ndarray) -> np.ndarray:
    """Per-group sums of the rows of ``M`` (r, N): (G, r)."""
    return np.add.reduceat(M, st.group_start, axis=1).T


def strata_sums(st: Stack, M: np.ndarray) -> np.ndarray:
    """Per-stratum sums of the rows of ``M`` (r, N): (S, r)."""
    if st.S == 1:
        return M.sum(axis=1)[None, :]
    return np.add.reduceat(M, st.row_start, axis=1).T


def strata_gram(st: Stack, A: np.ndarray, B: np.ndarray) -> np.ndarray:
    """``Σ_i a_i b_i'`` per stratum for ``A`` (r, N), ``B`` (q, N): (S, r, q).

    A matrix product per stratum (BLAS) for few or large strata; for many small strata
    the ``r·q`` row products summed by segments.
    """
    if st.S <= _GRAM_LOOP or st.N >= _GRAM_ROWS * st.S:
        out = np.empty((st.S, A.shape[0], B.shape[0]))
        ends = st.row_start + st.row_count
        for s in range(st.S):
            a, b = st.row_start[s], ends[s]
            out[s] = A[:, a:b] @ B[:, a:b].T
        return out
    prod = (A[:, None, :] * B[None, :, :]).reshape(A.shape[0] * B.shape[0], st.N)
    return np.add.reduceat(prod, st.row_start, axis=1).T.reshape(st.S, A.shape[0], B.shape[0])


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

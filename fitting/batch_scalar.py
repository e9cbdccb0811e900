"""Scalar random effects (``k = 1``, e.g. ``(1 | g)``): the fast path of the batched Laplace.

Same quantities as :func:`fitting.batch_laplace.evaluate_general` (which documents the
formulas), reorganised for ``k = 1`` so that almost all row work is a handful of
weighted sums of *fixed* features. With ``f_i = (z_i, x_i)`` (``z`` the random-effects
column, ``x`` the fixed-effects row) every row-level vector of the derivation is a
group-constant linear map of ``f_i``:

    ``J_i = P0_g f_i``, ``e_i = P_g f_i`` with ``P0_g`` holding ``û_g`` and the identity,
    ``P_g = P0_g + θ U1_g e_z'``,

so ``Σ ω J J' = P0 (Σ ω f f') P0'`` etc. Per evaluation the rows only produce the
per-group sums ``Σ d1 f``, ``Σ W1 z² f``, ``Σ W z²`` and the Grams ``Σ d2 f f'``,
``Σ α f f'`` (two row weights ``α = W2 q - d3 ω``, ``τ``); everything else is (G, d, m)
algebra. Feature columns that are all ones (the intercept, ``z`` of ``(1 | g)``) are
never multiplied, and equal feature products are summed once.
"""
from __future__ import annotations

import numpy as np

from .batch_kernels import RowKernel
from .batch_laplace import CHECK_STEP, BatchEval, halve_steps

__all__ = ["evaluate_scalar"]


def _features(st):
    """``(fkey, pkey, arrays)``: feature and product keys and the non-trivial arrays."""
    if "features" in st.cache:
        return st.cache["features"]
    cols = [st.Z[0]] + [st.X[j] for j in range(st.p)]
    ones = st.cache.get("ones")  # inherited from the parent stack by Stack.take
    if ones is None:
        ones = st.cache["ones"] = [bool(np.all(c == 1.0)) for c in cols]
    fkey = [() if one else (j,) for j, one in enumerate(ones)]
    arrays = {(j,): c for j, (c, one) in enumerate(zip(cols, ones)) if not one}
    m = len(cols)
    pkey = {}
    for a in range(m):
        for b in range(a, m):
            key = tuple(sorted(fkey[a] + fkey[b]))
            pkey[a, b] = key
            if len(key) == 2 and key not in arrays:
                arrays[key] = cols[key[0]] * cols[key[1]]
    z = None if ones[0] else cols[0]
    out = (fkey, pkey, arrays, z, None if z is None else z * z)
    st.cache["features"] = out
    return out


def _sums(st, w, keys, arrays):
    """``{key: Σ_g w·feature(key)}`` for the distinct keys."""
    out = {}
    for key in set(keys):
        out[key] = st.by_group(w if not key else w * arrays[key])
    return out


def _vec(st, w, fkey, arrays):
    s = _sums(st, w, fkey, arrays)
    return np.stack([s[k] for k in fkey], axis=1)  # (G, m)


def _gram(st, w, pkey, arrays, m):
    s = _sums(st, w, pkey.values(), arrays)
    out = np.empty((st.G, m, m))
    for (a, b), key in pkey.items():
        out[:, a, b] = out[:, b, a] = s[key]
    return out


def _pirls(st, kern, z, z2, th, base, u0, tol, maxit):
    """Per-group Newton (Fisher scoring) for ``û``, step-halving on large steps only.

    A step larger than :data:`CHECK_STEP` (any group) is checked group by group
    against the penalised deviance ``Σ dev + u²`` and halved where it does not
    decrease; smaller steps are taken as they are (Newton is then well inside its
    region of quadratic convergence), which saves the deviance pass. A group whose
    step grows again is caught by the check on the next step.
    """
    G = st.G
    u = np.zeros(G) if u0 is None else np.array(u0, dtype=float).reshape(G)
    w_arg, c_arg = st.w_arg, st.c_arg

    def at(uu, with_h):
        shift = st.to_rows(th * uu)
        eta = base + (shift if z is None else z * shift)
        W, sc, _, aux = kern.basic(eta, st.y, w_arg, c_arg, deviance=False)
        return [eta, W, sc, aux, h_at(eta, aux, uu) if with_h else None]

    def h_at(eta, aux, uu):
        h = st.by_group(kern.deviance_rows(eta, st.y, w_arg, c_arg, aux))
        h += uu * uu
        return h

    def sums(W, sc):
        if z is None:
            return st.by_group(W), st.by_group(sc)
        return st.by_group(W * z2), st.by_group(sc * z)

    state = at(u, False)
    if u0 is not None:
        bad_s = ~np.isfinite(st.by_stratum(state[0]))
        if bad_s.any():  # like fitting.glmm.pirls: a warm start giving non-finite values → zeros
            u[st.strata_to_groups(bad_s)] = 0.0
            state = at(u, False)
    failed_s = ~np.isfinite(st.by_stratum(state[0]))
    iters = np.zeros(st.S, dtype=np.int64)
    conv_s = np.zeros(st.S, dtype=bool)
    th2 = th * th
    for it in range(1, maxit + 1):
        SW, Ss = sums(state[1], state[2])
        A = 1.0 + th2 * SW
        delta = (th * Ss - u) / A
        small = np.abs(delta) <= tol * (1.0 + np.abs(u))
        small |= st.strata_to_groups(failed_s)
        newly = st.groups_by_stratum((~small).astype(np.int64)) == 0
        iters[newly & ~conv_s] = it
        conv_s |= newly
        if conv_s.all():
            break
        t = np.where(small, 0.0, 1.0)
        if np.abs(delta[~small]).max() <= CHECK_STEP:
            u = u + t * delta
            state = at(u, False)
            continue
        if state[-1] is None:
            state[-1] = h_at(state[0], state[3], u)
        h = state[-1]
        u, state, stuck_s = halve_steps(st, u, delta, t, h, lambda un: at(un, True))
        failed_s |= stuck_s
    else:
        SW, Ss = sums(state[1], state[2])
        A = 1.0 + th2 * SW
        iters[~conv_s] = maxit
    eta, W, sc, aux, _ = state
    dev = kern.deviance_rows(eta, st.y, w_arg, c_arg, aux)
    return u, (eta, W, sc, dev, aux, None), SW, A, conv_s & ~failed_s, iters


def evaluate_scalar(st, kern: RowKernel, theta: np.ndarray, beta: np.ndarray, u0=None, *,
                    order: int = 2, tol: float, maxit: int, rx: bool = False):
    """:func:`fitting.batch_laplace.evaluate` for ``k = 1`` (same arguments and result)."""
    p = st.p
    m = 1 + p  # features (z, x); z = (θ, β) has the same layout
    fkey, pkey, arrays, z, z2 = _features(st)
    base = st.off.copy()
    for j in range(p):
        base += st.X[j] * st.strata_to_rows(beta[:, j])
    th = st.strata_to_groups(theta[:, 0])
    u, (eta, W, sc, dev, aux, _), SWz2, A, ok, iters = _pirls(
        st, kern, z, z2, th, base, None if u0 is None else np.asarray(u0).reshape(-1), tol, maxit)
    f = st.by_stratum(dev) + st.const + st.groups_by_stratum(u * u + np.log(A))
    ok = ok & np.isfinite(f)
    f = np.where(ok, f, np.inf)
    Ai = 1.0 / A
    Ainv = Ai[:, None, None]
    info = None
    if rx:
        GW = _gram(st, W, pkey, arrays, m)
        C = th[:, None] * GW[:, 0, 1:]
        info = st.groups_by_stratum(GW[:, 1:, 1:] - (Ai[:, None, None] * C[:, :, None] * C[:, None, :]))
    if order == 0:
        return BatchEval(f, None, None, u[:, None], Ainv, ok, iters, info)

    if kern.canonical:  # d2 = 2W, d3 = 2W1
        W1, W2 = kern.weight_derivs(eta, st.y, st.w_arg, aux)
        d2, d3 = None, None
    else:
        d2, d3, W1, W2 = kern.higher(eta, st.y, st.w_arg, aux)
    d1 = -2.0 * sc
    Sd1f = _vec(st, d1, fkey, arrays)
    SW1z2f = _vec(st, W1 if z is None else W1 * z2, fkey, arrays)
    Gd2 = 2.0 * _gram(st, W, pkey, arrays, m) if d2 is None else _gram(st, d2, pkey, arrays, m)
    th2 = th * th
    Hu = 2.0 + th2 * Gd2[:, 0, 0]
    a = th2 * th * Ai * SW1z2f[:, 0] / Hu
    # P0 = diag(û, 1, ..., 1): J_i = P0 f_i;  P = P0 + θ U1 e_z':  e_i = P f_i
    sv = np.ones((st.G, m))
    sv[:, 0] = u
    B = th[:, None] * sv * Gd2[:, :, 0]
    B[:, 0] += Sd1f[:, 0]
    U1 = -B / Hu[:, None]
    tU1 = th[:, None] * U1

    def P_times(vec):  # P @ vec for (G, m) vecs
        return sv * vec + tU1 * vec[:, :1]

    k1 = th2 * Ai
    PS = P_times(SW1z2f)
    grad = sv * Sd1f + k1[:, None] * PS
    grad[:, 0] += 2.0 * th * Ai * SWz2
    g = st.groups_by_stratum(grad)
    ok = ok & np.all(np.isfinite(g), axis=1)
    du = U1[:, None, :]
    if order == 1:
        return BatchEval(f, g, None, u[:, None], Ainv, ok, iters, info, du)

    k2 = a * th
    k1r, k2r = st.to_rows(k1), st.to_rows(k2)
    k3r, ar = st.to_rows(2.0 * th * Ai), st.to_rows(a)
    # α = W2 q - d3 ω,  τ = 2 W1 y_θ - d2 ζ_θ  with  q = κ1 z², ω = κ2 z, y_θ = θ z²/A, ζ_θ = a z
    a1, a2 = W2 * k1r, (2.0 * W1 if d3 is None else d3) * k2r
    t1, t2 = W1 * k3r, (2.0 * W if d2 is None else d2) * ar
    if z is not None:
        a1 *= z2
        a2 *= z
        t1 *= z2
        t2 *= z
    alpha = a1 - a2
    tau = t1 - t2
    Ga = _gram(st, alpha, pkey, arrays, m)
    Stf = _vec(st, tau, fkey, arrays)
    S2 = sv[:, :, None] * sv[:, None, :]
    T = (Gd2 + Ga) * S2 + B[:, :, None] * U1[:, None, :]
    ra = sv * Ga[:, :, 0]  # P0 Gα e_z
    T += tU1[:, :, None] * ra[:, None, :] + ra[:, :, None] * tU1[:, None, :]
    T += (th2 * Ga[:, 0, 0])[:, None, None] * U1[:, :, None] * U1[:, None, :]
    PT = P_times(Stf)
    T[:, :, 0] += PT
    T[:, 0, :] += PT
    qp = k1 * SW1z2f[:, 0] - k2 * Gd2[:, 0, 0]
    T[:, 0, :] += qp[:, None] * U1
    T[:, :, 0] += qp[:, None] * U1
    T[:, 0, 0] += 2.0 * SWz2 * Ai
    M = th2[:, None] * PS
    M[:, 0] += 2.0 * th * SWz2
    MA = M * Ai[:, None]
    T -= MA[:, :, None] * MA[:, None, :]
    H = st.groups_by_stratum(T)
    H = 0.5 * (H + np.swapaxes(H, 1, 2))
    ok = ok & np.all(np.isfinite(H), axis=(1, 2))
    return BatchEval(f, g, H, u[:, None], Ainv, ok, iters, info, du)

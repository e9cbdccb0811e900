"""Exact ββ block of the Hessian of the Laplace deviance (canonical links).

For a canonical link ``W = D2`` and ``d²/dβ² [dev(η̂) + ||û||²] = 2 RX'RX`` (the Schur
complement ``X'WX - X'WZΛ A⁻¹Λ'Z'WX``). With ``P = dη̂/dβ = X + ZΛ dû/dβ``,
``q_i = v_i'A⁻¹v_i`` (``v_i`` the row of ``ZΛ``), ``a = A⁻¹Λ'Z'(W' ⊙ q)`` and
``B_l = Λ'Z' diag(W' ⊙ P_l) ZΛ``, the curvature of ``log|A|`` adds::

    Σ_i W''_i q_i P_ik P_il - Σ_i (ZΛa)_i W'_i P_ik P_il - tr(A⁻¹ B_l A⁻¹ B_k)

(``W' = dW/dη``, ``W'' = d²W/dη²``). The trace term is the costly one. It is computed as
``<S_l, S_k>`` with ``S_l = L⁻¹ B_l L⁻ᵀ`` on two layouts of ``A = LL'``:

* one random-effects term: ``A`` is block-diagonal and the trace is a sum over levels;
* a leading term with block-diagonal ``A11`` and a dense rest of ``r`` columns (crossed
  factors, :attr:`fitting.structure.Level.dense`): with ``Ñ = L21 L11⁻¹``,
  ``P_l = B12 - B11 Ñ'`` and ``Q_l = B22 - Ñ P_l - B21 Ñ'``, the blocks of ``S_l`` are
  ``L11⁻¹ B11 L11⁻ᵀ`` (per level), ``L11⁻¹ P_l L22⁻ᵀ`` and ``L22⁻¹ Q_l L22⁻ᵀ``: every
  product is ``O(q1 r²)``, the cost of the factorisation itself.

Other layouts (a sparse or recursive rest) have no such closed form here; their ββ block
is left to finite differences of the analytic gradient (:mod:`fitting.glmm_fit`).
"""
from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from . import linalg

__all__ = ["has_beta_hessian", "laplace_hessian_beta"]


def has_beta_hessian(model) -> bool:
    """Whether :func:`laplace_hessian_beta` applies: a canonical binomial-logit or
    Poisson-log response, and one random-effects term or a dense-rest layout."""
    lv = model.struct.level
    return model.resp.fast in ("logit", "log") and (lv.r == 0 or (lv.dense and model.struct.K > 1))


def _weight_derivatives(resp, ev):
    """``dW/dη`` and ``d²W/dη²`` of the canonical fast responses."""
    W = ev.W
    if resp.fast == "logit":
        s = 1.0 - 2.0 * ev.mu
        dW = W * s
        return dW, dW * s - 2.0 * W * ev.mu * (1.0 - ev.mu)
    return W, W


def laplace_hessian_beta(model, pr, J_beta: np.ndarray) -> np.ndarray:
    """Exact ββ block of the Hessian of the Laplace deviance at a PIRLS solution.

    Parameters
    ----------
    model : fitting.glmm.GlmmModel
        A model for which :func:`has_beta_hessian` holds.
    pr : fitting.glmm.PirlsResult
        The PIRLS solution (modes, ``ZΛ`` rows, weights and factor).
    J_beta : ndarray (q, p)
        ``dû/dβ`` (the β columns of :func:`fitting.glmm.laplace_gradient`'s Jacobian).

    Returns
    -------
    ndarray (p, p)
    """
    struct, resp, X = model.struct, model.resp, model.X
    V, ev, fac = pr.V, pr.ev, pr.fac
    dW, d2W = _weight_derivatives(resp, ev)
    H = 2.0 * _rx_gram(struct, fac, V, ev.W, X)
    Y = linalg.own_products(struct, V, linalg.inverse_buffer(struct, fac))
    cit = struct.col_index.T if struct.K == 1 else struct.col_index_t  # (K, n), contiguous rows
    q = V[:, 0] * Y[0]
    P = X + V[:, :1] * np.take(J_beta, cit[0], axis=0)  # (row gathers: np.take ~4x faster than [])
    for a in range(1, struct.K):
        q += V[:, a] * Y[a]
        P += V[:, a, None] * np.take(J_beta, cit[a], axis=0)
    a = linalg.solve_A(struct, fac, struct.zt_times(V, dW * q))
    w1 = d2W * q - struct.z_times(V, a) * dW
    H += (P * w1[:, None]).T @ P
    wP = dW[:, None] * P
    S = _one_term_s(struct, fac, V, wP) if struct.level.r == 0 else _dense_rest_s(struct, fac, V, wP)
    H -= S @ S.T
    return 0.5 * (H + H.T)


def _rx_gram(struct, fac, V, W, X) -> np.ndarray:
    fb = linalg.fixed_blocks(struct, fac, V, W, X)
    return fb.R.T @ fb.R


def _one_term_s(struct, fac, V, wP) -> np.ndarray:
    """Rows ``vec(L_g⁻¹ B_gl L_g⁻ᵀ)`` over the levels ``g``, one per column ``l``, for one
    term (block-diagonal ``A = diag(L_g L_g')``): their products are ``Σ_g tr(A_g⁻¹B_gl A_g⁻¹B_gk)``."""
    t = struct.terms[0]
    k, m, p = t.k, t.m, wP.shape[1]
    codes = t.codes
    Li = fac.L11inv  # (m, k, k) inverse lower factors of the blocks
    if k == 1:
        B = np.empty((m, p))
        for l in range(p):
            B[:, l] = np.bincount(codes, wP[:, l] * V[:, 0] ** 2, minlength=m)
        return (Li[:, 0, 0, None] ** 2 * B).T
    vals = wP[:, :, None, None] * (V[:, :, None] * V[:, None, :])[:, None, :, :]
    ncol = p * k * k
    idx = codes[:, None] * ncol + np.arange(ncol)[None, :]
    B = np.bincount(idx.ravel(), vals.reshape(-1), minlength=m * ncol).reshape(m, p, k, k)
    Sg = np.einsum("gab,glbc,gdc->lgad", Li, B, Li)
    return Sg.reshape(p, -1)


def _dense_rest_s(struct, fac, V, wP) -> np.ndarray:
    """Rows ``[vec S11, √2 vec S12, vec S22]`` of ``S_l = L⁻¹ B_l L⁻ᵀ`` (dense-rest level)."""
    lv = struct.level
    k1, m1, q1, r = lv.k1, lv.m1, lv.q1, lv.r
    Li = fac.L11inv
    L22 = fac.L22
    if k1 == 1:
        Cd = fac.L21d * Li[:, 0, 0][:, None]  # Ñ' (q1, r)
    else:
        Cd = np.einsum("gbj,gbc->gcj", fac.L21d.reshape(m1, k1, r), Li).reshape(q1, r)
    p = wP.shape[1]
    S11s, XPt, Qs = [], [], []
    for l in range(p):
        buf = linalg.weighted_buffer(struct, V, wP[:, l])
        B11 = buf[: lv.off_cross].reshape(m1, k1, k1)
        B12 = np.zeros(q1 * r)
        B12[lv.pair_dense] = buf[lv.off_cross: lv.off_rest].reshape(-1, k1)
        B12 = B12.reshape(q1, r)
        if k1 == 1:
            b = B11[:, 0, 0]
            Pl = B12 - b[:, None] * Cd
            S11s.append(Li[:, 0, 0] ** 2 * b)
            XPt.append((Li[:, 0, 0][:, None] * Pl).T)
        else:
            Pl = B12 - np.einsum("gab,gbj->gaj", B11, Cd.reshape(m1, k1, r)).reshape(q1, r)
            S11s.append(np.einsum("gab,gbc,gdc->gad", Li, B11, Li).ravel())
            XPt.append(np.einsum("gab,gbj->gaj", Li, Pl.reshape(m1, k1, r)).reshape(q1, r).T)
        Qs.append(buf[lv.off_rest:].reshape(r, r) - Cd.T @ Pl - B12.T @ Cd)
    # the triangular solves of all columns at once: S12' = L22⁻¹ (L11⁻¹P)', S22 = L22⁻¹ Q L22⁻ᵀ
    S12t = solve_triangular(L22, np.hstack(XPt), lower=True, check_finite=False).reshape(r, p, q1)
    Y = solve_triangular(L22, np.hstack(Qs), lower=True, check_finite=False).reshape(r, p, r)
    S22 = solve_triangular(L22, Y.transpose(2, 1, 0).reshape(r, p * r), lower=True,
                           check_finite=False).reshape(r, p, r)
    return np.concatenate([np.array(S11s), np.sqrt(2.0) * S12t.transpose(1, 0, 2).reshape(p, -1),
                           S22.transpose(1, 0, 2).reshape(p, -1)], axis=1)

"""Blocked Cholesky factor of ``A = Λ'Z'WZΛ + I`` and the solves built on it.

The layout (see :mod:`fitting.structure`) is MixedModels.jl's: the first term (most
levels) has a block-diagonal diagonal block, factored for all levels at once (closed
form for ``k = 1, 2``, batched ``np.linalg`` otherwise); the other terms form a dense
Schur complement ``S = A22 - L21 L21'`` factored with LAPACK. ``L21`` has the sparsity of
the cross block ``A21`` and is stored by pairs.

Nothing here knows the family: the weights ``W`` come from the caller. A
:class:`Factor` is an immutable value; :func:`factorize` returns a new one.

Functions
---------
factorize        W, ``V = ZΛ`` rows → :class:`Factor` (``L``, ``log|L|²``)
weighted_buffer  ``Λ'Z'WZΛ`` in the buffer layout (what factorize factors, less ``I``)
solve_L          ``L⁻¹ b``
solve_Lt         ``L⁻ᵀ b``
solve_A          ``A⁻¹ b``
inverse_buffer   ``A⁻¹`` on the sparsity pattern of ``A`` (own blocks of every observation)
own_inverse      the (n, K, K) own-block entries of ``A⁻¹`` per observation
own_products     ``A⁻¹ v_i`` on the own columns of every observation (``v_i`` the row of ``ZΛ``)
diag_blocks      the k×k diagonal blocks of ``A⁻¹`` for every term and level
fixed_blocks     ``RZX``, ``RX`` (and the penalised residual) for an augmented ``X``
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from scipy.linalg import lapack

from . import kernels
from .structure import Structure

__all__ = [
    "Factor",
    "NotPositiveDefinite",
    "factorize",
    "weighted_buffer",
    "solve_L",
    "solve_Lt",
    "solve_A",
    "inverse_buffer",
    "own_inverse",
    "own_products",
    "diag_blocks",
    "FixedBlocks",
    "fixed_blocks",
]


class NotPositiveDefinite(np.linalg.LinAlgError):
    """The matrix handed to :func:`factorize` is not positive definite."""


class Factor(NamedTuple):
    """Blocked lower Cholesky factor ``L`` of ``A`` (``A = L L'``), one level of it.

    Attributes
    ----------
    L11inv : ndarray (m1, k1, k1)
        Inverses of the diagonal blocks of the leading term's factor.
    L21 : ndarray (npairs, k1)
        Cross block of ``L`` by pairs (empty with one term).
    L22 : ndarray (r, r) or None
        Dense lower factor of the Schur complement (when the rest is dense).
    sub : Factor or None
        Factor of the Schur complement (when the rest is a sub-level).
    logdet : float
        ``log|L|² = log det A`` (of this level's matrix).
    """

    L11inv: np.ndarray
    L21: np.ndarray
    L22: np.ndarray | None
    sub: "Factor | None"
    logdet: float
    L21d: np.ndarray | None = None  # dense (q1, r) copy of L21 on dense-fill levels


def _chol2(a00: np.ndarray, a10: np.ndarray, a11: np.ndarray):
    """Closed-form Cholesky of a stack of 2×2 blocks ``[[a00, a10], [a10, a11]]``.

    Returns the (m, 2, 2) inverse lower factors and ``log det`` summed over the stack.
    """
    if not np.all(a00 > 0):
        raise NotPositiveDefinite("diagonal block not positive definite")
    l00 = np.sqrt(a00)
    l10 = a10 / l00
    d = a11 - l10 * l10
    if not np.all(d > 0):
        raise NotPositiveDefinite("diagonal block not positive definite")
    l11 = np.sqrt(d)
    inv = np.zeros((a00.shape[0], 2, 2))
    inv[:, 0, 0] = 1.0 / l00
    inv[:, 1, 1] = 1.0 / l11
    inv[:, 1, 0] = -l10 * inv[:, 0, 0] * inv[:, 1, 1]
    return inv, float(2.0 * np.log(l00 * l11).sum())


def _chol_blocks(A11: np.ndarray, k1: int):
    """Cholesky of a stack of k×k blocks; returns (inverse factors, log det)."""
    if k1 == 1:
        a = A11[:, 0, 0]
        if not np.all(a > 0):
            raise NotPositiveDefinite("diagonal block not positive definite")
        l = np.sqrt(a)
        return (1.0 / l)[:, None, None], 2.0 * np.log(l).sum()
    if k1 == 2:
        return _chol2(A11[:, 0, 0], A11[:, 1, 0], A11[:, 1, 1])
    if not np.all(np.isfinite(A11)):
        raise NotPositiveDefinite("diagonal block not finite")
    try:
        L = np.linalg.cholesky(A11)
    except np.linalg.LinAlgError as exc:
        raise NotPositiveDefinite(str(exc)) from None
    diag = np.diagonal(L, axis1=1, axis2=2)
    return np.linalg.inv(L), 2.0 * np.log(diag).sum()


def _factor_level(lv, buf: np.ndarray) -> Factor:
    """Factor the matrix ``I + M`` of one level, ``M`` given in the level's buffer layout."""
    k1, m1, r = lv.k1, lv.m1, lv.r
    if k1 == 1 and lv.dense:
        parts = kernels.factor_dense1(lv, buf)
        if parts is not None:
            linv, L21, D, L22, logdet, status = parts
            if status == 1:
                raise NotPositiveDefinite("diagonal block not positive definite")
            if status == 2:
                raise NotPositiveDefinite("Schur complement not positive definite")
            return Factor(linv[:, None, None], L21[:, None], L22, None, float(logdet), D)
    A11 = buf[: lv.off_cross].reshape(m1, k1, k1) + np.eye(k1)
    L11inv, ld1 = _chol_blocks(A11, k1)
    if not r:
        return Factor(L11inv, np.zeros((0, k1)), None, None, float(ld1))
    A21 = buf[lv.off_cross: lv.off_rest].reshape(-1, k1)
    Li = np.take(L11inv, lv.pair_g, axis=0)  # (np.take: row gathers ~2x faster than [])
    # L21 = A21 L11^{-T}:  L21[p, b] = sum_c A21[p, c] L11inv[g, b, c]
    L21 = np.einsum("pc,pbc->pb", A21, Li) if k1 > 1 else A21 * Li[:, :, 0]
    if lv.dense:
        D = np.zeros(lv.q1 * r)
        D[lv.pair_dense] = L21
        D = D.reshape(lv.q1, r)
        S = buf[lv.off_rest:].reshape(r, r) - D.T @ D
        _add_identity(S)
        return _factor_dense_rest(L11inv, L21, S, ld1)._replace(L21d=D)
    if k1 > 1:
        prod = np.einsum("pk,pk->p", L21[lv.pp_a], L21[lv.pp_b])
    else:
        prod = L21[lv.pp_a, 0] * L21[lv.pp_b, 0]
    rest = buf[lv.off_rest:]
    keep = lv.pp_fill >= 0
    fill = np.bincount(lv.pp_fill[keep], prod[keep], minlength=rest.size) if lv.sub is not None else \
        np.bincount(lv.pp_fill, prod, minlength=rest.size)
    rest = rest - fill
    if lv.sub is not None:
        sub = _factor_level(lv.sub, rest)
        return Factor(L11inv, L21, None, sub, float(ld1 + sub.logdet))
    S = rest.reshape(r, r)
    _add_identity(S)
    return _factor_dense_rest(L11inv, L21, S, ld1)


def _add_identity(S: np.ndarray) -> None:
    """``S += I`` in place (a strided view of the diagonal when ``S`` is contiguous: cheaper
    than fancy indexing with ``diag_indices`` on these small matrices)."""
    if S.flags.c_contiguous or S.flags.f_contiguous:
        S.reshape(-1, order="A")[:: S.shape[0] + 1] += 1.0
    else:
        S[np.diag_indices(S.shape[0])] += 1.0


def _factor_dense_rest(L11inv, L21, S, ld1) -> Factor:
    L22, info = lapack.dpotrf(S, lower=1, clean=1, overwrite_a=1)
    if info != 0:
        raise NotPositiveDefinite("Schur complement not positive definite")
    return Factor(L11inv, L21, L22, None, float(ld1 + 2.0 * np.log(np.diag(L22)).sum()))


def factorize(struct: Structure, V: np.ndarray, W: np.ndarray) -> Factor:
    """Factor ``A = Λ'Z' diag(W) ZΛ + I``.

    Parameters
    ----------
    struct : Structure
    V : ndarray (n, K)
        Own-entry rows of ``ZΛ`` (:meth:`Structure.zlambda`).
    W : ndarray (n,)
        Weights (need not be positive, but ``A`` must be positive definite).

    Raises
    ------
    NotPositiveDefinite
    """
    lv = struct.level
    if struct.K == 1:
        A11 = np.bincount(struct.col_index[:, 0], W * V[:, 0] ** 2, minlength=lv.m1) + 1.0
        if not np.all(A11 > 0):
            raise NotPositiveDefinite("A is not positive definite")
        l = np.sqrt(A11)
        return Factor((1.0 / l)[:, None, None], np.zeros((0, 1)), None, None, float(2.0 * np.log(l).sum()))
    if not lv.r:  # one vector-valued term: k(k+1)/2 segment sums, no outer products
        k1, m1 = lv.k1, lv.m1
        codes = struct.terms[0].codes
        if k1 == 2:  # closed-form 2×2 Cholesky straight from the three segment sums
            v0, v1 = V[:, 0], V[:, 1]
            Wv0 = W * v0
            a00 = np.bincount(codes, Wv0 * v0, minlength=m1) + 1.0
            a10 = np.bincount(codes, Wv0 * v1, minlength=m1)
            a11 = np.bincount(codes, W * v1 * v1, minlength=m1) + 1.0
            inv, logdet = _chol2(a00, a10, a11)
            return Factor(inv, np.zeros((0, 2)), None, None, logdet)
        WV = W[:, None] * V
        A11 = np.empty((m1, k1, k1))
        for a in range(k1):
            for b in range(a + 1):
                A11[:, a, b] = A11[:, b, a] = np.bincount(codes, V[:, a] * WV[:, b], minlength=m1)
        return _factor_level(lv, A11.ravel())
    return _factor_level(lv, weighted_buffer(struct, V, W))


def weighted_buffer(struct: Structure, V: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``Λ'Z' diag(W) ZΛ`` (no identity added) in the buffer layout of a structure with
    several own entries per observation (``K > 1``)."""
    if struct.build_ab is not None:
        # V[:, a] W V[:, b] for the kept own-entry pairs, pair-major
        return kernels.weighted_buffer(V, W, struct.build_ab, struct.build_tgt_t, struct.level.nbuf)
    outer = (V[:, :, None] * (W[:, None] * V)[:, None, :]).ravel()
    return np.bincount(struct.build_tgt, outer[struct.build_src], minlength=struct.level.nbuf)


def _apply_blocks(Binv: np.ndarray, x: np.ndarray, transpose: bool) -> np.ndarray:
    """Multiply each k×k block (or its transpose) into x of shape (m, k, c)."""
    if Binv.shape[1] == 1:
        return Binv * x
    return np.einsum("gcb,gcm->gbm" if transpose else "gbc,gcm->gbm", Binv, x)


def _tri_solve(L22: np.ndarray, B: np.ndarray, trans: int) -> np.ndarray:
    """``L22⁻¹ B`` (``trans=0``) or ``L22⁻ᵀ B`` (``trans=1``) by LAPACK ``dtrtrs`` directly
    (``scipy.linalg.solve_triangular``'s argument checks cost more than these small solves)."""
    x, info = lapack.dtrtrs(L22, B, lower=1, trans=trans)
    if info != 0:  # pragma: no cover - L22 came from a successful dpotrf
        raise NotPositiveDefinite("triangular factor is singular")
    return x


def _solve_L(lv, fac: Factor, B: np.ndarray) -> np.ndarray:
    c = B.shape[1]
    k1, m1, q1 = lv.k1, lv.m1, lv.q1
    x1 = _apply_blocks(fac.L11inv, B[:q1].reshape(m1, k1, c), False)
    if not lv.r:
        return x1.reshape(q1, c)
    if fac.L21d is not None:
        y = fac.L21d.T @ x1.reshape(q1, c)
    else:
        t = np.einsum("pb,pbm->pm", fac.L21, np.take(x1, lv.pair_g, axis=0))
        y = np.add.reduceat(t[lv.pair_j_perm], lv.pair_j_starts, axis=0)
    rhs = B[q1:] - y
    if fac.sub is not None:
        x2 = _solve_L(lv.sub, fac.sub, rhs)
    else:
        x2 = _tri_solve(fac.L22, rhs, trans=0)
    return np.concatenate([x1.reshape(q1, c), x2], axis=0)


def _solve_Lt(lv, fac: Factor, B: np.ndarray) -> np.ndarray:
    c = B.shape[1]
    k1, m1, q1 = lv.k1, lv.m1, lv.q1
    b1 = B[:q1].reshape(m1, k1, c)
    if not lv.r:
        return _apply_blocks(fac.L11inv, b1, True).reshape(q1, c)
    if fac.sub is not None:
        x2 = _solve_Lt(lv.sub, fac.sub, B[q1:])
    else:
        x2 = _tri_solve(fac.L22, B[q1:], trans=1)
    if fac.L21d is not None:
        b1 = b1 - (fac.L21d @ x2).reshape(m1, k1, c)
    else:
        t = fac.L21[:, :, None] * x2[lv.pair_j][:, None, :]
        b1 = b1 - np.add.reduceat(t, lv.pair_g_starts, axis=0)
    x1 = _apply_blocks(fac.L11inv, b1, True)
    return np.concatenate([x1.reshape(q1, c), x2], axis=0)


def solve_L(struct: Structure, fac: Factor, b: np.ndarray) -> np.ndarray:
    """``L⁻¹ b`` for ``b`` of shape (q,) or (q, c)."""
    out = _solve_L(struct.level, fac, b[:, None] if b.ndim == 1 else b)
    return out[:, 0] if b.ndim == 1 else out


def solve_Lt(struct: Structure, fac: Factor, b: np.ndarray) -> np.ndarray:
    """``L⁻ᵀ b`` for ``b`` of shape (q,) or (q, c)."""
    out = _solve_Lt(struct.level, fac, b[:, None] if b.ndim == 1 else b)
    return out[:, 0] if b.ndim == 1 else out


def solve_A(struct: Structure, fac: Factor, b: np.ndarray) -> np.ndarray:
    """``A⁻¹ b``."""
    if struct.K == 1:
        d = fac.L11inv[:, 0, 0] ** 2
        return d * b if b.ndim == 1 else d[:, None] * b
    lv = struct.level
    if lv.k1 == 1 and lv.dense and lv.r and fac.sub is None and fac.L21d is not None:
        B = b[:, None] if b.ndim == 1 else b
        out = kernels.solve_dense1(lv, fac, np.ascontiguousarray(B, dtype=np.float64))
        if out is not None:
            return out[:, 0] if b.ndim == 1 else out
    return solve_Lt(struct, fac, solve_L(struct, fac, b))


def _lead_inverse(Li: np.ndarray) -> np.ndarray:
    """``L11⁻ᵀ L11⁻¹`` per leading block, from the inverse factors ``Li`` (m1, k1, k1)."""
    return np.einsum("gcb,gcd->gbd", Li, Li) if Li.shape[1] > 1 else Li * Li


def _inverse_level(lv, fac: Factor) -> np.ndarray:
    k1, m1, r = lv.k1, lv.m1, lv.r
    Li = fac.L11inv
    if not r:
        return _lead_inverse(Li).ravel()
    if k1 == 1 and lv.dense and fac.sub is None:
        out = kernels.inverse_dense1(lv, Li[:, 0, 0], fac.L21d, fac.L22)
        if out is not None:
            return out
    if fac.sub is not None:
        rest = _inverse_level(lv.sub, fac.sub)
    else:
        Sinv, info = lapack.dpotri(fac.L22, lower=1)
        if info != 0:  # pragma: no cover - L22 came from a successful dpotrf
            raise NotPositiveDefinite("dpotri failed")
        rest = (np.tril(Sinv) + np.tril(Sinv, -1).T).ravel()
    A11inv = _lead_inverse(Li)
    Lp = np.take(Li, lv.pair_g, axis=0)
    C = np.einsum("pb,pbc->pc", fac.L21, Lp) if k1 > 1 else fac.L21 * Lp[:, 0]
    if lv.dense:
        # dense C (q1, r): (A⁻¹)21 = -S⁻¹C' on the pairs, diag blocks += C S⁻¹ C'
        if k1 == 1:
            Cd = fac.L21d * Li[:, 0, 0][:, None]
        else:
            Cd = np.einsum("gbj,gbc->gcj", fac.L21d.reshape(m1, k1, r), Li).reshape(lv.q1, r)
        T = Cd @ rest.reshape(r, r)
        cross = -T.ravel()[lv.pair_dense]
        if k1 == 1:
            add = np.einsum("gj,gj->g", T, Cd)[:, None, None]
        else:
            add = np.einsum("gbj,gcj->gbc", T.reshape(m1, k1, r), Cd.reshape(m1, k1, r))
        return np.concatenate([(A11inv + add).ravel(), cross.ravel(), rest])
    s = rest[lv.pp_read]
    npairs = C.shape[0]
    sc = s[:, None] * C[lv.pp_b]
    # cross: -sum_{p' in g(p)} Sinv[j_p, j_p'] C[p']
    if k1 == 1:
        cross = -np.bincount(lv.pp_a, sc[:, 0], minlength=npairs)[:, None]
        add = np.bincount(lv.pp_g, C[lv.pp_a, 0] * sc[:, 0], minlength=m1)[:, None, None]
    else:
        cross = np.empty((npairs, k1))
        for c in range(k1):
            cross[:, c] = -np.bincount(lv.pp_a, sc[:, c], minlength=npairs)
        # diag blocks: sum_{p,p' in g} C[p]^T Sinv[j_p, j_p'] C[p']
        prod = C[lv.pp_a][:, :, None] * sc[:, None, :]
        add = np.bincount(
            np.repeat(lv.pp_g * (k1 * k1), k1 * k1) + np.tile(np.arange(k1 * k1), lv.pp_g.size),
            prod.ravel(), minlength=m1 * k1 * k1,
        ).reshape(m1, k1, k1)
    return np.concatenate([(A11inv + add).ravel(), cross.ravel(), rest])


def inverse_buffer(struct: Structure, fac: Factor) -> np.ndarray:
    """``A⁻¹`` on the sparsity pattern of ``A``, in the buffer layout of the structure.

    Uses the blocked inverse level by level: with ``C = L21 L11⁻¹`` and ``S⁻¹`` the
    inverse of the Schur complement (on its pattern, recursively, or dense),
    ``(A⁻¹)22 = S⁻¹``, ``(A⁻¹)21 = -S⁻¹ C`` and the diagonal blocks of ``(A⁻¹)11`` are
    ``L11⁻ᵀ L11⁻¹ + C' S⁻¹ C``; products are restricted to pairs sharing a block.
    """
    return _inverse_level(struct.level, fac)


def own_products(struct: Structure, V: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """``Y[a, i] = Σ_b (A⁻¹)_(own a, own b) V[i, b]``: ``A⁻¹ v_i`` on each observation's
    own columns, shape (K, n) (observation-major rows), from :func:`inverse_buffer`'s
    ``buf``. ``Σ_a V[:, a] Y[a]`` is ``v_i'A⁻¹v_i``."""
    if struct.K == 1:
        return (buf[struct.col_index[:, 0]] * V[:, 0])[None, :]
    return kernels.own_products(V, buf, struct.gather_tgt_t)[0]


def own_inverse(struct: Structure, buf: np.ndarray) -> np.ndarray:
    """Own-block entries of ``A⁻¹`` for every observation, shape (n, K, K)."""
    if struct.K == 1:
        return buf[struct.col_index[:, 0]][:, None, None]
    return buf[struct.gather_tgt]


def diag_blocks(struct: Structure, buf: np.ndarray) -> list:
    """Diagonal k×k blocks of ``A⁻¹`` per term (lme4 order), each (m, k, k)."""
    out = []
    for t in struct.terms:
        idx = t.offset + np.arange(t.m)[:, None] * t.k + np.arange(t.k)[None, :]  # (m, k)
        a = np.repeat(idx[:, :, None], t.k, axis=2)
        b = np.repeat(idx[:, None, :], t.k, axis=1)
        out.append(buf[struct.level.index(a.ravel(), b.ravel())].reshape(t.m, t.k, t.k))
    return out


@dataclass(frozen=True, eq=False)
class FixedBlocks:
    """Fixed-effects part of the blocked factor for an augmented ``[X, y]``.

    Attributes
    ----------
    RZX : ndarray (q, c)
        ``L⁻¹ Λ'Z'W [X y]``.
    R : ndarray (c, c)
        Upper Cholesky factor of ``[X y]'W[X y] - RZX'RZX``; its leading p×p block is
        ``RX``, its last diagonal entry (if ``y`` was appended) the root of the penalised
        weighted residual sum of squares.
    """

    RZX: np.ndarray
    R: np.ndarray


def fixed_blocks(struct: Structure, fac: Factor, V: np.ndarray, W: np.ndarray, Xa: np.ndarray,
                 XtWX: np.ndarray | None = None) -> FixedBlocks:
    """``RZX`` and the Cholesky factor of the downdated ``X'WX`` (augmented columns allowed).

    Parameters
    ----------
    Xa : ndarray (n, c)
        Fixed-effects matrix, possibly with the response appended as the last column.
    XtWX : ndarray (c, c), optional
        ``Xa' W Xa`` if already known (LMMs: constant across evaluations).

    Raises
    ------
    NotPositiveDefinite
        ``X`` is rank deficient given the random effects.
    """
    WX = W[:, None] * Xa
    B = struct.zt_times_matrix(V, WX)
    RZX = solve_L(struct, fac, B)
    if XtWX is None:
        XtWX = Xa.T @ WX
    M = XtWX - RZX.T @ RZX
    R, info = lapack.dpotrf(M, lower=0, clean=1)
    if info != 0:
        raise NotPositiveDefinite("fixed-effects block not positive definite")
    return FixedBlocks(RZX, R)

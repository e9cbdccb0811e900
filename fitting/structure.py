"""Random-effects structure: term order, index arrays and the θ ↔ Λ map.

A :class:`Structure` is built once per fit from the design's random-effects terms and
holds everything about the sparsity of ``Z`` that does not depend on θ or on the
weights: the lme4 term order, the column of ``u`` every observation touches in every
term, and the index arrays that let :mod:`fitting.linalg` assemble and factor
``A = Λ'Z'WZΛ + I`` with ``np.bincount``/``np.add.reduceat`` instead of Python loops.

Layout of ``u`` (lme4's): terms in lme4 order (number of levels decreasing, stable);
within a term, level-major then column (``offset + level * k + j``).

Blocked layout of ``A`` used by :mod:`fitting.linalg` (a :class:`Level`): the first term
(most levels) gives ``q1 = m1 * k1`` columns whose diagonal block is block-diagonal
(``m1`` blocks of ``k1 x k1``); the cross block (rest rows × first-term columns) is stored
by *pairs* ``(j, g)`` of a rest row ``j`` and a first-term level ``g`` that share an
observation, ``k1`` values per pair; the remaining ``r = q - q1`` columns form the Schur
complement, which is again a :class:`Level` when its leading term stays block-diagonal
after the fill-in (nested factors: ``(1|site) + (1|site:plot)``, one-level-per-row
factors), else a dense block. The symbolic analysis is done once per design.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import sparse

from .design import ReTerm
from .errors import DataError

__all__ = ["TermLayout", "Level", "Structure", "build_structure"]


@dataclass(frozen=True, eq=False)
class TermLayout:
    """One random-effects term placed in the lme4 order.

    Attributes
    ----------
    group, levels, term_names : as in :class:`fitting.design.ReTerm`
    k, m : int
        Columns of the term and number of levels.
    offset : int
        First column of the term in ``u``.
    codes : ndarray (n,)
        Level index of each observation.
    Z : ndarray (n, k)
        Raw per-observation model matrix of the term.
    formula_index : int
        Position of the term in the formula.
    theta_offset : int
        First position of the term's entries in θ.
    tril : tuple of ndarray
        Row and column indices of the lower triangle, column-major (θ order).
    """

    group: str
    levels: tuple
    term_names: tuple
    k: int
    m: int
    offset: int
    codes: np.ndarray
    Z: np.ndarray
    formula_index: int
    theta_offset: int
    tril: tuple

    @property
    def ntheta(self) -> int:
        return self.k * (self.k + 1) // 2


@dataclass(frozen=True, eq=False)
class Level:
    """One level of the recursive blocked layout of a symmetric matrix ``M``.

    Local coordinates ``0..q1+r``: the leading ``q1 = m1 * k1`` columns (one term) have a
    block-diagonal diagonal block; the cross block (rest rows × leading columns) is stored
    by pairs ``(j, g)`` of a rest row and a leading block; the rest is either dense
    (``sub`` None) or another :class:`Level`. The buffer of a level holds
    ``[blocks (m1*k1*k1) | cross (npairs*k1) | rest]`` of ``M - I``.

    Attributes
    ----------
    pp_a, pp_b : ndarray
        All ordered pairs of pairs sharing a leading block (the fill of ``L21 L21'``).
    pp_fill : ndarray
        Rest-buffer position receiving each pair-of-pairs product (-1: not stored, the
        upper cross block of the sub-level).
    pp_read : ndarray
        Rest-buffer position of ``(j_a, j_b)`` read back when inverting.
    """

    k1: int
    m1: int
    q1: int
    r: int
    nbuf: int
    off_cross: int
    off_rest: int
    pair_j: np.ndarray
    pair_g: np.ndarray
    pair_keys: np.ndarray
    pair_g_starts: np.ndarray
    pair_j_perm: np.ndarray
    pair_j_starts: np.ndarray
    pp_a: np.ndarray
    pp_b: np.ndarray
    pp_g: np.ndarray
    pp_fill: np.ndarray
    pp_read: np.ndarray
    sub: "Level | None"

    def index(self, a: np.ndarray, b: np.ndarray, build: bool = False) -> np.ndarray:
        """Buffer positions of local entries ``(a, b)`` (in the pattern).

        With ``build=True`` the upper cross entries (leading row, rest column) map to -1:
        the buffer stores the cross block once.
        """
        a = np.asarray(a, dtype=np.int64)
        b = np.asarray(b, dtype=np.int64)
        out = np.full(a.shape, -1, dtype=np.int64)
        k1, q1 = self.k1, self.q1
        m = (a < q1) & (b < q1)
        out[m] = (a[m] // k1) * (k1 * k1) + (a[m] % k1) * k1 + (b[m] % k1)
        m = (a >= q1) & (b < q1)
        if m.any():
            pid = np.searchsorted(self.pair_keys, (b[m] // k1) * self.r + (a[m] - q1))
            out[m] = self.off_cross + pid * k1 + b[m] % k1
        m = (a < q1) & (b >= q1)
        if m.any() and not build:
            pid = np.searchsorted(self.pair_keys, (a[m] // k1) * self.r + (b[m] - q1))
            out[m] = self.off_cross + pid * k1 + a[m] % k1
        m = (a >= q1) & (b >= q1)
        if m.any():
            ra, rb = a[m] - q1, b[m] - q1
            if self.sub is None:
                out[m] = self.off_rest + ra * self.r + rb
            else:
                sub = self.sub.index(ra, rb, build)
                out[m] = np.where(sub >= 0, self.off_rest + sub, -1)
        return out


def _build_level(sizes: list, rows: np.ndarray, cols: np.ndarray) -> Level:
    """Symbolic analysis of one level.

    Parameters
    ----------
    sizes : list of (k, m)
        Block size and number of blocks of each term at this level and below.
    rows, cols : ndarray
        Structurally non-zero entries ``(a, b)`` in local coordinates (both triangles).
    """
    k1, m1 = sizes[0]
    q1 = k1 * m1
    r = sum(k * m for k, m in sizes[1:])
    cross = (rows >= q1) & (cols < q1)
    keys = np.unique((cols[cross] // k1) * r + (rows[cross] - q1)) if r else np.zeros(0, np.int64)
    pair_g = keys // r if r else keys
    pair_j = keys % r if r else keys
    npairs = keys.size
    off_cross = m1 * k1 * k1
    off_rest = off_cross + npairs * k1
    if r:
        cnt_g = np.bincount(pair_g, minlength=m1)
        pair_g_starts = np.concatenate([[0], np.cumsum(cnt_g)[:-1]])
        pair_j_perm = np.argsort(pair_j, kind="stable")
        cnt_j = np.bincount(pair_j, minlength=r)
        pair_j_starts = np.concatenate([[0], np.cumsum(cnt_j)[:-1]])
        reps = cnt_g[pair_g]
        pp_a = np.repeat(np.arange(npairs), reps)
        first = np.repeat(pair_g_starts[pair_g], reps)
        blockstart = np.repeat(np.cumsum(reps) - reps, reps)
        pp_b = first + (np.arange(pp_a.size) - blockstart)
        pp_g = pair_g[pp_a]
        ja, jb = pair_j[pp_a], pair_j[pp_b]
        rest = (rows >= q1) & (cols >= q1)
        rr = np.concatenate([rows[rest] - q1, ja])
        rc = np.concatenate([cols[rest] - q1, jb])
        sub = None
        if len(sizes) > 1:
            k2 = sizes[1][0]
            q2 = k2 * sizes[1][1]
            lead = (rr < q2) & (rc < q2)
            if np.all(rr[lead] // k2 == rc[lead] // k2):  # leading rest term stays block-diagonal
                key = np.unique(rr * r + rc)
                sub = _build_level(sizes[1:], key // r, key % r)
        if sub is None:
            rest_n = r * r
            pp_fill = ja * r + jb
            pp_read = pp_fill
        else:
            rest_n = sub.nbuf
            pp_fill = sub.index(ja, jb, build=True)
            pp_read = sub.index(ja, jb)
    else:
        z = np.zeros(0, np.int64)
        pair_g_starts = pair_j_perm = pair_j_starts = pp_a = pp_b = pp_g = pp_fill = pp_read = z
        sub = None
        rest_n = 0
    keep = pp_fill >= 0
    return Level(
        k1=k1, m1=m1, q1=q1, r=r, nbuf=off_rest + rest_n, off_cross=off_cross, off_rest=off_rest,
        pair_j=_ro(pair_j), pair_g=_ro(pair_g), pair_keys=_ro(keys), pair_g_starts=_ro(pair_g_starts),
        pair_j_perm=_ro(pair_j_perm), pair_j_starts=_ro(pair_j_starts), pp_a=_ro(pp_a), pp_b=_ro(pp_b),
        pp_g=_ro(pp_g), pp_fill=_ro(np.where(keep, pp_fill, -1)), pp_read=_ro(pp_read), sub=sub,
    )


@dataclass(frozen=True, eq=False)
class Structure:
    """Per-design index arrays, reused by every evaluation of the objective.

    See the module docstring for the layouts. All arrays are read-only.
    """

    n: int
    q: int
    K: int
    terms: tuple
    col_index: np.ndarray  # (n, K) column of u for each obs and own entry
    term_cols: tuple  # slice of the K own entries for each term
    level: Level  # recursive blocked layout of A
    build_src: np.ndarray
    build_tgt: np.ndarray
    gather_tgt: np.ndarray  # (n, K, K)
    # entries (obs, own column) sorted by column of u, for Λ'Z' M with M a matrix
    ent_perm: np.ndarray
    ent_obs: np.ndarray
    ent_starts: np.ndarray
    ent_indptr: np.ndarray
    # θ
    ntheta: int
    theta_lower: np.ndarray
    theta_names: tuple
    diag_theta: np.ndarray  # bool mask of diagonal θ entries

    @property
    def k1(self) -> int:
        return self.level.k1

    @property
    def m1(self) -> int:
        return self.level.m1

    # ------------------------------------------------------------------ θ map
    def lambdas(self, theta: np.ndarray) -> list:
        """Relative covariance factors ``Λ_t`` (k×k lower triangular), lme4 order."""
        out = []
        for t in self.terms:
            lam = np.zeros((t.k, t.k))
            lam[t.tril] = theta[t.theta_offset:t.theta_offset + t.ntheta]
            out.append(lam)
        return out

    def zlambda(self, theta: np.ndarray) -> np.ndarray:
        """Rows of ``ZΛ`` restricted to each observation's own entries, shape (n, K)."""
        if len(self.terms) == 1 and self.K == 1:
            t = self.terms[0]
            return t.Z * theta[0]
        parts = [t.Z @ lam for t, lam in zip(self.terms, self.lambdas(theta))]
        return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]

    def theta_start(self) -> np.ndarray:
        """lme4's default start: identity ``Λ`` (1 on the diagonal, 0 elsewhere)."""
        return np.where(self.diag_theta, 1.0, 0.0)

    # ------------------------------------------------------------- products
    def z_times(self, V: np.ndarray, u: np.ndarray) -> np.ndarray:
        """``ZΛ u`` given ``V = zlambda(θ)``."""
        if self.K == 1:
            return V[:, 0] * u[self.col_index[:, 0]]
        return np.einsum("ik,ik->i", V, u[self.col_index])

    def zt_times(self, V: np.ndarray, v: np.ndarray) -> np.ndarray:
        """``Λ'Z' v`` for a vector ``v`` (n,)."""
        if self.K == 1:
            return np.bincount(self.col_index[:, 0], V[:, 0] * v, minlength=self.q)
        return np.bincount(self.col_index.ravel(), (V * v[:, None]).ravel(), minlength=self.q)

    def zt_times_matrix(self, V: np.ndarray, M: np.ndarray) -> np.ndarray:
        """``Λ'Z' M`` for a matrix ``M`` (n, c), shape (q, c) (a CSR product)."""
        ZLt = sparse.csr_matrix((V.ravel()[self.ent_perm], self.ent_obs, self.ent_indptr),
                                shape=(self.q, self.n))
        return np.asarray(ZLt @ M)


def _ro(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def lme4_order(re_terms) -> list[int]:
    """Formula positions sorted like lme4: number of levels decreasing, stable."""
    return sorted(range(len(re_terms)), key=lambda i: -re_terms[i].n_levels)


def build_structure(re_terms: tuple[ReTerm, ...], n: int) -> Structure:
    """Build the :class:`Structure` of a design's random-effects terms.

    Parameters
    ----------
    re_terms : tuple of ReTerm
        In formula order (at least one).
    n : int
        Number of observations.

    Raises
    ------
    DataError
        A term whose codes or ``Z`` do not match ``n``, or with unused levels.
    """
    if not re_terms:
        raise ValueError("build_structure needs at least one random-effects term")
    order = lme4_order(re_terms)
    terms = []
    off = 0
    toff = 0
    names: list[str] = []
    lower: list[float] = []
    diag: list[bool] = []
    for fi in order:
        rt = re_terms[fi]
        codes = np.asarray(rt.codes, dtype=np.int64)
        Z = np.asarray(rt.Z, dtype=float)
        if Z.ndim == 1:
            Z = Z[:, None]
        k = rt.k
        if codes.shape != (n,) or Z.shape != (n, k):
            raise DataError(
                f"random-effects term for {rt.group!r}: codes/Z shapes {codes.shape}/{Z.shape} "
                f"do not match {n} observations and {k} columns"
            )
        m = rt.n_levels
        if m == 0 or codes.min() < 0 or codes.max() >= m:
            raise DataError(f"grouping factor {rt.group!r}: level codes out of range")
        if np.bincount(codes, minlength=m).min() == 0:
            raise DataError(f"grouping factor {rt.group!r} has levels without observations")
        tr = np.tril_indices(k)
        # column-major order of the lower triangle: sort by column, then row
        o = np.lexsort((tr[0], tr[1]))
        tril = (tr[0][o], tr[1][o])
        for r_, c_ in zip(*tril):
            if r_ == c_:
                names.append(f"{rt.group}.{rt.term_names[r_]}")
            else:
                names.append(f"{rt.group}.{rt.term_names[r_]}.{rt.term_names[c_]}")
            lower.append(0.0 if r_ == c_ else -np.inf)
            diag.append(bool(r_ == c_))
        terms.append(
            TermLayout(
                group=rt.group, levels=tuple(rt.levels), term_names=tuple(rt.term_names),
                k=k, m=m, offset=off, codes=_ro(codes), Z=_ro(Z), formula_index=fi,
                theta_offset=toff, tril=tril,
            )
        )
        off += m * k
        toff += k * (k + 1) // 2
    q = off
    K = sum(t.k for t in terms)
    col_index = np.empty((n, K), dtype=np.int64)
    term_cols = []
    a = 0
    for t in terms:
        col_index[:, a:a + t.k] = t.offset + t.codes[:, None] * t.k + np.arange(t.k)[None, :]
        term_cols.append(slice(a, a + t.k))
        a += t.k

    # ---- recursive layout of A from the pattern of the own-block entries
    rows = np.repeat(col_index, K, axis=1).ravel()
    cols = np.tile(col_index, (1, K)).ravel()
    key = np.unique(rows * q + cols)
    level = _build_level([(t.k, t.m) for t in terms], key // q, key % q)
    ci_a = np.repeat(col_index[:, :, None], K, axis=2)
    ci_b = np.repeat(col_index[:, None, :], K, axis=1)
    gather = level.index(ci_a.ravel(), ci_b.ravel()).reshape(n, K, K)
    btgt = level.index(ci_a.ravel(), ci_b.ravel(), build=True)
    build_src = np.flatnonzero(btgt >= 0)
    build_tgt = btgt[build_src]

    # ---- entries sorted by column of u
    flat_cols = col_index.ravel()
    ent_perm = np.argsort(flat_cols, kind="stable")
    ent_obs = ent_perm // K
    cnt_c = np.bincount(flat_cols, minlength=q)
    ent_starts = np.concatenate([[0], np.cumsum(cnt_c)[:-1]])

    return Structure(
        n=n, q=q, K=K, terms=tuple(terms), col_index=_ro(col_index), term_cols=tuple(term_cols),
        level=level, build_src=_ro(build_src), build_tgt=_ro(build_tgt), gather_tgt=_ro(gather),
        ent_perm=_ro(ent_perm), ent_obs=_ro(ent_obs), ent_starts=_ro(ent_starts),
        ent_indptr=_ro(np.append(ent_starts, ent_perm.size)),
        ntheta=toff, theta_lower=_ro(np.array(lower)), theta_names=tuple(names),
        diag_theta=_ro(np.array(diag, dtype=bool)),
    )

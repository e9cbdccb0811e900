"""Stacked rows of many one-grouping-factor designs (:mod:`fitting.batch`'s data layout).

A :class:`Stack` holds the rows of ``S`` strata that share ``p`` (fixed effects) and
``k`` (random-effects columns of their single grouping factor), concatenated stratum
by stratum and, within a stratum, sorted by group. Per-group and per-stratum sums are
then ``np.add.reduceat`` over contiguous segments (no Python loop over groups or
strata), and per-stratum dense algebra runs as one batched ``np.linalg`` call.

Index conventions: rows ``i`` (``N``), groups ``g`` (``G``, every group non-empty),
strata ``s`` (``S``). ``strata`` and ``groups`` map a stack's strata and groups to the
positions in the stack it was taken from (the chunk), so that warm-start state (the
conditional modes) can be scattered back with plain indexing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .batch_kernels import RowKernel

__all__ = ["Stack", "stack_designs", "tril_layout"]


def tril_layout(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column in ``Λ`` of every θ entry: lower triangle, column-major (lme4)."""
    rows, cols = [], []
    for c in range(k):
        for r in range(c, k):
            rows.append(r)
            cols.append(c)
    return np.array(rows, dtype=np.int64), np.array(cols, dtype=np.int64)


def _starts(counts: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


@dataclass(frozen=True, eq=False)
class Stack:
    """Rows of several strata, stacked (see the module docstring).

    Attributes
    ----------
    X : ndarray (p, N)
        Fixed-effects columns, one contiguous row per column (numpy's inner loops then
        run over the long axis: ~10x faster than ``(N, p)`` for small ``p``).
    Z : ndarray (k, N)
        Raw random-effects columns, same layout.
    y, w, off, c : ndarray (N,)
        Response, prior weights, offset and the per-row deviance constant of the kernel.
    row_group, row_stratum : ndarray (N,)
        Local group and stratum of every row.
    group_start, group_stratum, group_size : ndarray (G,)
    row_start, row_count, group_first, group_count : ndarray (S,)
        First row / number of rows and first group / number of groups of each stratum.
    const : ndarray (S,)
        ``-2 loglik - deviance`` constant of each stratum (full normalising constants).
    strata, groups : ndarray
        Positions of the strata and groups in the parent stack.
    cache : dict
        Memo of values derived from the arrays above (feature products, flags); never
        holds anything else.
    """

    X: np.ndarray
    Z: np.ndarray
    y: np.ndarray
    w: np.ndarray
    off: np.ndarray
    c: np.ndarray
    row_group: np.ndarray
    row_stratum: np.ndarray
    group_start: np.ndarray
    group_stratum: np.ndarray
    group_size: np.ndarray
    row_start: np.ndarray
    row_count: np.ndarray
    group_first: np.ndarray
    group_count: np.ndarray
    const: np.ndarray
    strata: np.ndarray
    groups: np.ndarray
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def N(self) -> int:
        return int(self.y.shape[0])

    @property
    def G(self) -> int:
        return int(self.group_start.shape[0])

    @property
    def S(self) -> int:
        return int(self.row_start.shape[0])

    @property
    def p(self) -> int:
        return int(self.X.shape[0])

    @property
    def k(self) -> int:
        return int(self.Z.shape[0])

    @property
    def w_arg(self) -> np.ndarray | None:
        """Prior weights for the kernels, ``None`` when all are 1."""
        if "w_arg" not in self.cache:
            self.cache["w_arg"] = None if np.all(self.w == 1.0) else self.w
        return self.cache["w_arg"]

    @property
    def c_arg(self) -> np.ndarray | None:
        """Per-row deviance constants for the kernels, ``None`` when all are 0."""
        if "c_arg" not in self.cache:
            self.cache["c_arg"] = None if not np.any(self.c) else self.c
        return self.cache["c_arg"]

    # ------------------------------------------------------------- segment sums
    def by_group(self, values: np.ndarray) -> np.ndarray:
        """Sums over the rows of every group (axis 0), shape ``(G,) + rest``.

        Fastest for 1-D ``values``: a reduction over a long contiguous axis.
        """
        return np.add.reduceat(values, self.group_start, axis=0)

    def by_stratum(self, values: np.ndarray) -> np.ndarray:
        """Sums over the rows of every stratum (axis 0), shape ``(S,) + rest``."""
        return np.add.reduceat(values, self.row_start, axis=0)

    def groups_by_stratum(self, values: np.ndarray) -> np.ndarray:
        """Sums over the groups of every stratum (axis 0), shape ``(S,) + rest``."""
        return np.add.reduceat(values, self.group_first, axis=0)

    def to_rows(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast a per-group array to the rows."""
        return np.repeat(per_group, self.group_size, axis=0)

    def strata_to_rows(self, per_stratum: np.ndarray) -> np.ndarray:
        """Broadcast a per-stratum array to the rows."""
        return np.repeat(per_stratum, self.row_count, axis=0)

    def strata_to_groups(self, per_stratum: np.ndarray) -> np.ndarray:
        """Broadcast a per-stratum array to the groups."""
        return np.repeat(per_stratum, self.group_count, axis=0)

    # ---------------------------------------------------------------- subsets
    def take(self, idx: np.ndarray) -> "Stack":
        """The sub-stack of the strata ``idx`` (local indices, increasing)."""
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == self.S and np.array_equal(idx, np.arange(self.S)):
            return self
        rc, gc = self.row_count[idx], self.group_count[idx]
        rows = _ranges(self.row_start[idx], rc)
        grps = _ranges(self.group_first[idx], gc)
        gsize = self.group_size[grps]
        new_row_start = _starts(rc)
        new_group_first = _starts(gc)
        S = idx.size
        return Stack(
            X=self.X[:, rows], Z=self.Z[:, rows], y=self.y[rows], w=self.w[rows], off=self.off[rows],
            c=self.c[rows],
            row_group=np.repeat(np.arange(grps.size), gsize),
            row_stratum=np.repeat(np.arange(S), rc),
            group_start=_starts(gsize), group_stratum=np.repeat(np.arange(S), gc), group_size=gsize,
            row_start=new_row_start, row_count=rc, group_first=new_group_first, group_count=gc,
            const=self.const[idx], strata=self.strata[idx], groups=self.groups[grps],
            cache={key: self.cache[key] for key in _INHERITED if key in self.cache},
        )


#: cache entries that hold for every subset of the strata (e.g. "this column is all ones")
_INHERITED = ("ones",)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + c)`` for every (s, c), without a Python loop."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    offs = np.repeat(starts - _starts(counts), counts)
    return np.arange(total, dtype=np.int64) + offs


def stack_designs(designs: list, kernel: RowKernel) -> Stack:
    """Stack one-grouping-factor designs (same ``p`` and ``k``), rows sorted by group.

    Parameters
    ----------
    designs : list of Design
        Each with exactly one random-effects term.
    kernel : RowKernel
        Gives the per-row deviance and log-likelihood constants.
    """
    S = len(designs)
    terms = [d.re_terms[0] for d in designs]
    rc = np.array([d.nobs for d in designs], dtype=np.int64)
    gc = np.array([t.n_levels for t in terms], dtype=np.int64)
    goff = _starts(gc)
    gid = np.concatenate([np.asarray(t.codes, dtype=np.int64) + o for t, o in zip(terms, goff)])
    if gid.size > 1 and np.any(gid[1:] < gid[:-1]):
        order = np.argsort(gid, kind="stable")
        gid = gid[order]
    else:
        order = None

    def cat(arrays):
        a = np.concatenate(arrays, axis=0)
        return a if order is None else a[order]

    def cat_columns(mats, width):
        a = np.concatenate([np.asarray(m, dtype=float).reshape(-1, width) for m in mats], axis=0).T
        return np.ascontiguousarray(a if order is None else a[:, order])

    p = designs[0].p
    k = terms[0].k
    X = cat_columns([d.X for d in designs], p)
    Z = cat_columns([t.Z for t in terms], k)
    y = cat([d.y for d in designs])
    w = cat([d.weights for d in designs])
    off = cat([d.offset for d in designs])
    gsize = np.bincount(gid, minlength=int(gc.sum()))
    row_stratum = np.repeat(np.arange(S), rc)
    c = kernel.deviance_const(y, w)
    row_start = _starts(rc)
    const = np.add.reduceat(kernel.loglik_const(y, w), row_start)
    return Stack(
        X=X, Z=Z, y=y, w=w, off=off, c=c, row_group=gid, row_stratum=row_stratum,
        group_start=_starts(gsize), group_stratum=np.repeat(np.arange(S), gc), group_size=gsize,
        row_start=row_start, row_count=rc, group_first=goff, group_count=gc, const=const,
        strata=np.arange(S), groups=np.arange(int(gc.sum())),
    )

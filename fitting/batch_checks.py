"""The post-fit checks of :mod:`fitting.glmm_checks` for all strata of a batched chunk at once.

:func:`fitting.glmm_checks.glmm_diagnostics` runs the checks of one fit; per stratum, its
Laplace-adequacy check (two AGQ evaluations with their own mode search, ~1 ms on 2,000
rows) would cost about half of a batched fit. :func:`chunk_checks` computes the same
numbers for every stratum of a chunk from the stacked rows and the batched optimum
(whose conditional modes and ``A_g⁻¹`` are already at hand), and the degenerate-group
counts from three per-group sums; :func:`fitting.batch_results.build_result` hands both
to ``glmm_diagnostics``, which adds the separation screen and builds the warnings, so
the report is ``fit``'s.

The adequacy check in stacked form (per group ``g``; ``v_i = Λ'z_i``, ``R_g`` the lower
Cholesky factor of ``A_g⁻¹``, nodes ``z_j`` and log-weights of the Gauss-Hermite rule of
:func:`fitting.quadrature.tensor_rule`, ``b_i = R_g'v_i``)::

    AGQ_g - Laplace_g = logsumexp_j ( -½ Σ_{i∈g} [d_i(η̂_i + b_i'z_j) - d_i(η̂_i)]
                                     - ½ (||û_g + R_g z_j||² - ||û_g||²) + ½||z_j||² + log w_j )

(``d_i`` the row deviance: its constants cancel, as does ``log|R_g|``), which is what
:func:`fitting.agq.agq_loglik` gives for ``nagq`` nodes minus its value for one node
(Fisher curvature at the modes, like lme4 and the batched ``A``). The Laplace
log-likelihood is the fit's ``-deviance/2``.
"""
from __future__ import annotations

import numpy as np

from .batch_kernels import RowKernel
from .batch_results import Finished
from .batch_stack import Stack, tril_layout
from .glmm_checks import (ADEQUACY_NAGQ, ADEQUACY_THRESHOLD, adequacy_nodes, adequacy_report,
                          degenerate_report)
from .quadrature import tensor_rule

__all__ = ["chunk_checks", "adequacy_changes", "changes_at", "degenerate_sums"]


def adequacy_changes(st: Stack, kern: RowKernel, fin: Finished, nagq: int) -> np.ndarray:
    """``AGQ_g - Laplace_g`` (G,) for every group of ``st`` (a sub-stack of ``fin``'s chunk)."""
    return changes_at(st, kern, fin.z[st.strata], fin.u[st.groups], fin.Ainv[st.groups], nagq)


#: :func:`changes_at` evaluates the row deviances of at most this many (node, row) pairs
#: per kernel call (32 MB of float64)
_CHECK_BLOCK = 1 << 22


def changes_at(st: Stack, kern: RowKernel, z: np.ndarray, u: np.ndarray, Ainv: np.ndarray,
               nagq: int) -> np.ndarray:
    """``AGQ_g - Laplace_g`` (G,) for every group of ``st`` at given estimates, modes and curvatures.

    Parameters
    ----------
    st : Stack
    kern : RowKernel
    z : ndarray (S, d)
        (θ, β) per stratum of ``st``.
    u : ndarray (G, k)
        Conditional modes of the spherical random effects per group of ``st``.
    Ainv : ndarray (G, k, k)
        ``A_g⁻¹`` at the modes (Fisher weights).
    nagq : int
        Nodes per dimension.
    """
    k, p = st.k, st.p
    nt = k * (k + 1) // 2
    trow, tcol = tril_layout(k)
    Z, X = st.Z, st.X
    v = [np.zeros(st.N) for _ in range(k)]
    for r in range(nt):
        v[tcol[r]] += st.strata_to_rows(z[:, r]) * Z[trow[r]]
    eta = st.off.copy()
    for j in range(p):
        eta += X[j] * st.strata_to_rows(z[:, nt + j])
    for c in range(k):
        eta += v[c] * st.to_rows(u[:, c])
    w = st.w_arg
    dev0 = kern.deviance_rows(eta, st.y, w, None)
    if k == 1:
        R = np.sqrt(np.maximum(Ainv, 0.0))
    else:
        R = np.linalg.cholesky(Ainv)
    b = [sum(v[c] * st.to_rows(R[:, c, a]) for c in range(k)) for a in range(k)]  # b_i = R_g'v_i
    rule = tensor_rule(nagq, k)
    uu = (u * u).sum(axis=1)
    terms = np.empty((st.G, rule.size))
    nodes = np.asarray(rule.nodes, dtype=float).reshape(rule.size, k)
    for j, zj in enumerate(nodes):
        Uj = u + R @ zj
        terms[:, j] = -0.5 * ((Uj * Uj).sum(axis=1) - uu) + rule.half_sq_norm[j] + rule.log_weights[j]
    # the row deviances at the shifted predictors, several nodes per kernel call (one pass
    # over (nodes x rows) instead of a call per node: these calls are short on one stratum)
    moved = np.flatnonzero(np.any(nodes != 0.0, axis=1))
    B = np.stack(b)  # (k, N)
    per = max(1, _CHECK_BLOCK // max(st.N, 1))
    for lo in range(0, moved.size, per):
        js = moved[lo:lo + per]
        m = js.size
        E = (nodes[js] @ B) + eta  # (m, N)
        dev = kern.deviance_rows(E.ravel(), np.tile(st.y, m), None if w is None else np.tile(w, m), None)
        dev = dev.reshape(m, st.N) - dev0
        terms[:, js] -= 0.5 * st.by_group(np.ascontiguousarray(dev.T))
    top = terms.max(axis=1)
    top = np.where(np.isfinite(top), top, 0.0)
    return top + np.log(np.exp(terms - top[:, None]).sum(axis=1))


def degenerate_sums(st: Stack) -> tuple[np.ndarray, np.ndarray]:
    """Per group of ``st``, over the rows with positive weight: ``Σ w y`` and ``Σ w (1 - y)``."""
    use = st.w > 0
    return st.by_group(np.where(use, st.w * st.y, 0.0)), st.by_group(np.where(use, st.w * (1.0 - st.y), 0.0))


def chunk_checks(st: Stack, kern: RowKernel, fin: Finished, designs: list, strata, family,
                 ctl: dict) -> dict:
    """Precomputed checks of the strata ``strata`` (positions in the chunk) of a finished chunk.

    Parameters
    ----------
    st : Stack
        The chunk's root stack.
    kern : RowKernel
    fin : Finished
    designs : list of Design
        The chunk's designs (one grouping factor each).
    strata : array_like of int
    family : Family
    ctl : dict
        Checked control dict (``check_laplace``).

    Returns
    -------
    dict
        ``{s: {"degenerate": ..., "adequacy": ...}}``, keyword arguments of
        :func:`fitting.glmm_checks.glmm_diagnostics` (``adequacy`` only when the check is on).
    """
    strata = np.asarray(strata, dtype=np.int64)
    if strata.size == 0 or family.name not in ("binomial", "poisson"):
        return {}
    sub = st.take(strata)
    wy, wn = degenerate_sums(sub)
    nagq = adequacy_nodes(st.k, ADEQUACY_NAGQ)
    run_adequacy = bool(ctl.get("check_laplace", True))
    if run_adequacy and nagq is not None:
        change = adequacy_changes(sub, kern, fin, nagq)
        total = sub.groups_by_stratum(change)
    out = {}
    for i, s in enumerate(strata):
        term = designs[s].re_terms[0]
        a = int(sub.group_first[i])
        gs = slice(a, a + int(sub.group_count[i]))
        deg = degenerate_report(wy[gs], wn[gs], term.levels, family.name)
        item = {"degenerate": {term.group: deg}}
        if run_adequacy:
            item["adequacy"] = None if nagq is None else adequacy_report(
                -0.5 * float(fin.f[s]), float(total[i]), change[gs], nagq, ADEQUACY_THRESHOLD, term.levels)
        out[int(s)] = item
    return out

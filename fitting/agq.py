"""Adaptive Gauss–Hermite quadrature (AGQ) for GLMMs with one grouping factor.

Model (lme4's parametrisation): ``eta = X beta + offset + Z Lambda(theta) u`` with
``u ~ N(0, I)``. When every random-effects term has the same grouping factor, the
groups are conditionally independent and the marginal log-likelihood is a sum of
``k``-dimensional integrals, one per group ``g``:

.. math::

    \\ell_g = \\log \\int \\exp\\{h_g(u)\\}\\,(2\\pi)^{-k/2}\\,du,\\qquad
    h_g(u) = \\sum_{i \\in g} \\log p(y_i \\mid \\eta_i(u)) - \\tfrac12 \\lVert u\\rVert^2 .

With the mode ``u_g`` of ``h_g``, ``H_g = -\\nabla^2 h_g(u_g)`` and ``R_g`` the lower
Cholesky factor of ``H_g^{-1}``, substitute ``u = u_g + R_g z`` and write
``exp(-||z||^2/2)`` back in to use a rule for the standard normal density:

.. math::

    \\ell_g \\approx \\log |R_g| + \\operatorname{logsumexp}_j
        \\{\\log w_j + h_g(u_g + R_g z_j) + \\tfrac12\\lVert z_j\\rVert^2\\}.

The ``(2 pi)^{k/2}`` of the substitution cancels the prior's ``(2 pi)^{-k/2}``. With one
node (``z = 0, w = 1``) this is the Laplace approximation
``h_g(u_g) - 0.5 log|H_g|``, with full normalising constants (lme4's ``logLik`` scale
for ``nAGQ = 1``). Like lme4, ``H_g`` uses the IRLS (Fisher) weights, which equal the
observed ones for canonical links; ``hessian="observed"`` is available.

Vectorised across groups: rows sorted by group once (:class:`AGQData`), per-group
sums by ``np.add.reduceat``, batched ``k x k`` solves, step-halving masked per group.
lme4 allows ``nAGQ > 1`` only for one scalar term; here any terms sharing one grouping
factor (``(1 + x | g)``, ``(x || g)``) are allowed, the grid capped at
:data:`fitting.quadrature.MAX_GRID_POINTS` points.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
from scipy import optimize

from .design import Design
from .errors import FamilyError, FittingError
from .families import Family, get_family
from .quadrature import MAX_GRID_POINTS, GHRule, tensor_rule

__all__ = [
    "AGQData",
    "AGQFit",
    "AutoNAGQ",
    "prepare_agq",
    "theta_layout",
    "lambda_matrix",
    "group_modes",
    "agq_loglik",
    "fit_agq",
    "auto_nagq",
    "laplace_adequacy",
    "theta_names",
    "AUTO_NAGQ_SEQUENCE",
]

#: Node counts :func:`auto_nagq` tries, by random-effects dimension ``k``.
AUTO_NAGQ_SEQUENCE: dict[int, tuple[int, ...]] = {
    1: (1, 3, 5, 9, 15, 25),
    2: (1, 3, 5, 7, 9, 15),
    3: (1, 3, 5, 7, 9),
}
_AUTO_NAGQ_DEFAULT = (1, 3, 5, 7)
_MAX_CELLS = 2_000_000  # rows x nodes evaluated at once before chunking over nodes


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class AGQData:
    """Rows of a one-grouping-factor design sorted by group, ready for AGQ.

    Build with :func:`prepare_agq`; every array is read-only.

    Attributes
    ----------
    y, weights, offset, X, codes : ndarray
        As in the design, rows sorted by group (``codes`` = group of each row).
    Zr : ndarray (n, k)
        Random-effects columns of all terms side by side (raw, unscaled).
    n_groups : int
    starts, present : ndarray of int
        First row and index of every non-empty group (for ``np.add.reduceat``).
    blocks : tuple of int
        Size of each term's block of ``Lambda``.
    group, levels, re_names, x_names
        Grouping factor name and levels, the ``k`` term column names, X names.
    """

    y: np.ndarray
    weights: np.ndarray
    offset: np.ndarray
    X: np.ndarray
    Zr: np.ndarray
    codes: np.ndarray
    n_groups: int
    starts: np.ndarray
    present: np.ndarray
    blocks: tuple[int, ...]
    group: str
    levels: tuple[str, ...]
    re_names: tuple[str, ...]
    x_names: tuple[str, ...]

    @property
    def k(self) -> int:
        return int(self.Zr.shape[1])

    @property
    def p(self) -> int:
        return int(self.X.shape[1])

    @property
    def n_theta(self) -> int:
        return sum(b * (b + 1) // 2 for b in self.blocks)

    def segment_sum(self, values: np.ndarray) -> np.ndarray:
        """Per-group sums over axis 0 of a per-row array, shape ``(m,) + rest``."""
        sums = np.add.reduceat(values, self.starts, axis=0)
        if sums.shape[0] == self.n_groups:
            return sums
        out = np.zeros((self.n_groups,) + values.shape[1:])
        out[self.present] = sums
        return out


def _ro(a) -> np.ndarray:
    a = np.ascontiguousarray(a)
    a.setflags(write=False)
    return a


def prepare_agq(design: Design) -> AGQData:
    """Check that ``design`` has one grouping factor and sort its rows by group.

    Terms sharing the grouping factor (``(x || g)`` expands to several) are combined
    into one ``k``-vector per group with a block-diagonal ``Lambda``.

    Raises
    ------
    FittingError
        No random-effects term, or terms on different grouping factors (named).
    """
    if isinstance(design, AGQData):
        return design
    terms = design.re_terms
    if not terms:
        raise FittingError("adaptive quadrature needs a random-effects term; the design has none")
    groups = {t.group for t in terms}
    if len(groups) > 1:
        listed = ", ".join(f"({' + '.join(t.term_names)} | {t.group})" for t in terms)
        raise FittingError(
            "adaptive quadrature (nAGQ > 1) needs a single grouping factor; the design has "
            f"{len(groups)} ({', '.join(sorted(groups))}) in terms {listed}; use the Laplace "
            "approximation (method='laplace')"
        )
    first = terms[0]
    for t in terms[1:]:
        if t.levels != first.levels or not np.array_equal(t.codes, first.codes):
            raise FittingError(
                f"random-effects terms on {first.group!r} have different level codings; "
                "cannot combine them for adaptive quadrature"
            )
    codes = np.asarray(first.codes, dtype=np.int64)
    m = len(first.levels)
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    counts = np.bincount(sc, minlength=m)
    present = np.flatnonzero(counts > 0)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))[present]
    Zr = np.column_stack([np.asarray(t.Z, dtype=float).reshape(len(codes), -1) for t in terms])
    return AGQData(
        y=_ro(np.asarray(design.y, dtype=float)[order]),
        weights=_ro(np.asarray(design.weights, dtype=float)[order]),
        offset=_ro(np.asarray(design.offset, dtype=float)[order]),
        X=_ro(np.asarray(design.X, dtype=float)[order]),
        Zr=_ro(Zr[order]),
        codes=_ro(sc),
        n_groups=m,
        starts=_ro(starts),
        present=_ro(present),
        blocks=tuple(t.k for t in terms),
        group=first.group,
        levels=tuple(first.levels),
        re_names=tuple(n for t in terms for n in t.term_names),
        x_names=tuple(design.x_names),
    )


def theta_layout(blocks) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of the ``theta`` entries in ``Lambda`` (lme4 order).

    Each term contributes the lower triangle of its block in column-major order
    (lme4's ``theta``), terms in formula order.

    Returns
    -------
    rows, cols : ndarray of int
        Position of each ``theta`` entry in the ``k x k`` ``Lambda``.
    is_diag : ndarray of bool
        Diagonal entries (bounded below by 0).
    """
    rows, cols, off = [], [], 0
    for b in blocks:
        for c in range(b):
            for r in range(c, b):
                rows.append(off + r)
                cols.append(off + c)
        off += b
    rows, cols = np.array(rows, dtype=int), np.array(cols, dtype=int)
    return rows, cols, rows == cols


def lambda_matrix(theta, blocks) -> np.ndarray:
    """The ``k x k`` relative covariance factor ``Lambda(theta)``."""
    rows, cols, _ = theta_layout(blocks)
    theta = np.asarray(theta, dtype=float)
    if theta.shape != rows.shape:
        raise ValueError(f"theta has {theta.size} entries, expected {rows.size}")
    k = int(sum(blocks))
    lam = np.zeros((k, k))
    lam[rows, cols] = theta
    return lam


# --------------------------------------------------------------------- inner loop
def _resolve(design, family) -> tuple[AGQData, Family]:
    data = prepare_agq(design)
    fam = get_family(family)
    if fam.estimates_scale:
        raise FamilyError(
            f"adaptive quadrature is for families with fixed dispersion (binomial, poisson); "
            f"{fam.name!r} has a scale parameter (its Laplace fit is exact with identity link)"
        )
    return data, fam


def _loglik_rows(fam: Family, data: AGQData, eta: np.ndarray) -> np.ndarray:
    """Per-row log-likelihood, ``eta`` of shape (n,) or (n, J)."""
    if eta.ndim == 1:
        return fam.loglik(data.y, fam.link.inverse(eta), data.weights)
    return fam.loglik(data.y[:, None], fam.link.inverse(eta), data.weights[:, None])


def _row_weights(fam: Family, data: AGQData, eta: np.ndarray, observed: bool):
    """Score ``d loglik / d eta`` and curvature weight ``-d2 loglik / d eta2`` per row."""
    mu = fam.link.inverse(eta)
    d = fam.link.mu_eta(eta)
    v = fam.variance(mu)
    r = data.y - mu
    score = data.weights * r * d / v
    w = data.weights * d * d / v
    if observed:
        w = w - data.weights * r * (fam.link.mu_eta2(eta) / v - d * d * fam.variance_deriv(mu) / (v * v))
    return score, w


def _curvature(data: AGQData, A: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``H_g = sum_i w_i a_i a_i' + I`` for all groups, shape (m, k, k)."""
    k = A.shape[1]
    H = data.segment_sum((w[:, None] * A)[:, :, None] * A[:, None, :])
    H += np.eye(k)
    return H


def _solve(H: np.ndarray, g: np.ndarray) -> np.ndarray:
    if H.shape[1] == 1:
        return g / H[:, :, 0]
    return np.linalg.solve(H, g[:, :, None])[:, :, 0]


def _modes(data, fam, lam, beta, u0, *, tol=1e-10, maxiter=50, max_halving=30, hessian="fisher"):
    """Newton (Fisher scoring) for all group modes at once; see :func:`group_modes`."""
    m, k = data.n_groups, data.k
    A = data.Zr @ lam  # eta_i = base_i + A_i . u_g
    base = data.X @ beta + data.offset

    def at(u):
        eta = base + np.einsum("ik,ik->i", A, u[data.codes])
        return eta, data.segment_sum(_loglik_rows(fam, data, eta)) - 0.5 * np.einsum("gk,gk->g", u, u)

    u = np.zeros((m, k)) if u0 is None else np.array(u0, dtype=float).reshape(m, k)
    eta, h = at(u)
    converged = False
    for _ in range(maxiter):
        score, w = _row_weights(fam, data, eta, observed=False)
        grad = data.segment_sum(score[:, None] * A) - u
        H = _curvature(data, A, w)
        step = _solve(H, grad)
        if not np.all(np.isfinite(step)):
            break
        if np.max(np.abs(step)) <= tol * (1.0 + np.max(np.abs(u))):
            converged = True
            break
        t = np.ones(m)
        for _ in range(max_halving):  # halve the step of the groups whose h_g decreased
            u_new = u + t[:, None] * step
            eta_new, h_new = at(u_new)
            bad = ~(h_new >= h - 1e-12 * (1.0 + np.abs(h)))
            if not bad.any():
                break
            t[bad] *= 0.5
        else:  # groups that never improved keep their old value
            u_new[bad] = u[bad]
            eta_new, h_new = at(u_new)
        u, eta, h = u_new, eta_new, h_new
    if hessian == "observed" or not converged:
        _, w = _row_weights(fam, data, eta, observed=hessian == "observed")
        H = _curvature(data, A, w)
    return u, H, converged, eta, h, A


def group_modes(design, family, theta, beta, u0=None, *, tol=1e-10, maxiter=50, hessian="fisher"):
    """Conditional modes of the spherical random effects, all groups at once.

    Maximises ``h_g(u) = sum_{i in g} loglik(y_i | eta_i) - ||u||^2 / 2`` for every group
    by Fisher scoring (Newton for canonical links) with per-group step-halving.

    Parameters
    ----------
    design : Design or AGQData
    family : str or Family
    theta : array_like
        lme4's ``theta`` (lower triangles of the term blocks, column-major).
    beta : array_like (p,)
    u0 : array_like (m, k), optional
        Starting modes (zeros by default).
    tol : float
        Stop when ``max |Newton step| <= tol * (1 + max |u|)``.
    maxiter : int
    hessian : {"fisher", "observed"}
        Curvature returned in ``H``: IRLS weights (lme4's choice) or the observed
        negative Hessian; identical for canonical links.

    Returns
    -------
    u_hat : ndarray (m, k)
        Modes of the spherical effects (``b = Lambda u``).
    H : ndarray (m, k, k)
        Negative Hessian of ``h_g`` at ``u_hat`` (see ``hessian``).
    converged : bool
    """
    data, fam = _resolve(design, family)
    if hessian not in ("fisher", "observed"):
        raise ValueError(f"hessian must be 'fisher' or 'observed', got {hessian!r}")
    lam = lambda_matrix(theta, data.blocks)
    u, H, conv, *_ = _modes(
        data, fam, lam, np.asarray(beta, dtype=float), u0, tol=tol, maxiter=maxiter, hessian=hessian
    )
    return u, H, conv


def _quadrature(data, fam, rule: GHRule, u, H, eta_hat, h_hat, A):
    """Per-group AGQ log-integrals (m,) given the modes and curvatures."""
    m, k = u.shape
    if k == 1:
        R = 1.0 / np.sqrt(H)  # (m, 1, 1)
        logdetR = -0.5 * np.log(H[:, 0, 0])
    else:
        L = np.linalg.cholesky(H)  # H = L L'; R = chol(H^-1)
        R = np.linalg.cholesky(np.linalg.inv(H))
        logdetR = -np.sum(np.log(np.diagonal(L, axis1=1, axis2=2)), axis=1)
    if rule.size == 1 and not np.any(rule.nodes):
        return h_hat + logdetR
    B = np.einsum("ik,ikl->il", A, R[data.codes])  # eta_ij = eta_hat_i + B_i . z_j
    chunk = max(1, _MAX_CELLS // max(1, eta_hat.size))
    S = np.empty((m, rule.size))
    for j0 in range(0, rule.size, chunk):
        z = rule.nodes[j0 : j0 + chunk]
        eta = eta_hat[:, None] + B @ z.T
        S[:, j0 : j0 + chunk] = data.segment_sum(_loglik_rows(fam, data, eta))
    Uj = u[:, None, :] + np.einsum("gkl,jl->gjk", R, rule.nodes)  # (m, J, k)
    log_terms = S - 0.5 * np.einsum("gjk,gjk->gj", Uj, Uj) + rule.half_sq_norm + rule.log_weights
    top = log_terms.max(axis=1)  # logsumexp by hand: scipy's costs ~0.2 ms per call
    top = np.where(np.isfinite(top), top, 0.0)
    return top + np.log(np.exp(log_terms - top[:, None]).sum(axis=1)) + logdetR


def _check_nagq(nagq, k: int, prune: float) -> GHRule:
    if isinstance(nagq, bool) or not isinstance(nagq, (int, np.integer)) or nagq < 1:
        raise ValueError(f"nagq must be an integer >= 1, got {nagq!r}")
    return tensor_rule(int(nagq), k, prune=prune)


def _eval(data, fam, rule, theta, beta, u0, hessian="fisher"):
    lam = lambda_matrix(theta, data.blocks)
    u, H, conv, eta, h, A = _modes(data, fam, lam, beta, u0, hessian=hessian)
    per = _quadrature(data, fam, rule, u, H, eta, h, A)
    if data.present.size < data.n_groups:  # a level without rows integrates to exactly 1
        empty = np.ones(data.n_groups, dtype=bool)
        empty[data.present] = False
        per[empty] = 0.0
    return float(per.sum()), per, u, H, conv


def agq_loglik(design, family, theta, beta, nagq, u0=None, *, prune=0.0, hessian="fisher"):
    """Marginal log-likelihood by adaptive Gauss–Hermite quadrature.

    Parameters
    ----------
    design : Design or AGQData
        One grouping factor (one or more terms on it).
    family : str or Family
    theta, beta : array_like
    nagq : int
        Nodes per dimension; ``1`` is the Laplace approximation (lme4's ``nAGQ = 1``
        log-likelihood). The grid has ``nagq**k`` points, at most
        :data:`fitting.quadrature.MAX_GRID_POINTS`.
    u0 : array_like (m, k), optional
        Starting modes for the inner Newton iterations.
    prune : float
        Passed to :func:`fitting.quadrature.tensor_rule` (drop negligible-weight points).
    hessian : {"fisher", "observed"}
        Curvature used for the scale of the grid (and the Laplace determinant).

    Returns
    -------
    loglik : float
        With all normalising constants (``log choose(n, y)``, ``-log y!``).
    per_group : ndarray (m,)
        Each group's marginal log-likelihood (``loglik = per_group.sum()``).
    u_hat : ndarray (m, k)
        The conditional modes the grid is centred on.

    Raises
    ------
    FittingError, FamilyError, ValueError
        Several grouping factors, a Gaussian family, bad ``nagq`` or too large a grid.
    """
    data, fam = _resolve(design, family)
    rule = _check_nagq(nagq, data.k, prune)
    theta = np.asarray(theta, dtype=float)
    total, per, u, _, _ = _eval(data, fam, rule, theta, np.asarray(beta, dtype=float), u0, hessian)
    return total, per, u


# ------------------------------------------------------------------------ fitting
@dataclass(frozen=True)
class AGQFit:
    """Result of :func:`fit_agq`.

    Attributes
    ----------
    nagq : int
    theta, beta : ndarray
    loglik : float
        Maximised AGQ log-likelihood, full constants (``deviance = -2 * loglik``).
    u_hat, ranef, ranef_sd : ndarray (m, k)
        Spherical modes ``u``, conditional modes of ``b = Lambda u`` (lme4's
        ``ranef``) and their conditional sds ``sqrt diag(Lambda H^-1 Lambda')``.
    per_group : ndarray (m,)
    evaluations : int
        Log-likelihood evaluations, finite differences included.
    converged : bool
    message : str
    max_grad : float
        Max abs central-difference gradient of the deviance over ``(theta, beta)``
        (components pushing against a ``theta >= 0`` bound excluded).
    vcov : ndarray or None
        ``2 inv(Hessian of the deviance)`` over ``(theta, beta)``, theta first, by
        central differences (lme4's default ``use.hessian``); None if not computed
        or not positive definite (``hessian_pd``).
    hessian_pd : bool
    elapsed : float
    names : tuple of str
        theta names (lme4 style ``group.term``) then the x names.
    """

    nagq: int
    theta: np.ndarray
    beta: np.ndarray
    loglik: float
    u_hat: np.ndarray
    ranef: np.ndarray
    ranef_sd: np.ndarray
    per_group: np.ndarray
    evaluations: int
    converged: bool
    message: str
    max_grad: float
    vcov: np.ndarray | None
    hessian_pd: bool
    elapsed: float
    names: tuple[str, ...] = ()

    @property
    def deviance(self) -> float:
        return -2.0 * self.loglik


def theta_names(data: AGQData) -> tuple[str, ...]:
    """lme4-style names of ``theta`` entries (``g.(Intercept)``, ``g.x.(Intercept)``)."""
    rows, cols, diag = theta_layout(data.blocks)
    nm = data.re_names
    return tuple(
        f"{data.group}.{nm[r]}" if d else f"{data.group}.{nm[r]}.{nm[c]}"
        for r, c, d in zip(rows, cols, diag)
    )


def _glm_start(data: AGQData, fam: Family, maxiter: int = 50) -> np.ndarray:
    """IRLS estimate of beta ignoring the random effects."""
    eta = fam.link.link(fam.starting_mu(data.y, data.weights))
    beta = np.zeros(data.p)
    for _ in range(maxiter):
        mu, d = fam.link.inverse(eta), fam.link.mu_eta(eta)
        w = data.weights * d * d / fam.variance(mu)
        z = eta - data.offset + (data.y - mu) / d
        sw = np.sqrt(w)
        new = np.linalg.lstsq(data.X * sw[:, None], z * sw, rcond=None)[0]
        if np.max(np.abs(new - beta)) < 1e-10 * (1.0 + np.max(np.abs(beta))):
            return new
        beta = new
        eta = data.X @ beta + data.offset
    return beta


def _preconditioner(data, fam, rule, theta, beta, u0):
    """Scaling ``x = x0 + P delta`` making the deviance Hessian near the identity.

    beta block: ``(2 I_beta)^{-1/2}`` with ``I_beta`` the information conditional on
    theta (Schur complement of the random effects); theta: diagonal from finite
    differences of the deviance along each coordinate.
    """
    lam = lambda_matrix(theta, data.blocks)
    u, H, _, eta, _, A = _modes(data, fam, lam, beta, u0)
    _, w = _row_weights(fam, data, eta, observed=False)
    XtWX = (data.X * w[:, None]).T @ data.X
    C = data.segment_sum((w[:, None] * A)[:, :, None] * data.X[:, None, :])  # (m, k, p)
    HinvC = np.linalg.solve(H, C)
    info = XtWX - np.einsum("gkp,gkq->pq", C, HinvC)
    nt, p = theta.size, data.p
    P = np.zeros((nt + p, nt + p))
    try:
        Lc = np.linalg.cholesky(2.0 * info)
        P[nt:, nt:] = np.linalg.inv(Lc).T
    except np.linalg.LinAlgError:
        P[nt:, nt:] = np.diag(1.0 / np.sqrt(np.maximum(2.0 * np.diag(info), 1e-8)))
    f0 = -2.0 * _eval(data, fam, rule, theta, beta, u)[0]
    for j in range(nt):
        hstep = 1e-3 * max(1.0, abs(theta[j]))
        e = np.zeros(nt)
        e[j] = hstep
        fp = -2.0 * _eval(data, fam, rule, theta + e, beta, u)[0]
        fm = -2.0 * _eval(data, fam, rule, theta - e, beta, u)[0]
        curv = (fp - 2.0 * f0 + fm) / hstep**2
        P[j, j] = float(np.clip(1.0 / math.sqrt(curv), 1e-3, 10.0)) if curv > 1e-8 else 1.0
    return P, u, 2 * nt + 1


def _fd_derivs(fun, x, h, hessian: bool):
    """Central-difference gradient (and Hessian) of ``fun`` at ``x``; counts calls."""
    d = x.size
    f0 = fun(x)
    fp, fm = np.empty(d), np.empty(d)
    for i in range(d):
        e = np.zeros(d)
        e[i] = h
        fp[i], fm[i] = fun(x + e), fun(x - e)
    g = (fp - fm) / (2 * h)
    n = 1 + 2 * d
    if not hessian:
        return f0, g, None, n
    Hm = np.diag((fp - 2 * f0 + fm) / h**2)
    for i in range(d):
        for j in range(i):
            ei, ej = np.zeros(d), np.zeros(d)
            ei[i], ej[j] = h, h
            v = (fun(x + ei + ej) - fun(x + ei - ej) - fun(x - ei + ej) + fun(x - ei - ej)) / (4 * h * h)
            Hm[i, j] = Hm[j, i] = v
            n += 4
    return f0, g, Hm, n


def fit_agq(design, family, nagq: int, *, start_theta=None, start_beta=None, maxiter: int = 500,
            gtol: float = 1e-5, compute_vcov: bool = True, prune: float = 0.0) -> AGQFit:
    """Maximise the AGQ log-likelihood over ``(theta, beta)``.

    L-BFGS-B on ``-2 loglik`` in a preconditioned parametrisation (``x = x0 + P delta``
    with ``P`` from the information at the start, so the deviance Hessian is near the
    identity), central finite-difference gradients warm-started at the current modes,
    ``theta`` diagonal entries bounded below by 0.

    Parameters
    ----------
    design : Design or AGQData
    family : str or Family
    nagq : int
        Nodes per dimension (1 = Laplace).
    start_theta, start_beta : array_like, optional
        Starting values, ideally the Laplace fit. Defaults: ``theta`` with 1 on the
        diagonals and 0 elsewhere (lme4's default), ``beta`` from a GLM fit.
    maxiter : int
        L-BFGS-B iterations.
    gtol : float
        Projected-gradient tolerance in the preconditioned scale (deviance units per
        standard error).
    compute_vcov : bool
        Finite-difference Hessian of the deviance at the optimum for ``vcov``
        (``2 d**2 + 1`` evaluations, ``d = n_theta + p``).
    prune : float
        Grid pruning (see :func:`fitting.quadrature.tensor_rule`); 0 keeps the full grid.

    Returns
    -------
    AGQFit
    """
    t0 = time.perf_counter()
    data, fam = _resolve(design, family)
    rule = _check_nagq(nagq, data.k, prune)
    rows, cols, diag = theta_layout(data.blocks)
    nt = rows.size
    theta0 = diag.astype(float) if start_theta is None else np.asarray(start_theta, dtype=float).copy()
    if theta0.shape != (nt,):
        raise ValueError(f"start_theta has {theta0.size} entries, expected {nt}")
    beta0 = _glm_start(data, fam) if start_beta is None else np.asarray(start_beta, dtype=float).copy()
    if beta0.shape != (data.p,):
        raise ValueError(f"start_beta has {beta0.size} entries, expected {data.p}")
    theta0[diag] = np.maximum(theta0[diag], 0.0)
    x0 = np.concatenate([theta0, beta0])

    P, u_start, nev = _preconditioner(data, fam, rule, theta0, beta0, None)
    f_ref = -2.0 * _eval(data, fam, rule, theta0, beta0, u_start)[0]
    nev += 1
    counter = [nev]

    def dev_at(x, u0):
        counter[0] += 1
        return -2.0 * _eval(data, fam, rule, x[:nt], x[nt:], u0)[0] - f_ref

    def fun_grad(delta):
        x = x0 + P @ delta
        tot, _, u, _, _ = _eval(data, fam, rule, x[:nt], x[nt:], u_start)
        counter[0] += 1
        f = -2.0 * tot - f_ref
        if not np.isfinite(f):
            return 1e10, np.zeros_like(delta)
        h = 1e-4
        g = np.empty(delta.size)
        for i in range(delta.size):
            e = P[:, i] * h
            g[i] = (dev_at(x + e, u) - dev_at(x - e, u)) / (2 * h)
        return f, g

    lower = np.full(x0.size, -np.inf)
    lower[:nt][diag] = -x0[:nt][diag] / np.diag(P)[:nt][diag]
    res = optimize.minimize(
        fun_grad, np.zeros(x0.size), jac=True, method="L-BFGS-B",
        bounds=list(zip(lower, [np.inf] * x0.size)),
        options={"maxiter": maxiter, "ftol": 1e-13, "gtol": gtol, "maxcor": 20},
    )
    x = x0 + P @ np.maximum(res.x, lower)
    theta, beta = x[:nt].copy(), x[nt:].copy()
    theta[diag] = np.maximum(theta[diag], 0.0)
    x = np.concatenate([theta, beta])
    loglik, per, u, H, mconv = _eval(data, fam, rule, theta, beta, u_start)
    counter[0] += 1

    # derivatives in the preconditioned scale (delta), mapped back to (theta, beta)
    _, gd, Hd, _ = _fd_derivs(lambda d_: dev_at(x + P @ d_, u), np.zeros(x.size), 1e-3, compute_vcov)
    at_bound = np.concatenate([diag & (theta <= 1e-10), np.zeros(data.p, dtype=bool)])
    grad_x = np.linalg.solve(P.T, gd)  # d dev / dx
    max_grad = float(np.max(np.abs(np.where(at_bound, np.minimum(grad_x, 0.0), grad_x))))
    vcov, pd = None, False
    if Hd is not None:
        try:
            np.linalg.cholesky(Hd)
            pd, vcov = True, P @ (2.0 * np.linalg.inv(Hd)) @ P.T
        except np.linalg.LinAlgError:
            pass
    free_gd = np.where(at_bound, np.minimum(gd, 0.0), gd)
    converged = bool(mconv and np.isfinite(loglik) and np.max(np.abs(free_gd)) < 1e-2)
    message = str(res.message) + ("" if mconv else "; the inner Newton iterations did not converge")
    lam = lambda_matrix(theta, data.blocks)
    cov_b = lam @ np.linalg.inv(H) @ lam.T
    ranef_sd = np.sqrt(np.clip(np.diagonal(cov_b, axis1=1, axis2=2), 0.0, None))
    return AGQFit(
        int(nagq), theta, beta, float(loglik), u, u @ lam.T, ranef_sd, per, int(counter[0]),
        converged, message, max_grad, vcov, pd, time.perf_counter() - t0,
        theta_names(data) + data.x_names,
    )


# ----------------------------------------------------------------- node selection
@dataclass(frozen=True)
class AutoNAGQ:
    """Result of :func:`auto_nagq`.

    Attributes
    ----------
    nagq : int
        Node count of ``fit`` (the first count whose fit agreed with the previous one).
    fit : AGQFit
    converged : bool
        Whether two consecutive node counts agreed within the tolerances.
    history : tuple of dict
        One entry per node count tried: ``nagq, loglik, theta, beta, evaluations``.
    message : str
    """

    nagq: int
    fit: AGQFit
    converged: bool
    history: tuple = field(default_factory=tuple)
    message: str = ""


def auto_nagq(design, family, start_theta, start_beta, *, tol: float = 1e-4,
              est_tol: float = 1e-3, max_nodes: int = 25, sequence=None) -> AutoNAGQ:
    """Raise the number of nodes until the fit stops changing.

    Fits at ``1, 3, 5, 9, 15, 25`` nodes (``k = 1``; fewer for ``k >= 2``, see
    :data:`AUTO_NAGQ_SEQUENCE`), each warm-started at the previous estimates, and stops
    at the first count whose log-likelihood differs from the previous one by less than
    ``tol`` and whose estimates differ by less than ``est_tol`` (absolute).

    Parameters
    ----------
    design : Design or AGQData
    family : str or Family
    start_theta, start_beta : array_like
        Starting values (the Laplace estimates).
    tol, est_tol : float
    max_nodes : int
        Largest node count per dimension tried.
    sequence : iterable of int, optional
        Override the node counts.

    Returns
    -------
    AutoNAGQ
    """
    data, fam = _resolve(design, family)
    seq = tuple(sequence) if sequence is not None else AUTO_NAGQ_SEQUENCE.get(data.k, _AUTO_NAGQ_DEFAULT)
    seq = tuple(q for q in seq if q <= max_nodes and q ** data.k <= MAX_GRID_POINTS)
    if not seq:
        raise ValueError(f"no node count <= max_nodes={max_nodes} fits the grid cap for k={data.k}")
    history, prev = [], None
    theta, beta = np.asarray(start_theta, dtype=float), np.asarray(start_beta, dtype=float)
    for q in seq:
        fit = fit_agq(data, fam, q, start_theta=theta, start_beta=beta, compute_vcov=False)
        history.append(
            {"nagq": q, "loglik": fit.loglik, "theta": fit.theta.tolist(),
             "beta": fit.beta.tolist(), "evaluations": fit.evaluations}
        )
        theta, beta = fit.theta, fit.beta
        if prev is not None:
            dl = abs(fit.loglik - prev.loglik)
            de = float(np.max(np.abs(np.concatenate([fit.theta - prev.theta, fit.beta - prev.beta]))))
            if dl < tol and de < est_tol:
                final = fit_agq(data, fam, q, start_theta=theta, start_beta=beta)
                msg = (f"nAGQ={q}: log-likelihood changed by {dl:.2e} and estimates by "
                       f"{de:.2e} from nAGQ={prev.nagq}")
                return AutoNAGQ(q, final, True, tuple(history), msg)
        prev = fit
    final = fit_agq(data, fam, seq[-1], start_theta=theta, start_beta=beta)
    msg = f"no agreement between consecutive node counts up to nAGQ={seq[-1]}; using it"
    return AutoNAGQ(seq[-1], final, False, tuple(history), msg)


def laplace_adequacy(design, family, theta, beta, *, nagq: int = 7, threshold: float = 0.01) -> dict:
    """Cheap check of the Laplace approximation at fixed estimates.

    Compares the log-likelihood at ``nagq = 1`` (Laplace) with ``nagq`` nodes (7 by
    default) at the same ``(theta, beta)``; a change above ``threshold`` means adaptive
    quadrature would move the answer (small groups, binary data, large variances).

    Returns
    -------
    dict
        ``loglik_laplace, loglik_agq, nagq, difference`` (AGQ minus Laplace),
        ``abs_difference, threshold, flag`` (bool), ``worst_groups`` (indices of the 5
        groups with the largest per-group change) and ``message``.
    """
    data, fam = _resolve(design, family)
    l1, p1, u = agq_loglik(data, fam, theta, beta, 1)
    lq, pq, _ = agq_loglik(data, fam, theta, beta, nagq, u0=u)
    diff = lq - l1
    flag = bool(abs(diff) > threshold)
    worst = np.argsort(-np.abs(pq - p1))[:5]
    msg = (f"log-likelihood changes by {diff:+.4g} from Laplace to nAGQ={nagq}"
           + ("; consider method='agq'" if flag else "; Laplace is adequate"))
    return {"loglik_laplace": float(l1), "loglik_agq": float(lq), "nagq": int(nagq),
            "difference": float(diff), "abs_difference": float(abs(diff)),
            "threshold": float(threshold), "flag": flag,
            "worst_groups": [int(i) for i in worst], "message": msg}

"""Batched optimisation for :mod:`fitting.batch`: GLM starting values and Newton over (θ, β).

Every stratum of a :class:`~fitting.batch_stack.Stack` is optimised on its own, all at
once: one call of :func:`fitting.batch_laplace.evaluate` gives the deviance, gradient
and exact Hessian of every active stratum; the Newton directions are one batched
``np.linalg`` call on the ``(S, d, d)`` stack (eigenvalues of an indefinite Hessian
replaced by their magnitudes, floored, so that every direction descends); a stratum
whose trial point does not pass its Armijo test backs off alone (only its rows are
re-evaluated); converged strata leave the working set (its rows are compacted).

θ is unbounded, as in :mod:`fitting.glmm_fit`: the Laplace deviance does not change when
a column of ``Λ`` changes sign, so the iterates never stick on ``θ = 0``; the caller
makes θ canonical afterwards.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .batch_kernels import RowKernel
from .batch_laplace import BatchEval, evaluate, strata_gram, strata_sums
from .batch_stack import Stack
from .fitcommon import moment_cov_theta, moment_sd

__all__ = ["NewtonResult", "newton", "glm_start", "moment_theta", "moment_theta_vector", "solve_stack", "directions", "LAMBDA2_TOL", "GRAD_TOL",
           "ARMIJO", "MAX_BACKTRACK", "MAX_STEP"]

#: converged when the Newton decrement ``λ² = g'H⁻¹g`` is below this (deviance units) ...
#: With ``H`` the Hessian of the deviance (twice the information), the remaining Newton
#: step ``Δz = H⁻¹g`` has ``|Δz_j| <= λ sqrt((H⁻¹)_jj) = λ SE_j/√2``: at ``λ² = 1e-10``
#: every estimate is within 1e-5 of its standard error of the exact optimum and the
#: deviance within ``λ²/2 = 5e-11`` of its minimum. (1e-14 took one more evaluation in
#: most fits to move the estimates by 1e-8..5e-7.)
LAMBDA2_TOL = 1e-10
#: ... or the largest gradient component is below this, with a positive definite Hessian
GRAD_TOL = 1e-10
#: Armijo constant: a trial step ``α·s`` is accepted when ``f(z + α s) <= f(z) + ARMIJO·α·g's``
#: (plus a rounding allowance of ``1e-10 (1 + |f|)``)
ARMIJO = 1e-4
#: line-search trials per iteration at most (quadratic back-tracking); then the stratum fails
MAX_BACKTRACK = 30
#: largest component of a Newton step (in θ, β units) before the line search
MAX_STEP = 10.0


def solve_stack(H: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``H⁻¹ b`` for stacks (S, d, d) × (S, d); singular members by pseudo-inverse."""
    try:
        return np.linalg.solve(H, b[:, :, None])[:, :, 0]
    except np.linalg.LinAlgError:
        return np.einsum("sij,sj->si", np.linalg.pinv(H), b)


def directions(H: np.ndarray, g: np.ndarray):
    """Modified-Newton directions, decrements and positive definiteness per stratum.

    Eigenvalues of ``H`` are replaced by their magnitudes, floored at ``1e-8`` of the
    largest (and ``1e-12``), so every direction descends; a non-finite ``H`` is
    replaced by the identity (a gradient step).

    Parameters
    ----------
    H : ndarray (S, d, d)
    g : ndarray (S, d)

    Returns
    -------
    step : ndarray (S, d)
        ``-|H|⁻¹ g``.
    lam2 : ndarray (S,)
        Newton decrements ``g'|H|⁻¹g``.
    pd : ndarray (S,) of bool
        ``H`` finite and positive definite.
    """
    bad = ~np.all(np.isfinite(H), axis=(1, 2))
    Hs = np.where(bad[:, None, None], np.eye(H.shape[1]), H)
    w, Q = np.linalg.eigh(Hs)
    a = np.abs(w)
    floor = np.maximum(1e-8 * a.max(axis=1, keepdims=True), 1e-12)
    a = np.maximum(a, floor)
    gq = np.einsum("sji,sj->si", Q, g)
    step = -np.einsum("sij,sj->si", Q, gq / a)
    lam2 = (gq * gq / a).sum(axis=1)
    pd = (w.min(axis=1) > 0) & ~bad
    return step, lam2, pd


@dataclass
class NewtonResult:
    """Per-stratum outcome of :func:`newton` (arrays over the stack's strata/groups).

    Attributes
    ----------
    z : ndarray (S, d)
    f : ndarray (S,)
    g : ndarray (S, d)
    H : ndarray (S, d, d)
    u : ndarray (G, k)
    Ainv : ndarray (G, k, k)
    du : ndarray (G, k, d)
        ``dû/dz`` at ``z``: the first-order prediction of the modes at a trial point
        (saves PIRLS iterations).
    info_rx : ndarray (S, p, p) or None
    status : ndarray (S,) of int
        0 converged, 1 iteration limit, 2 failed (non-finite deviance, PIRLS failure or
        no decrease along the Newton direction).
    iterations, evaluations, pirls_iterations : ndarray (S,) of int
    hessian_pd : ndarray (S,) of bool
    log : list of list of float
        Deviance after every accepted iteration, per stratum.
    """

    z: np.ndarray
    f: np.ndarray
    g: np.ndarray
    H: np.ndarray
    u: np.ndarray
    Ainv: np.ndarray
    du: np.ndarray
    info_rx: np.ndarray | None
    status: np.ndarray
    iterations: np.ndarray
    evaluations: np.ndarray
    pirls_iterations: np.ndarray
    hessian_pd: np.ndarray
    log: list = field(default_factory=list)


def _store(res: NewtonResult, where: np.ndarray, sub: Stack, ev: BatchEval, local: np.ndarray, z: np.ndarray):
    """Copy the evaluation of the strata ``local`` of ``sub`` into ``res`` at ``where``."""
    res.z[where] = z
    res.f[where] = ev.f[local]
    res.g[where] = ev.g[local]
    res.H[where] = ev.H[local]
    if ev.info_rx is not None:
        res.info_rx[where] = ev.info_rx[local]
    gmask = np.isin(sub.group_stratum, local)
    res.u[sub.groups[gmask]] = ev.u[gmask]
    res.Ainv[sub.groups[gmask]] = ev.Ainv[gmask]
    res.du[sub.groups[gmask]] = ev.du[gmask]


def newton(st: Stack, kern: RowKernel, z0: np.ndarray, *, maxiter: int = 100, rx: bool = False,
           u0: np.ndarray | None = None) -> NewtonResult:
    """Minimise the Laplace deviance of every stratum of ``st`` from ``z0``.

    Parameters
    ----------
    st : Stack
        A root stack (``st.strata == arange(S)``).
    kern : RowKernel
    z0 : ndarray (S, d)
        Starting (θ, β) per stratum.
    maxiter : int
        Newton iterations per stratum.
    rx : bool
        Also keep the fixed-effects information conditional on θ at the optimum.
    u0 : ndarray (G, k), optional
        Starting conditional modes.

    Returns
    -------
    NewtonResult
    """
    S, k, p = st.S, st.k, st.p
    nt = k * (k + 1) // 2
    d = nt + p
    res = NewtonResult(
        z=z0.astype(float).copy(), f=np.full(S, np.inf), g=np.zeros((S, d)), H=np.zeros((S, d, d)),
        u=np.zeros((st.G, k)) if u0 is None else u0.copy(), Ainv=np.ones((st.G, k, k)),
        du=np.zeros((st.G, k, d)),
        info_rx=np.zeros((S, p, p)) if rx else None, status=np.full(S, -1),
        iterations=np.zeros(S, dtype=np.int64), evaluations=np.zeros(S, dtype=np.int64),
        pirls_iterations=np.zeros(S, dtype=np.int64), hessian_pd=np.zeros(S, dtype=bool),
        log=[[] for _ in range(S)],
    )
    ev = evaluate(st, kern, z0[:, :nt], z0[:, nt:], res.u, rx=rx)
    res.evaluations += 1
    res.pirls_iterations += ev.iterations
    _store(res, np.arange(S), st, ev, np.arange(S), z0)
    res.status[~ev.ok] = 2
    for s in range(S):
        res.log[s].append(float(res.f[s]))
    work = st
    for _ in range(maxiter + 1):
        active = np.flatnonzero(res.status == -1)
        if active.size == 0:
            break
        step, lam2, pd = directions(res.H[active], res.g[active])
        res.hessian_pd[active] = pd
        conv = pd & ((lam2 <= LAMBDA2_TOL) | (np.abs(res.g[active]).max(axis=1) <= GRAD_TOL))
        res.status[active[conv]] = 0
        over = res.iterations[active] >= maxiter
        res.status[active[over & ~conv]] = 1
        keep = ~conv & ~over
        active, step = active[keep], step[keep]
        if active.size == 0:
            break
        big = np.abs(step).max(axis=1)
        step *= np.minimum(1.0, MAX_STEP / big)[:, None]
        # working set: the rows of the active strata only
        if not np.array_equal(work.strata, active):
            work = work.take(np.flatnonzero(np.isin(work.strata, active)))
        slope = np.einsum("sd,sd->s", res.g[active], step)
        alpha = np.ones(active.size)
        todo = np.arange(active.size)
        for _bt in range(MAX_BACKTRACK):
            ids = active[todo]
            local = np.flatnonzero(np.isin(work.strata, ids))
            sub = work.take(local)
            pos = np.searchsorted(active, sub.strata)  # sub.strata ⊆ active, both sorted
            dz = alpha[pos, None] * step[pos]
            zt = res.z[sub.strata] + dz
            upred = res.u[sub.groups] + np.einsum("gkd,gd->gk", res.du[sub.groups], dz[sub.group_stratum])
            evt = evaluate(sub, kern, zt[:, :nt], zt[:, nt:], upred, rx=rx)
            res.evaluations[sub.strata] += 1
            res.pirls_iterations[sub.strata] += evt.iterations
            f0 = res.f[sub.strata]
            okay = evt.ok & (evt.f <= f0 + ARMIJO * alpha[pos] * slope[pos] + 1e-10 * (1.0 + np.abs(f0)))
            acc = np.flatnonzero(okay)
            if acc.size:
                _store(res, sub.strata[acc], sub, evt, acc, zt[acc])
                res.iterations[sub.strata[acc]] += 1
                for s, fv in zip(sub.strata[acc], evt.f[acc]):
                    res.log[s].append(float(fv))
            rej = np.flatnonzero(~okay)
            if rej.size == 0:
                break
            # quadratic interpolation of the step, kept within [0.1, 0.5] of the last one
            pr = pos[rej]
            df = np.where(np.isfinite(evt.f[rej]), evt.f[rej] - f0[rej] - alpha[pr] * slope[pr], np.inf)
            with np.errstate(divide="ignore", invalid="ignore"):
                aq = -slope[pr] * alpha[pr] ** 2 / (2.0 * df)
            aq = np.where(np.isfinite(aq), aq, 0.1 * alpha[pr])
            alpha[pr] = np.clip(aq, 0.1 * alpha[pr], 0.5 * alpha[pr])
            todo = pr
        else:
            res.status[active[todo]] = 2
    return res


def glm_start(st: Stack, kern: RowKernel, *, maxit: int = 25, tol: float = 1e-10) -> np.ndarray:
    """GLM (no random effects) estimates of β for every stratum, batched IRLS.

    Starts like :func:`fitting.glm.fit_glm` from the family's starting mean (from
    ``β = 0`` where the kernel says that is safe: ``kern.zero_start``), then
    Fisher-scoring steps with per-stratum step-halving on the deviance, until the
    relative change of the deviance is below ``tol`` (or ``maxit``). A stratum whose
    IRLS fails keeps its last finite iterate (the outer optimiser then decides).
    """
    fam = kern.family
    S, p = st.S, st.p
    X = st.X
    if kern.zero_start:  # Newton from β = 0 is safe (logistic deviance)
        beta = np.zeros((S, p))
    else:
        mu0 = fam.starting_mu(st.y, st.w)
        eta0 = fam.link.link(mu0)
        dmu0 = fam.link.mu_eta(eta0)
        W0 = st.w * dmu0 * dmu0 / fam.variance(mu0)
        zw = W0 * (eta0 - st.off + (st.y - mu0) / dmu0)
        rhs = strata_sums(st, zw * X)
        beta = solve_stack(_xtwx(st, W0), rhs)
        beta = np.where(np.isfinite(beta), beta, 0.0)

    def dev_at(b):
        eta = st.off.copy()
        for j in range(p):
            eta += X[j] * st.strata_to_rows(b[:, j])
        W, sc, dev, _ = kern.basic(eta, st.y, st.w_arg, st.c_arg)
        return W, sc, st.by_stratum(dev)

    W, sc, dev = dev_at(beta)
    active = np.isfinite(dev)
    for _ in range(maxit):
        if not active.any():
            break
        rhs = strata_sums(st, sc * X)
        step = solve_stack(_xtwx(st, W), rhs)
        step[~active] = 0.0
        t = np.ones(S)
        for _h in range(40):
            bn = beta + t[:, None] * step
            Wn, scn, devn = dev_at(bn)
            bad = active & ~(devn <= dev * (1 + 1e-12) + 1e-12)
            if not bad.any():
                break
            t[bad] *= 0.5
        else:
            t[bad] = 0.0
            active &= ~bad
            bn = beta + t[:, None] * step
            Wn, scn, devn = dev_at(bn)
        change = np.abs(devn - dev) / (np.abs(devn) + 0.1)
        beta, W, sc, dev = bn, Wn, scn, devn
        active &= ~(change < tol)
    return beta


def moment_theta(st: Stack, kern: RowKernel, beta: np.ndarray, default: float) -> np.ndarray:
    """Start θ of a scalar random-effect term (k = 1) for every stratum, by moments.

    At ``η = Xβ + offset`` (the GLM start) the working residuals ``r = (y - μ)/μ'`` with
    Fisher weights ``W`` give per group ``b̂_g = Σ W z r / Σ W z² = Σ s z / Σ W z²``
    (``s`` the score) with sampling variance ``1 / Σ W z²``; the mean over a stratum's
    groups of ``b̂_g² - 1/Σ W z²`` estimates the variance of its random effect (biased
    low by the GLM's attenuation, as a start may be). Its square root, within
    [0.1, 10], is the start (0.1 when there is no evidence of a group effect: off the
    symmetric stationary point θ = 0); ``default`` where it cannot be formed (fewer than
    two groups with weight, non-finite values). :func:`fitting.glmm_fit.moment_theta_start`
    is the same estimate for the BFGS path. On the service's benchmark strata (binomial,
    40 groups of 25-75 rows) it saves one Newton evaluation in five or six.

    Returns
    -------
    ndarray (S,)
    """
    eta = st.off.copy()
    for j in range(st.p):
        eta += st.X[j] * st.strata_to_rows(beta[:, j])
    with np.errstate(all="ignore"):
        W, sc, _, _ = kern.basic(eta, st.y, st.w_arg, st.c_arg, deviance=False)
        z = st.Z[0]
        den = st.by_group(W * z * z)
        num = st.by_group(sc * z)
        ok = np.isfinite(den) & np.isfinite(num) & (den > 0)
        safe = np.where(ok, den, 1.0)
        b2 = np.where(ok, (num / safe) ** 2 - 1.0 / safe, 0.0)
        cnt = st.groups_by_stratum(ok.astype(float))
        var = st.groups_by_stratum(b2) / np.maximum(cnt, 1.0)
        theta = moment_sd(var)
    return np.where((cnt >= 2) & np.isfinite(theta), theta, default)


def moment_theta_vector(st: Stack, kern: RowKernel, beta: np.ndarray, default: np.ndarray) -> np.ndarray:
    """Start θ of a vector-valued term (``k > 1``) for every stratum, by moments.

    :func:`fitting.fitcommon.moment_cov_theta` at ``η = Xβ + offset`` (the GLM start):
    the matrix version of :func:`moment_theta`. On Contraception ``(urban | district)``
    it starts at θ = (0.62, -0.77, 0.46) for an optimum of (0.62, -0.58, 0.45), and the
    Newton fit takes 5 evaluations instead of 7 from ``0.5 I``.

    Returns
    -------
    ndarray (S, nt)
    """
    k = st.k
    eta = st.off.copy()
    for j in range(st.p):
        eta += st.X[j] * st.strata_to_rows(beta[:, j])
    with np.errstate(all="ignore"):
        W, sc, _, _ = kern.basic(eta, st.y, st.w_arg, st.c_arg, deviance=False)
        Z = st.Z
        G = np.empty((st.G, k, k))
        for a in range(k):
            WZa = W * Z[a]
            for b in range(a + 1):
                G[:, a, b] = G[:, b, a] = st.by_group(WZa * Z[b])
        s = np.stack([st.by_group(sc * Z[a]) for a in range(k)], axis=1)
    strata = np.repeat(np.arange(st.S), st.group_count)
    return moment_cov_theta(G, s, strata, st.S, default)


def _xtwx(st: Stack, W: np.ndarray) -> np.ndarray:
    """``X'WX`` per stratum (S, p, p)."""
    return strata_gram(st, W * st.X, st.X)

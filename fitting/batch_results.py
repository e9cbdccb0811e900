"""From a batched optimum to one :class:`~fitting.result.FitResult` per stratum.

:func:`finish_chunk` does, for all strata of a chunk at once, what
:func:`fitting.glmm_fit.fit_glmm` does for one fit after its optimiser: make θ
canonical (non-negative diagonal of ``Λ``, modes flipped with it), set a near-zero
diagonal to zero when that does not raise the deviance by more than ``1e-7`` (the
same rule and threshold), compute the vcov from the Hessian of the Laplace deviance
over (θ, β) (lme4's default; from ``RX`` with ``se="rx"``) and lme4's convergence
checks. Strata that :mod:`fitting.glmm_fit` would treat through one of its special
paths (Hessian not positive definite, optimiser stopped abnormally, PIRLS failure,
or a nearly flat deviance, as under separation) are returned as *to refit*, so that
the caller hands them to :func:`fitting.fit_design` and the answer is exactly ``fit``'s. :func:`chunk_tables` builds the result tables of all strata at once and
:func:`build_result` packages one stratum.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import inference
from .batch_laplace import evaluate, lambdas
from .batch_newton import NewtonResult
from .batch_stack import Stack, tril_layout
from .fitcommon import vcov_frame
from .glmm_checks import glmm_diagnostics
from .result import Diagnostics, FitResult, OptInfo

__all__ = ["Finished", "finish_chunk", "ChunkTables", "chunk_tables", "build_result", "newton_decrement", "theta_names", "SNAP", "SNAP_TOL", "FLAT_EIGEN"]

#: |θ_diag| below this is tried at 0 (:mod:`fitting.glmm_fit`'s ``_SNAP``) ...
SNAP = 1e-3
#: ... and kept there when the deviance rises by at most this
SNAP_TOL = 1e-7
#: a Hessian eigenvalue below this (deviance units) means a nearly flat direction, as under
#: (quasi-)separation, where the optimum is not identified: such strata are refitted by ``fit``
FLAT_EIGEN = 1e-5


def theta_names(group: str, term_names) -> tuple:
    """lme4 names of θ for one term: ``g.(Intercept)``, ``g.x.(Intercept)`` (column-major)."""
    rows, cols = tril_layout(len(term_names))
    return tuple(f"{group}.{term_names[r]}" if r == c else f"{group}.{term_names[r]}.{term_names[c]}"
                 for r, c in zip(rows, cols))


@dataclass
class Finished:
    """Final per-stratum quantities of a chunk (arrays over the chunk's strata).

    Attributes
    ----------
    z, f, g, H : optimum, deviance, gradient and Hessian over (θ, β)
    u, Ainv : modes and ``A_g⁻¹`` per group
    V : ndarray (S, p, p)
        vcov of β.
    hessian_pd : ndarray of bool or None (``se="rx"``)
    grad_ok, maxmin : lme4's scaled-gradient check
    singular : ndarray of bool
    refit : ndarray of bool
        Strata to hand to :func:`fitting.fit_design` instead.
    reason : list of str
        Why a stratum is refitted ("" otherwise).
    extra_evaluations : ndarray of int
        Evaluations spent here (snapping).
    group_first : ndarray of int
        First group of each stratum in ``u``/``Ainv`` (the stack's ``group_first``).
    """

    z: np.ndarray
    f: np.ndarray
    g: np.ndarray
    H: np.ndarray
    u: np.ndarray
    Ainv: np.ndarray
    V: np.ndarray
    hessian_pd: np.ndarray | None
    grad_ok: np.ndarray
    maxmin: np.ndarray
    singular: np.ndarray
    refit: np.ndarray
    reason: list
    extra_evaluations: np.ndarray
    group_first: np.ndarray


def _canonical(st: Stack, res: NewtonResult, nt: int):
    """Flip columns of Λ with a negative diagonal (θ, u, g, H change sign accordingly)."""
    k = st.k
    rows, cols = tril_layout(k)
    diag_pos = np.array([np.flatnonzero((rows == c) & (cols == c))[0] for c in range(k)])
    sign_col = np.where(res.z[:, diag_pos] < 0, -1.0, 1.0)  # (S, k)
    sgn = np.concatenate([sign_col[:, cols], np.ones((st.S, res.z.shape[1] - nt))], axis=1)
    res.z *= sgn
    res.g *= sgn
    res.H *= sgn[:, :, None] * sgn[:, None, :]
    res.u *= sign_col[st.group_stratum]


def finish_chunk(st: Stack, kern, res: NewtonResult, *, se: str = "hessian",
                 singular_tol: float = 1e-4) -> Finished:
    """Canonical θ, snapping, vcov and convergence checks for every stratum of a chunk.

    Parameters
    ----------
    st : Stack
        The chunk's root stack.
    kern : RowKernel
    res : NewtonResult
        From :func:`fitting.batch_newton.newton` (modified in place).
    se : {"hessian", "rx"}
    singular_tol : float
        ``control["check_singular_tol"]``.
    """
    k, p = st.k, st.p
    nt = k * (k + 1) // 2
    rows, cols = tril_layout(k)
    diag = rows == cols
    S = st.S
    _canonical(st, res, nt)
    extra = np.zeros(S, dtype=np.int64)
    # ---- near-zero diagonal → 0 when the deviance does not rise (fit_glmm's rule)
    th = res.z[:, :nt]
    small = diag[None, :] & (np.abs(th) < SNAP) & (th != 0) & (res.status == 0)[:, None]
    cand_s = np.flatnonzero(small.any(axis=1))
    if cand_s.size:
        sub = st.take(cand_s)
        zc = res.z[cand_s].copy()
        for r in range(nt):
            if diag[r]:
                zero_col = small[cand_s, r]
                zc[np.ix_(zero_col, np.flatnonzero(cols == cols[r]))] = 0.0
        ev = evaluate(sub, kern, zc[:, :nt], zc[:, nt:], res.u[sub.groups], rx=res.info_rx is not None)
        extra[cand_s] += 1
        acc = ev.ok & (ev.f <= res.f[cand_s] + SNAP_TOL)
        for i in np.flatnonzero(acc):
            s = cand_s[i]
            gm = sub.group_stratum == i
            res.z[s], res.f[s], res.g[s], res.H[s] = zc[i], ev.f[i], ev.g[i], ev.H[i]
            res.u[sub.groups[gm]] = ev.u[gm]
            res.Ainv[sub.groups[gm]] = ev.Ainv[gm]
            if res.info_rx is not None:
                res.info_rx[s] = ev.info_rx[i]
    th = res.z[:, :nt]
    singular = np.any(np.abs(th[:, diag]) < singular_tol, axis=1)
    # ---- vcov and checks, batched
    H = res.H
    finite = np.all(np.isfinite(H), axis=(1, 2)) & np.all(np.isfinite(res.g), axis=1) & np.isfinite(res.f)
    Hs = np.where(finite[:, None, None], H, np.eye(H.shape[1]))
    w = np.linalg.eigvalsh(Hs)
    hpd = finite & (w.min(axis=1) > 0)
    Hpd = np.where(hpd[:, None, None], Hs, np.eye(H.shape[1]))
    L = np.linalg.cholesky(Hpd)
    sc = np.abs(np.linalg.solve(L, res.g[:, :, None])[:, :, 0])
    gabs = np.abs(res.g)
    use_h = hpd if se == "hessian" else np.zeros(S, dtype=bool)  # fit: no Hessian with se="rx"
    maxmin = np.where(use_h, np.minimum(gabs, sc).max(axis=1), gabs.max(axis=1))
    grad_ok = maxmin < 2e-3
    if se == "hessian":
        V = (2.0 * np.linalg.inv(Hpd))[:, nt:, nt:]
        hessian_pd = hpd
    else:
        info = res.info_rx
        good = np.all(np.isfinite(info), axis=(1, 2))
        info = np.where(good[:, None, None], info, np.eye(p))
        V = np.linalg.inv(info)
        hessian_pd = None
        finite &= good
    V = 0.5 * (V + np.swapaxes(V, 1, 2))
    refit = np.zeros(S, dtype=bool)
    reason = [""] * S
    for s in range(S):
        why = ""
        if res.status[s] == 1:
            why = "batched Newton reached its iteration limit"
        elif res.status[s] != 0:
            why = "batched Newton failed (non-finite deviance or no descent)"
        elif not finite[s]:
            why = "non-finite deviance, gradient or Hessian at the optimum"
        elif se == "hessian" and not hpd[s]:
            why = "Hessian not positive definite at the optimum"
        elif w[s].min() < FLAT_EIGEN:
            why = "nearly flat deviance (separation?): Hessian eigenvalue below 1e-5"
        elif not grad_ok[s]:
            why = "scaled gradient above lme4's tolerance"
        if why:
            refit[s] = True
            reason[s] = why
    return Finished(z=res.z, f=res.f, g=res.g, H=H, u=res.u, Ainv=res.Ainv, V=V, hessian_pd=hessian_pd,
                    grad_ok=grad_ok, maxmin=maxmin, singular=singular, refit=refit, reason=reason,
                    extra_evaluations=extra, group_first=st.group_first)


def newton_decrement(g: np.ndarray, H: np.ndarray) -> float:
    """``λ² = g'H⁻¹g`` at the returned point (NaN when ``H`` is singular or not finite).

    With ``H`` the deviance's Hessian, the remaining Newton step moves estimate ``j`` by at
    most ``λ SE_j/√2`` (see :data:`fitting.batch_newton.LAMBDA2_TOL`).
    """
    try:
        with np.errstate(all="ignore"):
            value = float(g @ np.linalg.solve(H, g))
    except (np.linalg.LinAlgError, ValueError):
        return float("nan")
    return value if np.isfinite(value) else float("nan")


@dataclass(frozen=True)
class ChunkTables:
    """``fixed``, ``varcorr`` and ``ranef`` tables of many strata, built at once.

    pandas builds one frame of 8,000 rows about as fast as one of 40 (~0.5 ms for the
    5 columns of ``ranef``), so the tables of a chunk are built whole and every stratum
    gets its rows (``frame.iloc[a:b]`` with a fresh ``RangeIndex``): the same frames as
    :func:`fitting.inference.wald_table`, :func:`~fitting.inference.varcorr_table` and
    :func:`~fitting.inference.ranef_table` give, at a fraction of the cost.
    """

    fixed: pd.DataFrame
    varcorr: pd.DataFrame
    ranef: pd.DataFrame
    bounds: dict  # stratum -> ((a, b) fixed, (a, b) varcorr, (a, b) ranef)

    def for_stratum(self, s: int):
        out = []
        for frame, (a, b) in zip((self.fixed, self.varcorr, self.ranef), self.bounds[s]):
            if a == 0 and b == len(frame):  # a one-stratum chunk (fitting.fit): the frame itself
                out.append(frame)
                continue
            part = frame.iloc[a:b]  # copy-on-write: later writes to either never show in the other
            part.index = pd.RangeIndex(b - a)
            out.append(part)
        return out



def chunk_tables(designs: list, fin: Finished, st: Stack, strata) -> ChunkTables:
    """Tables of the strata ``strata`` (positions in the chunk) of a finished chunk."""
    terms, est, ses = [], [], []
    vc_rows = []
    r_group, r_level, r_term, r_mode, r_sd = [], [], [], [], []
    bounds = {}
    nf = nv = nr = 0
    for s in strata:
        d = designs[s]
        t = d.re_terms[0]
        k = t.k
        nt = k * (k + 1) // 2
        beta = fin.z[s, nt:]
        terms.extend(d.x_names)
        est.append(beta)
        ses.append(np.sqrt(np.diag(fin.V[s])))
        lam = lambdas(fin.z[s:s + 1, :nt], k)[0]
        S_ = lam @ lam.T
        sd = np.sqrt(np.diag(S_))
        for i in range(k):
            vc_rows.append((t.group, t.term_names[i], None, float(S_[i, i]), float(sd[i]), None))
        for i in range(k):
            for j in range(i + 1, k):
                corr = float(S_[i, j] / (sd[i] * sd[j])) if sd[i] > 0 and sd[j] > 0 else float("nan")
                vc_rows.append((t.group, t.term_names[i], t.term_names[j], float(S_[i, j]), None, corr))
        gsl = slice(int(st.group_first[s]), int(st.group_first[s] + st.group_count[s]))
        b = fin.u[gsl] @ lam.T
        cv = np.einsum("ij,gjk,lk->gil", lam, fin.Ainv[gsl], lam)
        csd = np.sqrt(np.maximum(np.diagonal(cv, axis1=1, axis2=2), 0.0))
        m = t.n_levels
        for j in range(k):
            r_group.extend([t.group] * m)
            r_level.extend(t.levels)
            r_term.extend([t.term_names[j]] * m)
            r_mode.append(b[:, j])
            r_sd.append(csd[:, j])
        bounds[s] = ((nf, nf + d.p), (nv, nv + k * (k + 1) // 2), (nr, nr + m * k))
        nf, nv, nr = nf + d.p, nv + k * (k + 1) // 2, nr + m * k
    beta = np.concatenate(est) if est else np.zeros(0)
    se = np.concatenate(ses) if ses else np.zeros(0)
    fixed = inference.wald_table(terms, beta, se)
    varcorr = pd.DataFrame(vc_rows, columns=["group", "term1", "term2", "variance", "sd", "correlation"])
    ranef = pd.DataFrame({"group": r_group, "level": r_level, "term": r_term,
                          "mode": np.concatenate(r_mode) if r_mode else np.zeros(0),
                          "cond_sd": np.concatenate(r_sd) if r_sd else np.zeros(0)})
    return ChunkTables(fixed, varcorr, ranef, bounds)


def build_result(design, fam, formula: str, fin: Finished, res: NewtonResult, s: int, tables: ChunkTables,
                 *, z0: np.ndarray, elapsed: float, ctl: dict, chunk_info: dict, checks: dict | None = None,
                 checks_elapsed: float = 0.0) -> FitResult:
    """The :class:`FitResult` of stratum ``s`` of a finished chunk (same fields as ``fit``).

    ``checks`` holds this stratum's precomputed post-fit checks
    (:func:`fitting.batch_checks.chunk_checks`, keyword arguments of
    :func:`fitting.glmm_checks.glmm_diagnostics`; the checks not given are run here) and
    ``checks_elapsed`` the stratum's share of their time.
    """
    term = design.re_terms[0]
    k, p = term.k, design.p
    nt = k * (k + 1) // 2
    z = fin.z[s].copy()
    theta, beta = z[:nt], z[nt:]
    g = fin.g[s]
    V = fin.V[s]
    dev = float(fin.f[s])
    loglik = -0.5 * dev
    df = p + nt
    aic, bic = -2.0 * loglik + 2.0 * df, -2.0 * loglik + np.log(design.nobs) * df
    hpd = None if fin.hessian_pd is None else bool(fin.hessian_pd[s])
    singular = bool(fin.singular[s])
    warn = list(design.warnings)
    if not fin.grad_ok[s]:
        warn.append(f"Model failed to converge with max|grad| = {fin.maxmin[s]:.6g} (tol = 0.002)")
    if hpd is False and not singular:
        warn.append("Hessian of the Laplace deviance is not positive definite")
    converged = bool(res.status[s] == 0 and fin.grad_ok[s] and (hpd is not False or singular))
    opt = OptInfo(
        "batched-newton", int(res.evaluations[s] + fin.extra_evaluations[s]), float(elapsed),
        tuple(map(float, g)), "converged: Newton decrement below tolerance" if res.status[s] == 0
        else "iteration limit", tuple(map(float, z0)), tuple(map(float, z)), int(res.status[s]),
        extra={"objective": "Laplace", "parameters": "theta, beta", "iterations": int(res.iterations[s]),
               "newton_decrement": newton_decrement(res.g[s], res.H[s]),
               "pirls_iterations": int(res.pirls_iterations[s]), "hessian": "analytic",
               "gtol": float(ctl["gtol"]), "pirls_tol": float(ctl["pirls_tol"]),
               "log": list(res.log[s]), **chunk_info},
    )
    diag = Diagnostics(converged, singular, float(np.abs(g).max()), hpd, tuple(warn))
    t_checks = time.perf_counter()
    gsl = slice(int(fin.group_first[s]), int(fin.group_first[s] + term.n_levels))
    diag = glmm_diagnostics(diag, design, fam, theta, beta, std_error=np.sqrt(np.diag(V)), modes=fin.u[gsl],
                            method="laplace", ctl=ctl, **(checks or {}))
    opt.extra["checks_elapsed"] = checks_elapsed + time.perf_counter() - t_checks
    fixed, varcorr, ranef = tables.for_stratum(s)
    return FitResult(
        formula=formula, family=fam.name, link=fam.link.name, method="laplace", reml=False,
        nobs=design.nobs, ngroups={term.group: term.n_levels}, fixed=fixed, varcorr=varcorr, ranef=ranef,
        loglik=float(loglik), aic=float(aic), bic=float(bic), deviance=dev, theta=theta,
        theta_names=theta_names(term.group, term.term_names), beta=beta,
        vcov=vcov_frame(V, design.x_names), sigma=1.0, optinfo=opt, diagnostics=diag,
    )

"""Likelihood-based inference over ``(theta, beta)``: full covariance, Wald and profile CIs.

* :class:`Deviance` — ``-2 loglik`` of a GLMM as a function of ``x = (theta, beta)``
  (lme4 order of ``theta``), with the conditional modes as explicit warm-start state:
  the Laplace approximation of :func:`fitting.glmm.laplace` (any random-effects
  structure, analytic gradient) or adaptive quadrature (:func:`fitting.agq.agq_loglik`,
  one grouping factor, central-difference gradient). Build it with :func:`deviance_function`.
* :func:`full_vcov` — covariance of ``(theta, beta)``: ``2 H^-1`` with ``H`` the
  finite-difference Hessian of the deviance at the estimates (lme4's
  ``2 * solve(m@optinfo$derivs$Hessian)``), computed in coordinates whitened by a first
  pass so that every step moves the deviance by a comparable amount.
* :func:`wald_confint` — ``estimate +- z se`` for the fixed effects (variance
  components get no Wald interval, as in lme4).
* :func:`profile_confint` — profile-likelihood intervals for fixed effects and
  random-effect standard deviations: for a parameter ``psi`` the signed root deviance
  ``zeta(psi) = sign(psi - psi_hat) sqrt(dev_p(psi) - dev_min)``, with ``dev_p`` the
  deviance minimised over all other parameters, is solved for ``zeta = +-z_{(1+level)/2}``
  by Brent's method (:func:`scipy.optimize.brentq`) after bracketing; each inner
  minimisation is a BFGS run (:func:`fitting.optimize.bfgs`) in coordinates whitened by
  the conditional covariance of the other parameters, warm-started from the nearest
  point already solved.

Random-effect sds are profiled on the sd scale. The sd of column ``r`` of a term is the
norm of row ``r`` of ``Lambda`` (times ``sigma``); it is fixed by writing that row as
``psi * a / ||a||`` with a free direction ``a``, so vector-valued terms are covered too.
Correlations are not profiled. A sd whose profile does not reach ``-z`` above 0 gets a
lower limit of 0 (the boundary of the parameter space).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import optimize, special

from .design import Design
from .errors import FamilyError, FittingError
from .families import Family
from .optimize import bfgs
from .prediction import tril_colmajor, fit_family, resolve_design
from .structure import lme4_order

__all__ = [
    "Deviance",
    "deviance_function",
    "fit_nagq",
    "full_vcov",
    "wald_confint",
    "profile_confint",
    "sd_parameters",
    "SdParameter",
    "PROFILE_COLUMNS",
]

PROFILE_COLUMNS = ["parameter", "estimate", "conf_low", "conf_high", "method"]
_AGQ_FD_STEP = 1e-4  # whitened units (standard errors) for the AGQ gradient


# --------------------------------------------------------------------- deviance
@dataclass(frozen=True, eq=False)
class Deviance:
    """``-2 loglik`` over ``x = (theta, beta)``; holds no mutable state.

    Attributes
    ----------
    ntheta, nagq : int
    family : Family
    model : fitting.glmm.GlmmModel or None
        Laplace objective (``nagq == 1``).
    data : fitting.agq.AGQData or None
        Quadrature data (``nagq > 1``).
    """

    ntheta: int
    nagq: int
    family: Family
    model: object = None
    data: object = None

    @property
    def analytic_gradient(self) -> bool:
        return self.model is not None

    def value(self, x, state=None) -> tuple[float, object]:
        """Deviance at ``x`` and the conditional modes reached (the new state)."""
        x = np.asarray(x, dtype=float)
        th, be = x[:self.ntheta], x[self.ntheta:]
        if self.model is not None:
            from .glmm import laplace

            ev = laplace(self.model, th, be, state, gradient=False)
            return ev.deviance, (ev.pirls.u if ev.pirls is not None else state)
        from .agq import agq_loglik

        try:
            ll, _, u = agq_loglik(self.data, self.family, th, be, self.nagq, u0=state)
        except (FloatingPointError, np.linalg.LinAlgError):
            return np.inf, state
        return (-2.0 * ll if np.isfinite(ll) else np.inf), u

    def value_grad(self, x, state=None, directions=None) -> tuple[float, np.ndarray | None, object]:
        """Deviance, gradient and new state.

        Parameters
        ----------
        directions : ndarray (d, j), optional
            Return the directional derivatives ``directions' grad`` instead of the
            gradient. For quadrature (no analytic gradient) they are central
            differences along these columns (steps of ``1e-4`` column lengths), so pass
            whitened directions.
        """
        x = np.asarray(x, dtype=float)
        if self.model is not None:
            from .glmm import laplace

            ev = laplace(self.model, x[:self.ntheta], x[self.ntheta:], state)
            if ev.gradient is None:
                return np.inf, None, state
            g = ev.gradient if directions is None else directions.T @ ev.gradient
            return ev.deviance, g, ev.pirls.u
        D = np.eye(x.size) if directions is None else directions
        f, u = self.value(x, state)
        if not np.isfinite(f):
            return np.inf, None, state
        h = _AGQ_FD_STEP
        g = np.empty(D.shape[1])
        for j in range(D.shape[1]):
            fp, _ = self.value(x + h * D[:, j], u)
            fm, _ = self.value(x - h * D[:, j], u)
            g[j] = (fp - fm) / (2.0 * h)
        if not np.all(np.isfinite(g)):
            return np.inf, None, state
        return f, g, u


def fit_nagq(fit) -> int:
    """Quadrature nodes behind a fit's log-likelihood (1 = Laplace).

    Raises
    ------
    FittingError
        An adaptive-quadrature fit that does not record its number of nodes.
    """
    method = str(fit.method).lower()
    if method.startswith("laplace"):
        return 1
    if method.startswith("agq"):
        # an AGQ fit records nagq > 1 (nagq = 1 is returned as a Laplace fit), so a
        # FitResult.nagq of 1 here is the field's default, not information
        for value in (getattr(fit, "nagq", None), fit.optinfo.extra.get("nagq")):
            if value is not None and int(value) > 1:
                return int(value)
        raise FittingError("cannot tell the number of quadrature nodes of this fit; pass nagq=")
    raise FittingError(f"method {fit.method!r} has no (theta, beta) deviance to work with")


def deviance_function(fit, design: Design | None = None, nagq: int | None = None) -> Deviance:
    """The deviance the fit maximised, as a :class:`Deviance`.

    Parameters
    ----------
    fit : FitResult
        A binomial or Poisson GLMM.
    design : Design, optional
        Default ``fit.design``.
    nagq : int, optional
        Default: the fit's (1 for Laplace fits).

    Raises
    ------
    FamilyError
        Gaussian fits (their profiled deviance is a different objective).
    FittingError
        No random effects, or ``nagq > 1`` with several grouping factors.
    """
    design = resolve_design(fit, design)
    fam = fit_family(fit)
    if fam.estimates_scale:
        raise FamilyError(
            f"likelihood inference over (theta, beta) is implemented for binomial and poisson GLMMs, "
            f"not the {fam.name!r} family; use wald_confint"
        )
    if not design.re_terms:
        raise FittingError("the fit has no random effects; (theta, beta) inference needs a GLMM")
    nagq = fit_nagq(fit) if nagq is None else int(nagq)
    if nagq < 1:
        raise ValueError(f"nagq must be >= 1, got {nagq}")
    ntheta = len(fit.theta)
    if nagq == 1:
        from .glmm import GlmmModel
        from .response import make_response
        from .structure import build_structure

        struct = build_structure(design.re_terms, design.nobs)
        model = GlmmModel(struct, design.X, make_response(design.y, design.weights, design.offset,
                                                          fam, fused=struct.K > 1))
        return Deviance(ntheta, 1, fam, model=model)
    from .agq import prepare_agq

    return Deviance(ntheta, nagq, fam, data=prepare_agq(design))


def _x_hat(fit) -> np.ndarray:
    return np.concatenate([np.asarray(fit.theta, dtype=float), np.asarray(fit.beta, dtype=float)])


def _names(fit) -> list[str]:
    return list(fit.theta_names) + list(fit.vcov.columns)


# ------------------------------------------------------------------ full vcov
def _hessian(dev: Deviance, x, C, state, h) -> np.ndarray:
    """Central-difference Hessian of the deviance at ``x`` along the columns of ``C``.

    Returns the Hessian in the coordinates ``delta`` of ``x + C delta``.
    """
    d = x.size
    if dev.analytic_gradient:
        G = np.empty((d, d))
        for j in range(d):
            _, gp, _ = dev.value_grad(x + h * C[:, j], state, C)
            _, gm, _ = dev.value_grad(x - h * C[:, j], state, C)
            if gp is None or gm is None:
                return np.full((d, d), np.nan)
            G[:, j] = (gp - gm) / (2.0 * h)
        return 0.5 * (G + G.T)
    f0, _ = dev.value(x, state)
    Hd = np.empty((d, d))
    fp, fm = np.empty(d), np.empty(d)
    for i in range(d):
        fp[i], _ = dev.value(x + h * C[:, i], state)
        fm[i], _ = dev.value(x - h * C[:, i], state)
        Hd[i, i] = (fp[i] - 2.0 * f0 + fm[i]) / (h * h)
    for i in range(d):
        for j in range(i):
            ci, cj = h * C[:, i], h * C[:, j]
            v = (dev.value(x + ci + cj, state)[0] - dev.value(x + ci - cj, state)[0]
                 - dev.value(x - ci + cj, state)[0] + dev.value(x - ci - cj, state)[0]) / (4 * h * h)
            Hd[i, j] = Hd[j, i] = v
    return Hd


def _first_scaling(fit) -> np.ndarray:
    """Block-diagonal scaling: 0.1 per theta, Cholesky factor of fit.vcov for beta."""
    nt = len(fit.theta)
    Vb = fit.vcov.to_numpy(dtype=float)
    C = np.zeros((nt + Vb.shape[0],) * 2)
    C[:nt, :nt] = 0.1 * np.eye(nt)
    try:
        C[nt:, nt:] = np.linalg.cholesky(Vb)
    except np.linalg.LinAlgError:
        C[nt:, nt:] = np.diag(np.sqrt(np.maximum(np.diag(Vb), 1e-12)))
    return C


def _vcov_from(Hd, C):
    try:
        L = np.linalg.cholesky(Hd)
    except np.linalg.LinAlgError:
        return None
    Li = np.linalg.inv(L)
    V = C @ (2.0 * Li.T @ Li) @ C.T
    return 0.5 * (V + V.T)


def _full_vcov_array(fit, dev: Deviance, x=None, state=None):
    x = _x_hat(fit) if x is None else x
    _, state = dev.value(x, state)
    h = 1e-3 if dev.analytic_gradient else 5e-3
    C = _first_scaling(fit)
    V = _vcov_from(_hessian(dev, x, C, state, h), C)
    if V is None:
        return None
    C2 = np.linalg.cholesky(V)
    return _vcov_from(_hessian(dev, x, C2, state, h), C2)


def full_vcov(fit, *, design: Design | None = None, nagq: int | None = None) -> pd.DataFrame:
    """Covariance matrix of ``(theta, beta)`` from the Hessian of the deviance.

    ``V = 2 H^-1`` with ``H`` the central-difference Hessian of ``-2 loglik`` at the
    fit's estimates (Laplace, or the fit's quadrature), computed twice: first with
    ``fit.vcov`` scaling ``beta``, then along the Cholesky factor of the first result
    (steps of 1e-3 standard errors). Equals lme4's ``2 * solve(m@optinfo$derivs$Hessian)``
    up to finite-difference error; its ``beta`` block is ``fit.vcov`` (Hessian-based SEs).

    A fit that carries ``vcov_full`` (the ``2 H^-1`` its own Hessian gave, see
    :class:`~fitting.result.FitResult`) returns a copy of it when ``nagq`` is the fit's.

    Parameters
    ----------
    fit : FitResult
        Binomial/Poisson GLMM.
    design : Design, optional
        Default ``fit.design``.
    nagq : int, optional
        Default the fit's.

    Returns
    -------
    pandas.DataFrame
        Square, indexed and labelled by ``theta_names`` then the fixed-effect names.

    Raises
    ------
    FittingError
        The Hessian is not positive definite (e.g. a singular fit with ``theta = 0``).
    """
    stored = getattr(fit, "vcov_full", None)
    if stored is not None and (nagq is None or int(nagq) == fit_nagq(fit)):
        if list(stored.columns) == _names(fit):
            return stored.copy()
    dev = deviance_function(fit, design, nagq)
    V = _full_vcov_array(fit, dev)
    if V is None:
        raise FittingError("the Hessian of the deviance over (theta, beta) is not positive definite "
                           "(singular fit or not at an optimum); no covariance of theta available")
    names = _names(fit)
    return pd.DataFrame(V, index=names, columns=names)


# ---------------------------------------------------------------- sd parameters
@dataclass(frozen=True)
class SdParameter:
    """Standard deviation of one random-effects column.

    Attributes
    ----------
    name : str
        ``"sd_<term>|<group>"``.
    group, term : str
    rows : tuple of int
        Positions in ``theta`` of row ``r`` of the term's ``Lambda`` (columns 0..r).
    scale : float
        ``sigma`` (1 for GLMMs).
    """

    name: str
    group: str
    term: str
    rows: tuple
    scale: float = 1.0

    def value(self, x) -> float:
        return self.scale * float(np.linalg.norm(np.asarray(x)[list(self.rows)]))


def sd_parameters(design: Design, scale: float = 1.0) -> list[SdParameter]:
    """The sd of every random-effects column, in lme4's ``theta`` order of terms."""
    out, off = [], 0
    for fi in lme4_order(design.re_terms):
        t = design.re_terms[fi]
        rows, cols = tril_colmajor(t.k)
        for r in range(t.k):
            pos = tuple(off + int(i) for i in np.flatnonzero(rows == r))
            out.append(SdParameter(f"sd_{t.term_names[r]}|{t.group}", t.group, t.term_names[r], pos, scale))
        off += t.k * (t.k + 1) // 2
    return out


# ------------------------------------------------------------------------ Wald
def _z(level) -> float:
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return float(special.ndtri(0.5 * (1.0 + level)))


def wald_confint(fit, level: float = 0.95, parm=None) -> pd.DataFrame:
    """Wald intervals ``estimate +- z se`` (fast default of :func:`profile_confint`).

    Fixed effects use ``fit.fixed``'s standard errors; random-effect sds (``sd_...``
    rows, from ``fit.varcorr``) and the residual sd get their estimate with NaN limits,
    like lme4's ``confint(method = "Wald")``.

    Parameters
    ----------
    fit : FitResult
    level : float
    parm : None, str or list of str
        Parameter names, or ``"beta_"`` (fixed effects) / ``"theta_"`` (sds).

    Returns
    -------
    pandas.DataFrame
        Columns ``parameter, estimate, conf_low, conf_high, method`` (``"wald"``).
    """
    z = _z(level)
    vc = fit.varcorr
    var_rows = vc[vc["term2"].isna() & (vc["group"] != "Residual")]
    rows = [(f"sd_{r.term1}|{r.group}", float(r.sd), np.nan, np.nan) for r in var_rows.itertuples()]
    if fit.family == "gaussian":
        rows.append(("sigma", float(fit.sigma), np.nan, np.nan))
    est = fit.fixed["estimate"].to_numpy(float)
    se = fit.fixed["std_error"].to_numpy(float)
    rows += [(n, e, e - z * s, e + z * s) for n, e, s in zip(fit.fixed["term"], est, se)]
    out = pd.DataFrame(rows, columns=PROFILE_COLUMNS[:4])
    out["method"] = "wald"
    return out[_select(out["parameter"].tolist(), parm, list(fit.fixed["term"]))].reset_index(drop=True)


def _select(names, parm, fixed_names) -> np.ndarray:
    if parm is None:
        return np.ones(len(names), dtype=bool)
    wanted = [parm] if isinstance(parm, str) else list(parm)
    keep = set()
    for p in wanted:
        if p == "beta_":
            keep.update(fixed_names)
        elif p == "theta_":
            keep.update(n for n in names if n.startswith("sd_") or n == "sigma")
        elif p in names:
            keep.add(p)
        else:
            raise ValueError(f"unknown parameter {p!r}; available: {', '.join(names)} (or 'beta_', 'theta_')")
    return np.array([n in keep for n in names])


# --------------------------------------------------------------------- profile
@dataclass(frozen=True, eq=False)
class _Constraint:
    """``x = embed(psi, phi)``: the parameter ``psi`` fixed, ``phi`` free.

    ``fixed`` are the positions of ``x`` set from ``psi``: one (a fixed effect, or the
    first row of a term) is ``psi / scale``; several (row ``r > 0``) are
    ``psi / scale * a / ||a||`` with the direction ``a`` the last entries of ``phi``.
    """

    d: int
    fixed: tuple
    scale: float

    @property
    def others(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.d), self.fixed)

    @property
    def n_dir(self) -> int:
        return len(self.fixed) if len(self.fixed) > 1 else 0

    def embed(self, psi, phi) -> np.ndarray:
        x = np.empty(self.d)
        no = self.d - len(self.fixed)
        x[self.others] = phi[:no]
        if self.n_dir:
            a = phi[no:]
            x[list(self.fixed)] = psi / self.scale * a / np.linalg.norm(a)
        else:
            x[self.fixed[0]] = psi / self.scale
        return x

    def jacobian(self, psi, phi) -> np.ndarray:
        """``dx / dphi`` (d, n_phi)."""
        no = self.d - len(self.fixed)
        J = np.zeros((self.d, phi.size))
        J[self.others, np.arange(no)] = 1.0
        if self.n_dir:
            a = phi[no:]
            na = np.linalg.norm(a)
            J[np.ix_(list(self.fixed), np.arange(no, phi.size))] = \
                psi / self.scale * (np.eye(a.size) / na - np.outer(a, a) / na ** 3)
        return J

    def split(self, x) -> tuple[float, np.ndarray]:
        """``(psi, phi)`` of a full parameter vector (direction normalised)."""
        x = np.asarray(x, dtype=float)
        sub = x[list(self.fixed)]
        psi = float(np.linalg.norm(sub)) * self.scale if self.n_dir else float(sub[0]) * self.scale
        phi = x[self.others]
        if self.n_dir:
            n = np.linalg.norm(sub)
            a = sub / n if n > 0 else np.eye(sub.size)[-1]
            phi = np.concatenate([phi, a])
        return psi, phi


@dataclass(frozen=True, eq=False)
class _ProfileObjective:
    """``delta -> dev(embed(psi, phi0 + C delta))`` with its gradient (explicit state)."""

    dev: Deviance
    con: _Constraint
    psi: float
    phi0: np.ndarray
    C: np.ndarray

    def __call__(self, delta, state):
        phi = self.phi0 + self.C @ delta
        x = self.con.embed(self.psi, phi)
        JC = self.con.jacobian(self.psi, phi) @ self.C
        f, g, st = self.dev.value_grad(x, state, JC)
        if g is None or not np.isfinite(f):
            return np.inf, None, state
        return f, g, st


def _psi_and_cov(con: _Constraint, x, V):
    """Estimate of psi, its variance and covariance with phi (delta method), from V."""
    psi, phi = con.split(x)
    grad = np.zeros(con.d)
    sub = np.asarray(x)[list(con.fixed)]
    if con.n_dir:
        n = np.linalg.norm(sub)
        grad[list(con.fixed)] = con.scale * (sub / n if n > 0 else 0.0)
    else:
        grad[con.fixed[0]] = con.scale
    var = float(grad @ V @ grad)
    cov_x = V @ grad  # cov(x, psi)
    return psi, phi, var, cov_x


def _whitening(con: _Constraint, x, V, psi_var, cov_x) -> tuple[np.ndarray, np.ndarray]:
    """Whitening of phi given psi and the regression slope d phi / d psi."""
    o = con.others
    no = o.size
    nphi = no + con.n_dir
    cov_o = cov_x[o]
    slope = np.zeros(nphi)
    Vc = np.zeros((nphi, nphi))
    if psi_var > 0:
        slope[:no] = cov_o / psi_var
        Vc[:no, :no] = V[np.ix_(o, o)] - np.outer(cov_o, cov_o) / psi_var
    else:
        Vc[:no, :no] = V[np.ix_(o, o)]
    if con.n_dir:
        sub = np.asarray(x)[list(con.fixed)]
        n = max(float(np.linalg.norm(sub)), 1e-3)
        sd_dir = np.sqrt(np.maximum(np.diag(V)[list(con.fixed)], 1e-8)) / n
        Vc[no:, no:] = np.diag(sd_dir ** 2)
    Vc = 0.5 * (Vc + Vc.T)
    w, Q = np.linalg.eigh(Vc)
    floor = 1e-10 * max(float(w.max()), 1e-12)
    C = Q * np.sqrt(np.maximum(w, floor))
    return C, slope


@dataclass
class _Trace:
    """Solved points of one parameter's profile (local to one profile computation)."""

    psi: list
    phi: list
    state: list
    dev: list

    def nearest(self, psi):
        i = int(np.argmin(np.abs(np.asarray(self.psi) - psi)))
        return self.psi[i], self.phi[i], self.state[i]


def _profile_point(dev, con, psi, trace: _Trace, C, slope, gtol):
    """Minimise the deviance over phi at fixed psi; records the solution in ``trace``."""
    p0, phi_near, st = trace.nearest(psi)
    phi0 = phi_near + slope * (psi - p0)
    if con.n_dir:
        no = phi0.size - con.n_dir
        phi0[no:] = phi_near[no:]
    obj = _ProfileObjective(dev, con, psi, phi0, C)
    out = bfgs(obj, np.zeros(C.shape[1]), state=st, gtol=gtol, maxiter=500)
    if not np.isfinite(out.fun):  # warm start failed: start from the estimate's phi
        obj = _ProfileObjective(dev, con, psi, trace.phi[0] + slope * (psi - trace.psi[0]), C)
        out = bfgs(obj, np.zeros(C.shape[1]), state=trace.state[0], gtol=gtol, maxiter=500)
    phi = obj.phi0 + C @ out.x
    trace.psi.append(psi)
    trace.phi.append(phi)
    trace.state.append(out.state)
    trace.dev.append(out.fun)
    return out.fun


def _end(zeta, psi_hat, step, target, lower_bound, max_steps=40):
    """Limit where ``zeta`` crosses ``target`` (sign gives the side), or a bound/NaN."""
    side = 1.0 if target > 0 else -1.0
    a, za = psi_hat, 0.0
    b = psi_hat + side * step
    for _ in range(max_steps):
        if lower_bound is not None and b <= lower_bound:
            b = lower_bound
            zb = zeta(b)
            if not np.isfinite(zb):
                return np.nan
            if side * zb < side * target:
                return lower_bound
            break
        zb = zeta(b)
        if not np.isfinite(zb):
            return np.nan
        if side * zb >= side * target:
            break
        # secant extrapolation of the (near-linear) signed root deviance, at least x1.5
        slope = (zb - za) / (b - a) if b != a else 0.0
        grow = (target - zb) / slope if slope * side > 0 else 2.0 * (b - a)
        a, za = b, zb
        b = b + side * max(abs(grow) * 1.2, 0.5 * abs(b - psi_hat), 1e-8)
    else:
        return side * np.inf
    lo, hi = (a, b) if a < b else (b, a)
    return optimize.brentq(lambda p: zeta(p) - target, lo, hi, xtol=1e-10, rtol=1e-10, maxiter=200)


def profile_confint(fit, parm=None, level: float = 0.95, *, design: Design | None = None,
                    nagq: int | None = None, gtol: float = 1e-6) -> pd.DataFrame:
    """Profile-likelihood confidence intervals of fixed effects and random-effect sds.

    For each parameter ``psi``, ``dev_p(psi)`` is the deviance minimised over all other
    parameters, and the limits solve
    ``sign(psi - psi_hat) sqrt(dev_p(psi) - dev_min) = +-z_{(1+level)/2}``, i.e.
    ``dev_p - dev_min = chi2_1(level)`` (lme4's ``confint(m, method = "profile")``,
    without its spline interpolation). ``dev_min`` and the centre come from polishing
    the fit's estimates (a warning is issued when that lowers the deviance by more than
    1e-4: the fit had not converged).

    Parameters
    ----------
    fit : FitResult
        Binomial or Poisson GLMM (Laplace: any random-effects structure; quadrature:
        one grouping factor).
    parm : None, str or list of str
        ``sd_<term>|<group>`` and fixed-effect names, or ``"beta_"`` / ``"theta_"``;
        default all (sds first, like lme4).
    level : float
    design : Design, optional
        Default ``fit.design``.
    nagq : int, optional
        Quadrature nodes of the deviance (default the fit's; 1 = Laplace).
    gtol : float
        Gradient tolerance of the inner minimisations (whitened units).

    Returns
    -------
    pandas.DataFrame
        ``parameter, estimate, conf_low, conf_high, method`` (``"profile"``). A sd's
        ``conf_low`` is 0 when the profile stays above ``-z`` down to 0; a limit that
        cannot be bracketed (e.g. under separation) is ``+-inf``.

    Raises
    ------
    FamilyError
        Gaussian fits.
    FittingError
        Fits without random effects or without a design; quadrature with several
        grouping factors.

    Notes
    -----
    A non-positive-definite Hessian at the estimate (e.g. a singular fit) only affects
    the whitening of the inner problems (a diagonal scaling is used instead). Warm starts
    for Brent's method come from a record of the points solved so far, local to the
    computation of one parameter's interval.
    """
    z = _z(level)
    design = resolve_design(fit, design)
    dev = deviance_function(fit, design, nagq)
    sds = sd_parameters(design)
    fixed_names = list(fit.vcov.columns)
    names = [s.name for s in sds] + fixed_names
    mask = _select(names, parm, fixed_names)
    nt = len(fit.theta)
    d = nt + len(fixed_names)

    x_hat = _x_hat(fit)
    V = _full_vcov_array(fit, dev, x_hat)
    if V is None:
        C0 = _first_scaling(fit)
        V = C0 @ C0.T
    x_hat, dev_min, u_hat = _polish(dev, x_hat, V, gtol)

    rows = []
    for i, name in enumerate(names):
        if not mask[i]:
            continue
        if i < len(sds):
            sd = sds[i]
            con = _Constraint(d, sd.rows, 1.0)
            lower_bound = 0.0
        else:
            con = _Constraint(d, (nt + i - len(sds),), 1.0)
            lower_bound = None
        psi_hat, phi_hat, psi_var, cov_x = _psi_and_cov(con, x_hat, V)
        C, slope = _whitening(con, x_hat, V, psi_var, cov_x)
        trace = _Trace([psi_hat], [phi_hat], [u_hat], [dev_min])

        def zeta(psi, con=con, C=C, slope=slope, trace=trace, psi_hat=psi_hat):
            f = _profile_point(dev, con, psi, trace, C, slope, gtol)
            if not np.isfinite(f):
                return np.nan
            if f < dev_min - 1e-4:
                warnings.warn(f"profiling {name}: found a deviance {dev_min - f:.3g} below the "
                              "fit's minimum; the fit had not converged", stacklevel=3)
            return math.copysign(math.sqrt(max(f - dev_min, 0.0)), psi - psi_hat)

        se = math.sqrt(psi_var) if psi_var > 0 and np.isfinite(psi_var) else 0.5 * max(abs(psi_hat), 0.1)
        step = z * se
        hi = _end(zeta, psi_hat, step, z, None)
        if lower_bound is not None and psi_hat <= 0:
            lo = 0.0
        else:
            lo = _end(zeta, psi_hat, step, -z, lower_bound)
        rows.append((name, psi_hat, lo, hi))
    out = pd.DataFrame(rows, columns=PROFILE_COLUMNS[:4])
    out["method"] = "profile"
    return out


@dataclass(frozen=True, eq=False)
class _Shifted:
    """``delta -> dev(x0 + C delta)`` with the gradient in ``delta`` (explicit state)."""

    dev: Deviance
    x0: np.ndarray
    C: np.ndarray

    def __call__(self, delta, state):
        f, g, st = self.dev.value_grad(self.x0 + self.C @ delta, state, self.C)
        return (np.inf, None, state) if g is None or not np.isfinite(f) else (f, g, st)


def _polish(dev: Deviance, x_hat, V, gtol):
    """Re-minimise the full deviance from the fit's estimates (whitened BFGS).

    Returns the minimiser, the minimum and the conditional modes there. Sign flips of
    ``Lambda`` columns cannot occur from a fit with a positive diagonal except through
    0, where the sds (row norms) are unaffected.
    """
    w, Q = np.linalg.eigh(0.5 * (V + V.T))
    C = Q * np.sqrt(np.maximum(w, 1e-10 * max(w.max(), 1e-12)))
    f0, st = dev.value(x_hat)
    out = bfgs(_Shifted(dev, x_hat, C), np.zeros(x_hat.size), state=st, gtol=gtol, maxiter=500)
    if not np.isfinite(out.fun) or out.fun >= f0:
        return x_hat, f0, st
    if f0 - out.fun > 1e-4:
        warnings.warn(f"profile: the deviance at the fit's estimates is {f0 - out.fun:.3g} above a "
                      "nearby minimum; using the latter", stacklevel=3)
    return x_hat + C @ out.x, out.fun, out.state

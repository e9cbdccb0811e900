"""Post-fit checks of binomial/Poisson GLMMs: Laplace adequacy, separation, degenerate groups.

Run after the Laplace fit (each a named validator with its own ``control`` switch, lme4
style); each adds a field of :class:`~fitting.result.Diagnostics` and, when it finds a
problem, a warning text. :func:`glmm_diagnostics` runs them all from plain values
(design, family, θ, β, standard errors, modes, the fit's diagnostics so far): it is the
one implementation behind :func:`fitting.fit` (through :func:`run_checks`) and the batched
:func:`fitting.fit_many`, which computes the adequacy and degenerate-group numbers of a
whole chunk at once (:mod:`fitting.batch_checks`, through :func:`adequacy_report` and
:func:`degenerate_report`) and passes them in, so both report the same.

:func:`check_laplace` / :func:`check_laplace_at`
    One grouping factor only: the log-likelihood at the estimates by adaptive quadrature
    (``nagq`` nodes) against Laplace, both warm-started at the fit's conditional modes
    (two vectorised evaluations, ~0.3-1 ms on cbpp/Contraception, i.e. ~5-12% of the fit).
    Flagged when the change exceeds :data:`ADEQUACY_THRESHOLD` = 0.5 (``"AGQ would move
    the log-likelihood by X; consider method='agq'"``); the value is always recorded.
    ``control["check_laplace"]``: ``True`` (default) / ``False``.
:func:`check_separation`
    Binomial fits: the linear-programming check of
    :func:`fitting.separation.detect_separation` (5-10 ms, more than a Contraception fit,
    so not run always). Run when ``control["check_separation"]`` is ``True``, never when
    ``False``, and by default (``None``) only when the fit looks separated: some
    ``|beta| > 10`` with ``|beta / se| < 1``, a non-finite or huge (> 100) standard error,
    or a fit that did not converge; and always for penalised fits.
:func:`check_degenerate`
    Counts per grouping factor of groups whose outcomes are all 0 (or all 1): vectorised
    ``bincount``s, always run.
"""
from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from .agq import agq_loglik, lambda_matrix, prepare_agq
from .errors import FittingError
from .quadrature import MAX_GRID_POINTS
from .separation import degenerate_groups, detect_separation

__all__ = ["glmm_diagnostics", "run_checks", "check_laplace", "check_laplace_at", "adequacy_nodes",
           "adequacy_report", "check_separation", "check_degenerate", "degenerate_report", "looks_separated",
           "ADEQUACY_NAGQ", "ADEQUACY_THRESHOLD"]

#: nodes per dimension of the adequacy check (5 is within 1e-3 of 25 on the reference data)
ADEQUACY_NAGQ = 5
#: a Laplace → AGQ log-likelihood change above this is flagged (and warned about): a
#: deviance change of 1, enough to move a likelihood-ratio test; the reference data sets
#: change by 0.04 (cbpp) and 0.13 (Contraception), with estimates moving by ~1e-3
ADEQUACY_THRESHOLD = 0.5
_BIG_BETA, _SMALL_Z, _HUGE_SE = 10.0, 1.0, 100.0
_MAX_LISTED = 20
#: log-likelihood changes below this are rounding noise of sums of thousands of terms
_ROUNDING = 1e-9
_COMPUTE = object()  # glmm_diagnostics: "compute this check here"


def _modes_from_ranef(fit, design):
    """The fit's conditional modes as spherical ``u`` (m, k) in AGQ layout, or None.

    With one grouping factor ``fit.ranef`` holds, term column by term column (lme4 order
    = formula order), the ``m`` modes ``b = Λu`` in level order.
    """
    terms = design.re_terms
    if not terms or len({t.group for t in terms}) != 1:
        return None
    m, k = len(terms[0].levels), sum(t.k for t in terms)
    rf = fit.ranef
    if len(rf) != m * k:
        return None
    b = rf["mode"].to_numpy(float).reshape(k, m).T
    lam = lambda_matrix(fit.theta, tuple(t.k for t in terms))
    if k == 1:
        u = b / lam[0, 0] if lam[0, 0] > 0 else np.zeros_like(b)
    else:
        u = np.linalg.lstsq(lam, b.T, rcond=None)[0].T
    return u if np.all(np.isfinite(u)) else None


def check_laplace(fit, design, family, *, nagq: int = ADEQUACY_NAGQ,
                  threshold: float = ADEQUACY_THRESHOLD, data=None) -> dict | None:
    """Laplace vs adaptive quadrature at a fit's estimates (one grouping factor).

    :func:`check_laplace_at` at ``fit.theta``, ``fit.beta``, warm-started at the modes of
    ``fit.ranef``.

    Parameters
    ----------
    fit : FitResult
        A Laplace fit of ``design``.
    design : Design
    family : Family
    nagq, threshold, data
        As for :func:`check_laplace_at`.

    Returns
    -------
    dict or None
    """
    return check_laplace_at(design, family, fit.theta, fit.beta, _modes_from_ranef(fit, design),
                            nagq=nagq, threshold=threshold, data=data)


def check_laplace_at(design, family, theta, beta, modes=None, *, loglik_laplace: float | None = None,
                     curvature=None, stack=None, nagq: int = ADEQUACY_NAGQ,
                     threshold: float = ADEQUACY_THRESHOLD, data=None) -> dict | None:
    """Laplace vs adaptive quadrature at (θ, β) (one grouping factor).

    Without ``curvature`` the modes are searched twice (a Laplace pass, then the
    ``nagq`` pass warm-started at its modes, both by :func:`fitting.agq.agq_loglik`).
    With the fit's exact ``modes``, ``curvature`` and ``loglik_laplace`` (one term on
    the factor, e.g. from the exact-Newton path) no mode search is run: the per-group
    changes come from :func:`fitting.batch_checks.changes_at`, the code ``fit_many``
    uses, on the rows of a one-stratum stack.

    Parameters
    ----------
    design : Design
    family : Family
    theta, beta : ndarray
        Laplace estimates of ``design``.
    modes : ndarray (m, k), optional
        Spherical conditional modes in AGQ layout (warm start; zeros when None); exact
        modes when ``curvature`` is given.
    loglik_laplace : float, optional
        The Laplace log-likelihood (full constants) at (θ, β, modes); with ``curvature``.
    curvature : ndarray (m, k, k), optional
        ``A_g⁻¹`` (Fisher weights) at the modes, per group in level order.
    stack : tuple (Stack, RowKernel), optional
        A one-stratum :class:`~fitting.batch_stack.Stack` of ``design`` and its kernel, if
        already built (used with ``curvature``).
    nagq : int
        Nodes per dimension for a scalar term; 3 for vector-valued terms (``3**k``
        points), lower if needed to stay within :data:`fitting.quadrature.MAX_GRID_POINTS`.
    threshold : float
    data : AGQData, optional
        ``prepare_agq(design)`` if already built.

    Returns
    -------
    dict or None
        The keys of :func:`fitting.agq.laplace_adequacy` (``loglik_laplace, loglik_agq,
        nagq, difference, abs_difference, threshold, flag, worst_groups, message``);
        ``worst_groups`` are level labels (the five groups whose log-likelihood moves
        most; ties, e.g. at a singular fit, in level order). None when not applicable
        (several grouping factors, a Gaussian family).
    """
    if family.estimates_scale or len({t.group for t in design.re_terms}) != 1:
        return None
    fast = _at_modes(design, family, theta, beta, modes, loglik_laplace, curvature, stack, nagq, threshold)
    if fast is not None:
        return fast
    try:
        data = prepare_agq(design) if data is None else data
    except FittingError:
        return None
    nagq = adequacy_nodes(data.k, nagq)
    if nagq is None:
        return None
    u0 = None
    if modes is not None:
        u0 = np.asarray(modes, dtype=float)
        if u0.shape != (data.n_groups, data.k) or not np.all(np.isfinite(u0)):
            u0 = None
    l1, p1, u = agq_loglik(data, family, theta, beta, 1, u0=u0)
    lq, pq, _ = agq_loglik(data, family, theta, beta, nagq, u0=u)
    return adequacy_report(l1, lq - l1, pq - p1, nagq, threshold, data.levels)


def _at_modes(design, family, theta, beta, modes, loglik_laplace, curvature, stack, nagq, threshold):
    """:func:`check_laplace_at` from exact modes and curvatures, or None when not given/usable."""
    if curvature is None or modes is None or loglik_laplace is None or len(design.re_terms) != 1:
        return None
    term = design.re_terms[0]
    k, m = term.k, term.n_levels
    u = np.asarray(modes, dtype=float)
    Ainv = np.asarray(curvature, dtype=float)
    if (u.shape != (m, k) or Ainv.shape != (m, k, k) or not np.all(np.isfinite(u))
            or not np.all(np.isfinite(Ainv)) or not np.isfinite(loglik_laplace)
            or np.bincount(np.asarray(term.codes), minlength=m).min() == 0):
        return None  # (a level without rows: the stacked layout needs every group non-empty)
    nodes = adequacy_nodes(k, nagq)
    if nodes is None:
        return None
    from .batch_checks import changes_at  # batch_checks imports this module
    from .batch_kernels import row_kernel
    from .batch_stack import stack_designs

    if stack is None:
        kern = row_kernel(family)
        st = stack_designs([design], kern)
    else:
        st, kern = stack
    z = np.concatenate([np.asarray(theta, dtype=float), np.asarray(beta, dtype=float)])[None, :]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        change = changes_at(st, kern, z, u, Ainv, nodes)
    return adequacy_report(float(loglik_laplace), float(change.sum()), change, nodes, threshold, term.levels)


def adequacy_nodes(k: int, nagq: int = ADEQUACY_NAGQ) -> int | None:
    """Nodes per dimension of the adequacy check for ``k`` random effects per group.

    ``nagq`` for a scalar term, at most 3 for vector-valued terms (``3**k`` points: a
    screen), lowered to stay within :data:`fitting.quadrature.MAX_GRID_POINTS`; None
    when no odd count above 1 fits (the check is then not applicable).
    """
    if k > 1:
        nagq = min(nagq, 3)  # 3**k points: a screen, keeps the check cheap for vector terms
    while nagq > 1 and nagq ** k > MAX_GRID_POINTS:
        nagq -= 2
    return int(nagq) if nagq > 1 else None


def adequacy_report(loglik_laplace: float, difference: float, per_group, nagq: int, threshold: float,
                    levels) -> dict:
    """The ``laplace_adequacy`` dict of :func:`check_laplace_at` from its numbers.

    Parameters
    ----------
    loglik_laplace : float
        Laplace log-likelihood (full constants) at the estimates.
    difference : float
        AGQ minus Laplace log-likelihood.
    per_group : ndarray (m,)
        The same change per group (level order).
    nagq : int
    threshold : float
    levels : sequence of str
        Level labels of the grouping factor.
    """
    diff = float(difference)
    if abs(diff) < _ROUNDING:  # rounding noise (e.g. a singular fit): report an exact 0
        diff = 0.0
    flag = bool(abs(diff) > threshold)
    # rank on a 1e-9 grid: changes equal up to rounding (e.g. all 0 at a singular fit) keep level order
    worst = np.argsort(-np.round(np.abs(np.asarray(per_group, dtype=float)), 9), kind="stable")[:5]
    msg = (f"log-likelihood changes by {diff:+.4g} from Laplace to nAGQ={nagq}"
           + ("; consider method='agq'" if flag else "; Laplace is adequate"))
    return {"loglik_laplace": float(loglik_laplace), "loglik_agq": float(loglik_laplace) + diff,
            "nagq": int(nagq), "difference": diff, "abs_difference": abs(diff), "threshold": float(threshold),
            "flag": flag, "worst_groups": [levels[i] for i in worst], "message": msg}


def looks_separated(fit) -> bool:
    """Cheap screen for separation: large ``|beta|`` with tiny ``|z|``, huge SEs, no convergence."""
    return _looks_separated(fit.fixed["estimate"].to_numpy(float), fit.fixed["std_error"].to_numpy(float),
                            fit.diagnostics.converged)


def _looks_separated(est, se, converged) -> bool:
    est = np.asarray(est, dtype=float)
    se = np.asarray(se, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.abs(est / se)
    return bool(not converged
                or np.any(~np.isfinite(se)) or np.any(se > _HUGE_SE)
                or np.any((np.abs(est) > _BIG_BETA) & ~(z >= _SMALL_Z)))


def check_separation(design) -> dict:
    """:func:`fitting.separation.detect_separation` on the fixed-effects design, as a dict."""
    rep = detect_separation(design.X, design.y, design.weights, design.x_names)
    return {"separated": rep.separated, "kind": rep.kind, "terms": list(rep.terms),
            "message": rep.message, "direction": list(rep.direction)}


def check_degenerate(design, family_name: str) -> dict:
    """Per grouping factor: counts of groups with all-0 (all-1) outcomes.

    Returns
    -------
    dict
        Grouping factor -> the dict of :func:`fitting.separation.degenerate_groups`,
        with ``all_zero``/``all_one`` as level labels (at most 20 listed).
    """
    out = {}
    for t in design.re_terms:
        if t.group in out:
            continue
        d = degenerate_groups(design.y, design.weights, t.codes, len(t.levels), family_name)
        out[t.group] = _labelled(d, t.levels)
    return out


def degenerate_report(success, failure, levels, family_name: str) -> dict:
    """One grouping factor's entry of :func:`check_degenerate` from per-group sums.

    Parameters
    ----------
    success, failure : ndarray (m,)
        Per group (level order), over the rows with positive prior weight: ``Σ w y`` and
        ``Σ w (1 - y)`` (their sum is the group's total weight, 0 for a group without such
        rows).
    levels : sequence of str
    family_name : {"binomial", "poisson"}

    Returns
    -------
    dict
        What :func:`check_degenerate` gives for the factor: one row per group with the
        same totals, through :func:`fitting.separation.degenerate_groups`.
    """
    success = np.asarray(success, dtype=float)
    total = success + np.asarray(failure, dtype=float)
    y = np.divide(success, total, out=np.zeros_like(total), where=total > 0)
    d = degenerate_groups(y, total, np.arange(total.size), total.size, family_name)
    return _labelled(d, levels)


def _labelled(d: dict, levels) -> dict:
    for key in ("all_zero", "all_one"):
        d[key] = [levels[i] for i in d[key][:_MAX_LISTED]]
    return d


def glmm_diagnostics(diag, design, family, theta, beta, *, std_error, modes=None,
                     method: str = "laplace", ctl: dict | None = None, degenerate: dict | None = None,
                     adequacy=_COMPUTE, loglik_laplace: float | None = None, curvature=None, stack=None):
    """The post-fit checks of a binomial/Poisson GLMM, from plain fit-level values.

    The one implementation behind :func:`run_checks` (:func:`fitting.fit`) and the batched
    :func:`fitting.fit_many` (:func:`fitting.batch_results.build_result`), so that both
    report the same ``laplace_adequacy``, ``separation``, ``degenerate_groups`` and
    warning texts.

    Parameters
    ----------
    diag : Diagnostics
        The fit's diagnostics so far (``converged``, ``penalized`` and ``warnings`` are
        read; the new warnings are appended, duplicates dropped).
    design : Design
    family : Family
    theta, beta : ndarray
        Estimates (lme4 order of θ).
    std_error : ndarray
        Standard errors of ``beta`` (for the separation screen :func:`looks_separated`).
    modes : ndarray (m, k), optional
        Conditional modes of the spherical random effects ``u`` in level order (one
        grouping factor): the warm start of the adequacy check (zeros when None).
    method : str
        The fit's method; the adequacy check runs for ``"laplace"`` only.
    ctl : dict, optional
        Checked control dict (keys ``check_laplace``, ``check_separation``).
    degenerate : dict, optional
        Precomputed :func:`check_degenerate` result (the batched path computes it for
        many strata at once).
    adequacy : dict or None, optional
        Precomputed :func:`check_laplace_at` result (used only when the check is on; the
        batched path computes it for many strata at once,
        :func:`fitting.batch_checks.chunk_checks`); computed here when not given.
    loglik_laplace, curvature, stack : optional
        Passed to :func:`check_laplace_at` when the check is computed here: with exact
        ``modes``, the fit's Laplace log-likelihood and ``A_g⁻¹`` it runs no mode search.

    Returns
    -------
    Diagnostics
        ``diag`` with the check fields and warnings; ``diag`` itself for other families
        or without random effects.
    """
    if family.name not in ("binomial", "poisson") or not design.re_terms:
        return diag
    ctl = {} if ctl is None else ctl
    warn = list(diag.warnings)
    deg = check_degenerate(design, family.name) if degenerate is None else degenerate
    for g, d in deg.items():
        if d["fraction_degenerate"] >= 0.5:
            warn.append(f"{d['message']} ({g}): their conditional modes sit near the boundary")
    ad = None
    if ctl.get("check_laplace", True) and str(method) == "laplace":
        ad = (check_laplace_at(design, family, theta, beta, modes, loglik_laplace=loglik_laplace,
                               curvature=curvature, stack=stack) if adequacy is _COMPUTE else adequacy)
        if ad is not None and ad["flag"]:
            warn.append(f"AGQ would move the log-likelihood by {ad['difference']:+.3g} "
                        f"(nAGQ={ad['nagq']}); consider method='agq'")
    sep = None
    want = ctl.get("check_separation")
    if family.name == "binomial" and want is not False:
        auto = diag.penalized or _looks_separated(beta, std_error, diag.converged)
        if want is True or auto:
            sep = check_separation(design)
            if sep["separated"]:
                hint = "" if diag.penalized else " (fitting.fit(..., control={'penalty': 'normal'}))"
                warn.append(sep["message"] + hint)
    return replace(diag, warnings=tuple(dict.fromkeys(warn)), laplace_adequacy=ad, separation=sep,
                   degenerate_groups=deg)


def run_checks(fit, design, family, ctl, *, modes=None, loglik_laplace: float | None = None,
               curvature=None, stack=None) -> object:
    """Add the post-fit checks to a binomial/Poisson GLMM fit's diagnostics.

    :func:`glmm_diagnostics` with the values of ``fit`` (modes from ``fit.ranef`` unless
    given).

    Parameters
    ----------
    fit : FitResult
    design : Design
    family : Family
    ctl : dict
        Checked control dict (keys ``check_laplace``, ``check_separation``).
    modes, loglik_laplace, curvature, stack : optional
        What the fit already has at its estimates (exact spherical modes (m, k), Laplace
        log-likelihood, ``A_g⁻¹`` (m, k, k), its one-stratum ``(Stack, RowKernel)``):
        the adequacy check then runs no mode search (:func:`check_laplace_at`).

    Returns
    -------
    FitResult
        ``fit`` with ``diagnostics`` (and ``optinfo.extra["checks_elapsed"]``) updated.
    """
    if family.name not in ("binomial", "poisson") or not design.re_terms:
        return fit
    t0 = time.perf_counter()
    diag = glmm_diagnostics(fit.diagnostics, design, family, fit.theta, fit.beta,
                            std_error=fit.fixed["std_error"].to_numpy(float),
                            modes=_modes_from_ranef(fit, design) if modes is None else modes,
                            method=fit.method, ctl=ctl, loglik_laplace=loglik_laplace,
                            curvature=curvature, stack=stack)
    extra = dict(fit.optinfo.extra)
    extra["checks_elapsed"] = time.perf_counter() - t0
    return replace(fit, diagnostics=diag, optinfo=replace(fit.optinfo, extra=extra))

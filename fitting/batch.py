"""``fitting.fit_many``: fit one GLMM per stratum of a table, all strata together.

Stages (each stratum's answer is the one :func:`fitting.fit` gives on that stratum alone):

1. **Designs.** The table is split by the ``by`` columns; every stratum gets its own
   :class:`~fitting.design.Design` from :func:`fitting.frame.build_design` (factor levels,
   dropped aliased columns and term names may differ between strata). A stratum whose
   data are bad gets the :class:`~fitting.errors.FittingError` ``fit`` would raise.
2. **Batches.** Binomial/Poisson Laplace fits with one random-effects term (one grouping
   factor, ``k`` columns) are grouped by ``(p, k)`` into chunks of at most ``max_rows``
   rows, each fitted as soon as it is full (designs are held for one chunk per ``(p, k)``
   at most); every other stratum (Gaussian, several terms, ``method="agq"``, no
   random effects) is fitted by :func:`fitting.fit_design` one by one — same result,
   just slower. Chunks are cut at :data:`BLOCK_ROWS` rows to keep the working arrays
   in the CPU caches.
3. **Batched fit** of a chunk (:mod:`fitting.batch_stack`, :mod:`fitting.batch_laplace`,
   :mod:`fitting.batch_newton`): rows stacked stratum by stratum; PIRLS for all groups
   of all strata at once; Newton over (θ, β) with the exact analytic Hessian of the
   Laplace deviance, every stratum converging on its own (``g'H⁻¹g < 1e-14``), finished
   strata leaving the working set.
4. **Results** (:mod:`fitting.batch_results`): ``fit``'s post-processing (canonical θ,
   zeroing a near-zero θ, vcov from the Hessian, lme4's convergence checks) batched, one
   :class:`~fitting.result.FitResult` per stratum with ``optimizer="batched-newton"``;
   the post-fit checks of binomial/Poisson GLMMs (Laplace adequacy, degenerate groups,
   separation screen, their warnings) through the same
   :func:`fitting.glmm_checks.glmm_diagnostics` as ``fit``, the adequacy and degenerate
   counts computed for the whole chunk at once (:mod:`fitting.batch_checks`).
   A stratum the batched path cannot vouch for (iteration limit, indefinite or nearly
   singular Hessian as under separation, failed PIRLS) is refitted by ``fit_design``,
   so its answer (result or error) is exactly ``fit``'s.

The estimates agree with ``fit`` to ``fit``'s own precision (~1e-7; ~1e-5 at singular
fits, where ``fit``'s optimiser stops at a larger gradient): both are the optimum of the
same deviance, which the batched Newton drives to a Newton decrement ``g'H⁻¹g <= 1e-10``
(the remaining step below 1e-5 standard errors of every estimate). The standard
errors come from the exact Hessian; ``fit``'s forward-difference Hessian differs from it
by up to a few 1e-4 (relative) on small strata.
"""
from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import pandas as pd

from .api import CONTROL_DEFAULTS, check_control, check_method, single_thread_blas, fit_design
from .batch_checks import chunk_checks
from .batch_kernels import row_kernel
from .batch_newton import glm_start, moment_theta, moment_theta_vector, newton
from .batch_results import build_result, chunk_tables, finish_chunk
from .batch_stack import stack_designs, tril_layout
from .errors import ConvergenceError, FittingError
from .families import Family, get_family
from .formula import parse_formula
from .frame import build_design
from .result import FitResult

__all__ = ["fit_many", "DEFAULT_MAX_ROWS", "BLOCK_ROWS", "THETA_START"]

#: rows fitted together at most (working memory is ~40 float64 arrays of this length)
DEFAULT_MAX_ROWS = 2_000_000
#: strata are fitted in blocks of about this many rows (fewer if ``max_rows`` is smaller):
#: the working arrays (~200 kB each) then stay in the CPU caches and are recycled by the
#: allocator instead of being page-faulted in anew, ~1.5x faster than one big block
BLOCK_ROWS = 24_000
#: default start of the diagonal of Λ (as :mod:`fitting.glmm_fit`)
THETA_START = 0.5
_MAX_NEWTON = 200
#: IRLS steps of the GLM start (2 give the same Newton path as a converged GLM)
GLM_STEPS = 3
#: control keys the batched path honours; any other key set away from its default
#: (``penalty``, or an option added to ``fit`` later) sends the strata to ``fit_design``
BATCH_CONTROL = frozenset({"start", "maxiter", "gtol", "se", "na_action", "check_singular_tol",
                           "pirls_tol", "nagq", "check_laplace", "check_separation"})
_NUMERIC_ERRORS = (np.linalg.LinAlgError, FloatingPointError, ZeroDivisionError, OverflowError)


def fit_many(formula: str, data, by, family: str | Family = "gaussian", link: str | None = None, *,
             weights=None, offset=None, reml: bool = False, method: str = "laplace",
             control: dict | None = None, start: dict | None = None,
             max_rows: int = DEFAULT_MAX_ROWS) -> dict:
    """Fit ``formula`` to every stratum of ``data`` (one model per combination of ``by``).

    Parameters
    ----------
    formula : str
        lme4 formula, as for :func:`fitting.fit`.
    data : pandas.DataFrame or pyarrow.Table
    by : str or list of str
        Columns defining the strata (missing values form their own stratum).
    family, link, weights, offset, reml, method, control
        As for :func:`fitting.fit` (``weights``/``offset`` given as arrays are aligned with
        the rows of ``data``). ``control["start"]`` is the warm start of every stratum
        without an entry in ``start``.
    start : dict, optional
        Per-stratum warm starts ``{key: spec}`` with ``key`` as in the result (a tuple;
        a scalar is taken as a 1-tuple). ``spec`` is a :class:`FitResult` (e.g. last
        night's) or a dict with ``"theta"`` (lme4 order) and ``"beta"``: a mapping
        ``{term name: value}``, a pandas Series, or a sequence with its names in
        ``"beta_names"`` (a bare sequence of the right length is positional). Fixed
        effects are matched by term name; ones without a start value start from the GLM
        fit. Keys of strata not in the data are ignored.
    max_rows : int
        Strata are fitted in chunks of at most this many rows (a larger stratum alone);
        chunks are in any case cut at about :data:`BLOCK_ROWS` rows (cache blocking).

    Returns
    -------
    dict
        ``{key: FitResult or FittingError}`` in the sorted order of the strata; ``key`` is
        the tuple of the ``by`` values. A stratum whose data ``fit`` rejects, or whose fit
        fails, maps to the error ``fit`` raises (numerical failures as
        :class:`~fitting.errors.ConvergenceError`).

    Raises
    ------
    FormulaError, FamilyError, ValueError
        For arguments that are wrong for every stratum (formula, family, control,
        method, ``by`` columns, ``max_rows``).
    """
    ctl = check_control(control)
    fam = get_family(family, link)
    check_method(method, fam, reml, ctl)
    by = [by] if isinstance(by, str) else list(by)
    if not by:
        raise ValueError("by must name at least one column")
    if isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1:
        raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")
    if start is not None and not isinstance(start, Mapping):
        raise ValueError(f"start must be a dict {{key: spec}}, got {type(start).__name__}")
    if not isinstance(data, pd.DataFrame):
        if hasattr(data, "to_pandas"):
            data = data.to_pandas()
        else:
            raise ValueError(f"data must be a pandas DataFrame or pyarrow Table, got {type(data).__name__}")
    missing = [c for c in by if c not in data.columns]
    if missing:
        raise ValueError(f"by column(s) {', '.join(map(repr, missing))} not in the data")
    parsed = parse_formula(formula)
    formula = str(formula)
    starts = {(k if isinstance(k, tuple) else (k,)): v for k, v in (start or {}).items()}

    with single_thread_blas():
        strata = _split(data, by, parsed, weights, offset)
        results: dict = {key: None for key, *_ in strata}
        batch_ok = all(_is_default(key, ctl[key]) for key in set(ctl) - BATCH_CONTROL)
        pending: dict = {}  # (p, k) -> designs waiting for a full chunk
        limit = min(int(max_rows), BLOCK_ROWS)
        for key, frame, w_arg, o_arg in strata:
            t0 = time.perf_counter()
            try:
                design = build_design(parsed, frame, fam.name, weights=w_arg, offset=o_arg,
                                      na_action=ctl["na_action"])
            except FittingError as exc:
                results[key] = exc
                continue
            spec = starts.get(key, ctl["start"])
            t_design = time.perf_counter() - t0
            if not (batch_ok and _batchable(design, fam, method)):
                results[key] = _refit(design, fam, formula, reml, method, ctl, spec)
                continue
            group = pending.setdefault((design.p, design.re_terms[0].k), [])
            if group and sum(it[1].nobs for it in group) + design.nobs > limit:
                results.update(_fit_chunk(group, fam, formula, ctl, reml, method))
                group.clear()  # designs are held for one chunk per (p, k) at most
            group.append((key, design, spec, t_design))
        for group in pending.values():
            if group:
                results.update(_fit_chunk(group, fam, formula, ctl, reml, method))
    return results


# ------------------------------------------------------------------- strata
def _split(data: pd.DataFrame, by: list, parsed, weights, offset) -> list:
    """``[(key, frame, weights, offset)]`` per stratum, keys sorted, rows in data order."""
    n = len(data)
    cols = list(dict.fromkeys(list(parsed.columns) + [a for a in (weights, offset) if isinstance(a, str)]))
    cols = [c for c in cols if c in data.columns]
    arrays = {}
    for name, arg in (("weights", weights), ("offset", offset)):
        if arg is not None and not isinstance(arg, str):
            a = np.asarray(arg)
            if a.ndim != 1 or a.shape[0] != n:
                raise ValueError(f"{name} must be a column name or have one value per row of data "
                                 f"({n}), got shape {a.shape}")
            arrays[name] = a
    if n == 0:
        return []
    idx = data.groupby(by, sort=True, dropna=False, observed=True).indices
    keys = list(idx)
    order = np.concatenate([np.asarray(idx[k], dtype=np.int64) for k in keys])
    frame = data[cols].iloc[order]
    out, a = [], 0
    for kk in keys:
        b = a + len(idx[kk])
        pos = order[a:b]
        key = kk if isinstance(kk, tuple) else (kk,)
        w_arg = arrays["weights"][pos] if "weights" in arrays else weights
        o_arg = arrays["offset"][pos] if "offset" in arrays else offset
        out.append((key, frame.iloc[a:b], w_arg, o_arg))
        a = b
    return out


def _is_default(key, value) -> bool:
    default = CONTROL_DEFAULTS.get(key)
    if value is default:
        return True
    try:
        return bool(value == default)
    except (TypeError, ValueError):
        return False


def _batchable(design, fam, method) -> bool:
    return (str(method).lower() == "laplace" and fam.name != "gaussian" and len(design.re_terms) == 1
            and design.p >= 1 and design.nobs > design.p)


# ---------------------------------------------------------------- warm starts
def _start_values(spec, design, ntheta: int):
    """``(theta or None, beta with NaN where no start value)`` for one design."""
    p = design.p
    beta = np.full(p, np.nan)
    if spec is None:
        return None, beta
    if isinstance(spec, FitResult):
        theta, names, vals = spec.theta, list(spec.fixed["term"]), np.asarray(spec.beta, dtype=float)
    elif isinstance(spec, Mapping):
        theta = spec.get("theta")
        b = spec.get("beta")
        names = spec.get("beta_names")
        if isinstance(b, pd.Series):
            names, vals = list(b.index), b.to_numpy(dtype=float)
        elif isinstance(b, Mapping):
            names, vals = list(b.keys()), np.asarray(list(b.values()), dtype=float)
        elif b is not None:
            vals = np.asarray(b, dtype=float).ravel()
            if names is None and vals.size == p:
                names = list(design.x_names)
        else:
            vals = np.zeros(0)
    else:
        raise ValueError(f"a start must be a FitResult or a dict with 'theta'/'beta', got {type(spec).__name__}")
    if names is not None and len(names) == len(vals):
        lookup = dict(zip(map(str, names), vals))
        beta = np.array([lookup.get(nm, np.nan) for nm in design.x_names], dtype=float)
    if theta is not None:
        theta = np.asarray(theta, dtype=float).ravel()
        if theta.size != ntheta or not np.all(np.isfinite(theta)):
            theta = None
    return theta, beta


def _refit(design, fam, formula, reml, method, ctl, spec):
    """``fit``'s answer for one design (result or error)."""
    c = dict(ctl)
    if spec is not None:
        ntheta = sum(t.k * (t.k + 1) // 2 for t in design.re_terms)
        theta, beta = _start_values(spec, design, ntheta)
        st = {}
        if theta is not None and design.re_terms:
            st["theta"] = theta
        if np.all(np.isfinite(beta)):
            st["beta"] = beta
        c["start"] = st or None
    try:
        return fit_design(design, fam, formula=formula, reml=reml, method=method, control=c)
    except FittingError as exc:
        return exc
    except _NUMERIC_ERRORS as exc:
        err = ConvergenceError(f"numerical failure: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err


# --------------------------------------------------------------------- chunks
def _fit_chunk(chunk: list, fam, formula: str, ctl: dict, reml, method) -> dict:
    """Fit the strata of one chunk together; ``{key: FitResult or FittingError}``."""
    t0 = time.perf_counter()
    designs = [it[1] for it in chunk]
    kern = row_kernel(fam)
    st = stack_designs(designs, kern)
    k, p = st.k, st.p
    nt = k * (k + 1) // 2
    rows, cols = tril_layout(k)
    z0 = np.zeros((st.S, nt + p))
    z0[:, :nt] = np.where(rows == cols, THETA_START, 0.0)
    given = np.zeros(st.S, dtype=bool)
    for s, (_, design, spec, _) in enumerate(chunk):
        theta, beta = _start_values(spec, design, nt)
        if theta is not None:
            z0[s, :nt] = theta
            given[s] = True
        z0[s, nt:] = beta
    need = np.flatnonzero(~np.all(np.isfinite(z0[:, nt:]), axis=1))
    if need.size:
        b_glm = glm_start(st.take(need), kern, maxit=GLM_STEPS)
        z0[need, nt:] = np.where(np.isfinite(z0[need, nt:]), z0[need, nt:], b_glm)
    if k == 1 and not given.all():  # the same start as fit() (fitting.newton_fit)
        mom = moment_theta(st, kern, z0[:, nt:], THETA_START)
        z0[~given, 0] = mom[~given]
    elif not given.all():
        mom = moment_theta_vector(st, kern, z0[:, nt:], np.where(rows == cols, THETA_START, 0.0))
        z0[~given, :nt] = mom[~given]
    res = newton(st, kern, z0.copy(), maxiter=min(int(ctl["maxiter"]), _MAX_NEWTON), rx=ctl["se"] == "rx")
    fin = finish_chunk(st, kern, res, se=ctl["se"], singular_tol=float(ctl["check_singular_tol"]))
    t_num = time.perf_counter() - t0
    info = {"batch_strata": int(st.S), "batch_rows": int(st.N), "batch_elapsed": float(t_num)}
    keep = np.flatnonzero(~fin.refit)
    tables = chunk_tables(designs, fin, st, keep)
    t1 = time.perf_counter()
    checks = chunk_checks(st, kern, fin, designs, keep, fam, ctl)
    t_checks = time.perf_counter() - t1
    out = {}
    for s, (key, design, spec, t_design) in enumerate(chunk):
        if fin.refit[s]:
            out[key] = _refit(design, fam, formula, reml, method, ctl, spec)
            continue
        share = t_design + t_num * design.nobs / st.N
        out[key] = build_result(design, fam, formula, fin, res, s, tables, z0=z0[s], elapsed=share, ctl=ctl,
                                chunk_info=dict(info, design_elapsed=float(t_design)),
                                checks=checks.get(s, {}), checks_elapsed=t_checks * design.nobs / st.N)
    return out

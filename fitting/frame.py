"""Model frame stage: formula + table (+ weights/offset, family) -> :class:`Design`.

:func:`build_design` mirrors what lme4's ``glFormula``/``lFormula`` do before any
numerics: evaluate the variables on the whole table, reject (or drop, with
``na_action="omit"``) rows with missing or non-finite values, code factors with
treatment contrasts, build ``X`` (dropping aliased columns like lme4's
``chkRank.drop.cols``) and one :class:`fitting.design.ReTerm` per random-effects term,
and validate the response for the family.

Every check is a named function raising :class:`fitting.errors.FormulaError` or
:class:`fitting.errors.DataError` with a message naming the culprit. All work is
vectorised; there are no per-row Python loops.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fitting.design import Design, ReTerm
from fitting.errors import DataError, FormulaError
from fitting.formula import ParsedFormula, parse_formula
from fitting.formula_nodes import Binary, Call, Name, Node, Paren, deparse, iter_nodes
from fitting.modelmatrix import (
    Evaluator,
    Factor,
    aliased_columns,
    factor_codes,
    as_frame,
    interaction,
    is_factor_column,
    is_logical,
    missing_mask,
    model_matrix,
    subset_factor,
    unknown_column_message,
    vector_argument,
)
from fitting.terms import ModelTerms

__all__ = [
    "build_design",
    "new_model_matrices",
    "NewModelMatrices",
    "DesignInfo",
    "design_info",
    "as_frame",
    "family_name",
    "check_na_action",
    "check_columns",
    "check_nonempty",
    "check_missing",
    "check_weights",
    "check_factor_levels",
    "check_grouping_levels",
    "binomial_response",
    "poisson_response",
    "gaussian_response",
    "drop_aliased",
]

NA_ACTIONS = ("error", "omit")
_SHOW_ROWS = 5
_INT_TOL = 1e-8


# ------------------------------------------------------------------ small helpers
def _rows_text(mask: np.ndarray, rows: np.ndarray | None) -> str:
    """``"3 values (rows 4, 17, 90)"``-style tail: row positions in the input data."""
    where = np.flatnonzero(mask)
    if rows is not None:
        where = rows[where]
    shown = ", ".join(str(int(i)) for i in where[:_SHOW_ROWS])
    more = ", ..." if where.size > _SHOW_ROWS else ""
    return f"(rows {shown}{more})"


def _is_integral(values: np.ndarray) -> np.ndarray:
    return np.abs(values - np.rint(values)) <= _INT_TOL * np.maximum(1.0, np.abs(values))


def _unparen(node: Node) -> Node:
    while isinstance(node, Paren):
        node = node.expr
    return node


def family_name(family) -> str:
    """Normalised family name from a string or an object with a ``name`` attribute.

    Parameters
    ----------
    family : str or object

    Returns
    -------
    str
        Lower-case name (``"gaussian"``, ``"binomial"``, ``"poisson"``, ...).
    """
    name = family if isinstance(family, str) else getattr(family, "name", None)
    if not isinstance(name, str) or not name.strip():
        raise DataError(f"family must be a name such as 'gaussian', got {family!r}")
    return name.strip().lower()


def check_na_action(na_action: str) -> None:
    """Raise a DataError unless ``na_action`` is ``"error"`` or ``"omit"``."""
    if na_action not in NA_ACTIONS:
        raise DataError(f"na_action must be one of {NA_ACTIONS}, got {na_action!r}")


def check_columns(parsed: ParsedFormula, available: list, *, weights=None, offset=None) -> None:
    """Every referenced column exists (FormulaError with a did-you-mean suggestion).

    Parameters
    ----------
    parsed : ParsedFormula
    available : list
        Column names of the data.
    weights, offset : str or array-like or None
        When a string, the column must exist too (DataError).
    """
    present = set(available)
    for name in parsed.columns:
        if name not in present:
            raise FormulaError(unknown_column_message(name, available, "formula"))
    for arg, what in ((weights, "weights"), (offset, "offset")):
        if isinstance(arg, str) and arg not in present:
            raise DataError(unknown_column_message(arg, available, what))
    if len(present) != len(available):
        duplicated = {c for c in available if available.count(c) > 1}
        used = duplicated & (set(parsed.columns) | {weights, offset})
        if used:
            raise DataError(f"column '{sorted(map(str, used))[0]}' appears more than once in the data")


def check_nonempty(n: int, context: str = "") -> None:
    """Raise a DataError when there are no rows."""
    if n == 0:
        raise DataError(f"data has no rows{context}")


def check_missing(problems: list[tuple[str, np.ndarray]], n: int, na_action: str):
    """Apply ``na_action`` to rows with missing/non-finite values in used columns.

    Parameters
    ----------
    problems : list of (label, mask)
        Per column (or derived expression, weights, offset) the rows that are missing
        or non-finite.
    n : int
        Number of rows.
    na_action : {"error", "omit"}

    Returns
    -------
    keep : ndarray of bool or None
        Rows to keep (None when nothing is dropped).
    warning : str or None

    Raises
    ------
    DataError
        With ``na_action="error"``: ``column 'age' has 3 missing/non-finite values
        (rows 4, 17, 90)`` (row positions are 0-based, at most 5 shown).
    """
    problems = [(label, mask) for label, mask in problems if mask.any()]
    if not problems:
        return None, None
    if na_action == "error":
        raise DataError(
            "; ".join(
                f"{label} has {int(mask.sum())} missing/non-finite values {_rows_text(mask, None)}"
                for label, mask in problems
            )
            + " (use na_action='omit' to drop these rows)"
        )
    bad = np.zeros(n, dtype=bool)
    for _, mask in problems:
        bad |= mask
    counts = ", ".join(f"{label}: {int(mask.sum())}" for label, mask in problems)
    dropped = int(bad.sum())
    check_nonempty(n - dropped, f" left after removing {dropped} rows with missing values")
    return ~bad, (
        f"removed {dropped} of {n} rows with missing/non-finite values "
        f"(na_action='omit'; {counts})"
    )


def check_weights(weights: np.ndarray, label: str, rows) -> None:
    """Prior weights must be non-negative."""
    negative = weights < 0
    if negative.any():
        raise DataError(
            f"{label} must be non-negative; {int(negative.sum())} rows are negative "
            f"{_rows_text(negative, rows)}"
        )


def check_factor_levels(name: str, factor: Factor) -> None:
    """A factor in a model matrix needs at least 2 levels (R: contrasts need 2 levels)."""
    if len(factor.levels) < 2:
        shown = f" ({factor.levels[0]!r})" if factor.levels else ""
        raise DataError(
            f"factor '{name}' has only {len(factor.levels)} level{shown} in the data; "
            "contrasts can be applied only to factors with 2 or more levels"
        )


def check_grouping_levels(
    term: str, group: str, n_levels: int, n_obs: int, k: int, family: str, bernoulli: bool
) -> None:
    """Grouping-factor checks: at least 2 levels; fewer random effects than observations.

    For a Gaussian model (``n_levels * k >= n_obs``, lme4's ``check.nobs.vs.nlev`` and
    ``check.nobs.vs.nRE``) and for a Bernoulli binomial response (``n_levels ==
    n_obs``) the term is unidentifiable and raises. Observation-level random effects
    are allowed for Poisson and for binomial responses with more than one trial
    (overdispersion terms such as grouseticks' ``(1 | INDEX)``).
    """
    if n_levels < 2:
        raise DataError(
            f"grouping factor '{group}' has only {n_levels} level; "
            "a random effect needs at least 2"
        )
    if family == "gaussian" and n_levels * k >= n_obs:
        if k == 1:
            raise DataError(
                f"grouping factor '{group}' has {n_levels} levels for {n_obs} observations; "
                f"the random effect {term} is unidentifiable with family 'gaussian' "
                "(needs fewer levels than observations)"
            )
        raise DataError(
            f"random-effects term {term} has {n_levels * k} random effects for {n_obs} "
            "observations; it is unidentifiable with family 'gaussian'"
        )
    if bernoulli and n_levels >= n_obs:
        raise DataError(
            f"grouping factor '{group}' has {n_levels} levels for {n_obs} observations; "
            f"the random effect {term} is unidentifiable for a 0/1 (Bernoulli) binomial response"
        )


def drop_aliased(X: np.ndarray, names: list[str], tol: float = 1e-7):
    """Drop fixed-effect columns aliased with earlier ones, with lme4's warning text.

    Returns
    -------
    X : ndarray
    names : tuple of str
    dropped : tuple of str
    warning : str or None
        ``fixed-effect model matrix is rank deficient so dropping 1 column /
        coefficient: period4``.
    """
    aliased = aliased_columns(X, tol)
    if not aliased:
        return X, tuple(names), (), None
    dropped = tuple(names[j] for j in aliased)
    keep = np.setdiff1d(np.arange(X.shape[1]), aliased)
    what = "column / coefficient" if len(aliased) == 1 else "columns / coefficients"
    warning = (
        f"fixed-effect model matrix is rank deficient so dropping {len(aliased)} {what}: "
        + ", ".join(dropped)
    )
    return np.ascontiguousarray(X[:, keep]), tuple(names[j] for j in keep), dropped, warning


# --------------------------------------------------------------------- response
@dataclass
class _Response:
    kind: str  # "cbind", "factor" or "numeric"
    label: str
    parts: tuple[np.ndarray, ...] = ()
    factor: Factor | None = None


def binomial_response(resp: _Response, user_weights, rows) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """y (proportion of successes) and prior weights for family 'binomial'.

    ``cbind(s, f)``: counts must be non-negative integers with ``s + f > 0``;
    ``y = s/(s+f)``, weights ``s + f`` (times user weights). A two-level factor: first
    level is failure. Numeric: 0/1 or a proportion in [0, 1]; with ``weights=`` these
    are the (positive) numbers of trials.
    """
    label, warnings = resp.label, []
    if resp.kind == "cbind":
        s, f = resp.parts
        negative = (s < 0) | (f < 0)
        if negative.any():
            raise DataError(
                f"response '{label}' has negative counts in {int(negative.sum())} rows "
                f"{_rows_text(negative, rows)}"
            )
        fractional = ~(_is_integral(s) & _is_integral(f))
        if fractional.any():
            raise DataError(
                f"response '{label}' has non-integer counts in {int(fractional.sum())} rows "
                f"{_rows_text(fractional, rows)}"
            )
        total = s + f
        empty = total == 0
        if empty.any():
            raise DataError(
                f"response '{label}' has zero trials (successes + failures = 0) in "
                f"{int(empty.sum())} rows {_rows_text(empty, rows)}"
            )
        weights = total if user_weights is None else total * user_weights
        return s / total, weights, warnings
    if resp.kind == "factor":
        levels = resp.factor.levels
        if len(levels) != 2:
            raise DataError(
                f"response '{label}' has {len(levels)} levels ({', '.join(levels[:5])}); "
                "a factor response for family 'binomial' needs exactly 2 (the first is failure)"
            )
        y = (resp.factor.codes == 1).astype(np.float64)
        weights = np.ones_like(y) if user_weights is None else user_weights
        return y, weights, warnings
    (y,) = resp.parts
    outside = (y < 0) | (y > 1)
    if outside.any():
        raise DataError(
            f"response '{label}' for family 'binomial' must be 0/1 or a proportion in [0, 1]; "
            f"{int(outside.sum())} rows are outside [0, 1] {_rows_text(outside, rows)}"
        )
    if user_weights is None:
        weights = np.ones_like(y)
    else:
        nonpositive = user_weights <= 0
        if nonpositive.any():
            raise DataError(
                f"weights (numbers of trials) for the binomial proportion response '{label}' "
                f"must be positive; {int(nonpositive.sum())} rows are <= 0 "
                f"{_rows_text(nonpositive, rows)}"
            )
        weights = user_weights
    successes = y * weights
    if np.any(np.abs(successes - np.rint(successes)) > 1e-3):
        warnings.append(f"non-integer #successes in a binomial glm! (response '{label}')")
    return y, weights, warnings


def poisson_response(resp: _Response, rows) -> np.ndarray:
    """Counts for family 'poisson': numeric, non-negative, integer."""
    if resp.kind != "numeric":
        what = "cbind()" if resp.kind == "cbind" else "a factor/string column"
        raise DataError(f"response '{resp.label}' is {what}; family 'poisson' needs numeric counts")
    (y,) = resp.parts
    negative = y < 0
    if negative.any():
        raise DataError(
            f"response '{resp.label}' for family 'poisson' must be non-negative counts; "
            f"{int(negative.sum())} rows are negative {_rows_text(negative, rows)}"
        )
    fractional = ~_is_integral(y)
    if fractional.any():
        raise DataError(
            f"response '{resp.label}' for family 'poisson' must be integer counts; "
            f"{int(fractional.sum())} rows are not integers {_rows_text(fractional, rows)}"
        )
    return y


def gaussian_response(resp: _Response, family: str) -> np.ndarray:
    """A numeric response (Gaussian and other non-binomial, non-Poisson families)."""
    if resp.kind != "numeric":
        what = "cbind()" if resp.kind == "cbind" else "a factor/string column"
        raise DataError(f"response '{resp.label}' is {what}; family '{family}' needs a numeric response")
    return resp.parts[0]


def _evaluate_response(parsed: ParsedFormula, ev: Evaluator, family: str):
    node = _unparen(parsed.response)
    label = parsed.response_label
    if isinstance(node, Call) and node.func == "cbind":
        if family != "binomial":
            raise DataError(f"response '{label}' uses cbind(), which needs family 'binomial', not '{family}'")
        return _Response("cbind", label, (ev.evaluate(node.args[0]), ev.evaluate(node.args[1])))
    if isinstance(node, Name):
        series = ev.series(node.name)
        if is_factor_column(series) and not pd.api.types.is_bool_dtype(series.dtype):
            return _Response("factor", label, factor=factor_codes(series))
    if not any(isinstance(sub, Name) for sub in iter_nodes(node)):
        raise FormulaError(f"the response '{label}' references no column in formula {parsed.text!r}")
    return _Response("numeric", label, (ev.evaluate(node),))


# ------------------------------------------------------------------ variables
class _Variables:
    """Evaluated variables of the model matrices, shared across fixed and random parts."""

    def __init__(self, ev: Evaluator):
        self.ev = ev
        self.factors: dict[str, Factor] = {}
        self.numeric: dict[Node, np.ndarray] = {}

    def load(self, terms: ModelTerms) -> None:
        for idx in terms.used_variables:
            node = terms.variables[idx]
            if isinstance(node, Name) and is_factor_column(self.ev.series(node.name)):
                if node.name not in self.factors:
                    self.factors[node.name] = factor_codes(self.ev.series(node.name), logical_full=True)
            elif node not in self.numeric:
                self.numeric[node] = self.ev.evaluate(node)

    def subset(self, keep: np.ndarray | None) -> None:
        if keep is None:
            return
        self.numeric = {node: values[keep] for node, values in self.numeric.items()}
        self.factors = {
            name: subset_factor(f, keep, drop_unused=not is_logical(self.ev.series(name)))
            for name, f in self.factors.items()
        }

    def for_terms(self, terms: ModelTerms):
        numeric, factors = {}, {}
        for idx in terms.used_variables:
            node = terms.variables[idx]
            if isinstance(node, Name) and node.name in self.factors:
                factor = self.factors[node.name]
                check_factor_levels(node.name, factor)
                factors[idx] = factor
            else:
                numeric[idx] = self.numeric[node]
        return numeric, factors


def _group_factor(node: Node, ev: Evaluator, keep, cache: dict) -> Factor:
    if node in cache:
        return cache[node]
    if isinstance(node, Paren):
        result = _group_factor(node.expr, ev, keep, cache)
    elif isinstance(node, Name):
        result = subset_factor(factor_codes(ev.series(node.name)), keep)
    elif isinstance(node, Binary) and node.op == ":":
        result = interaction(
            _group_factor(node.left, ev, keep, cache), _group_factor(node.right, ev, keep, cache)
        )
    else:  # pragma: no cover - rejected by the parser
        raise FormulaError(f"invalid grouping factor {node!r}")
    cache[node] = result
    return result


# ------------------------------------------------------------------ build_design
def build_design(
    formula: str | ParsedFormula,
    data,
    family: str = "gaussian",
    *,
    weights=None,
    offset=None,
    na_action: str = "error",
) -> Design:
    """Build the :class:`fitting.design.Design` for a formula and a table.

    Parameters
    ----------
    formula : str or ParsedFormula
        lme4-style formula, e.g. ``"cbind(incidence, size - incidence) ~ period +
        (1 | herd)"``.
    data : pandas.DataFrame or pyarrow.Table
        The observations. Categorical, string/object and bool columns are factors
        (treatment contrasts, first level is the reference); numeric columns are
        covariates.
    family : str
        ``"gaussian"``, ``"binomial"``, ``"poisson"`` (used for response handling).
    weights, offset : None, str or array-like of length n
        Prior weights / offset on the linear-predictor scale: a column name or values.
    na_action : {"error", "omit"}
        What to do with rows having missing/non-finite values in any used column.

    Returns
    -------
    Design

    Raises
    ------
    FormulaError
        Unparseable formula or unknown column.
    DataError
        Empty data, missing values (``na_action="error"``), invalid response, too few
        grouping levels, ...

    Examples
    --------
    >>> d = build_design("Reaction ~ Days + (Days | Subject)", sleepstudy)  # doctest: +SKIP
    >>> d.x_names, d.re_terms[0].term_names  # doctest: +SKIP
    (('(Intercept)', 'Days'), ('(Intercept)', 'Days'))
    """
    parsed = formula if isinstance(formula, ParsedFormula) else parse_formula(formula)
    fam = family_name(family)
    check_na_action(na_action)
    extra = tuple(a for a in (weights, offset) if isinstance(a, str))
    frame, available = as_frame(data, parsed.columns + extra)
    check_columns(parsed, available, weights=weights, offset=offset)
    n_all = len(frame)
    check_nonempty(n_all)
    scale_info: dict = {}
    ev = Evaluator(frame, scale_info)
    warnings = list(parsed.warnings)

    # Stage 1: evaluate everything on all rows (R evaluates the model frame first).
    user_w = vector_argument(weights, frame, n_all, "weights")
    user_off = vector_argument(offset, frame, n_all, "offset")
    resp = _evaluate_response(parsed, ev, fam)
    variables = _Variables(ev)
    variables.load(parsed.fixed)
    for term in parsed.random:
        variables.load(term.lhs)
    formula_offsets = [ev.evaluate(node) for node in parsed.fixed.offsets]

    problems: list[tuple[str, np.ndarray]] = []
    raw_bad = np.zeros(n_all, dtype=bool)
    for name in parsed.columns:
        mask = missing_mask(ev.series(name))
        problems.append((f"column '{name}'", mask))
        raw_bad |= mask
    for arg in (user_w, user_off):
        if arg is not None:
            problems.append((arg[0], ~np.isfinite(arg[1])))
    derived = [(resp.label, values) for values in resp.parts]
    derived += [(node, values) for node, values in zip(parsed.fixed.offsets, formula_offsets)]
    derived += [(node, values) for node, values in variables.numeric.items() if not isinstance(node, Name)]
    for what, values in derived:
        mask = ~np.isfinite(values) & ~raw_bad
        if mask.any():  # deparse only on the error path
            label = what if isinstance(what, str) else deparse(what)
            if any(node is what for node in parsed.fixed.offsets):
                label = f"offset({label})"
            problems.append((f"'{label}'", mask))
    keep, na_warning = check_missing(problems, n_all, na_action)
    if na_warning:
        warnings.append(na_warning)

    # Stage 2: subset rows and validate.
    rows = None if keep is None else np.flatnonzero(keep)
    n = n_all if keep is None else int(keep.sum())

    def sub(values):
        return values if keep is None else values[keep]

    resp.parts = tuple(sub(p) for p in resp.parts)
    if resp.factor is not None:
        resp.factor = subset_factor(resp.factor, keep)
    w_values = None if user_w is None else sub(user_w[1])
    if w_values is not None:
        check_weights(w_values, user_w[0], rows)
    if fam == "binomial":
        y, prior, resp_warnings = binomial_response(resp, w_values, rows)
        warnings.extend(resp_warnings)
    else:
        y = poisson_response(resp, rows) if fam == "poisson" else gaussian_response(resp, fam)
        prior = np.ones(n) if w_values is None else w_values
    total_offset = np.zeros(n)
    for values in formula_offsets:
        total_offset = total_offset + sub(values)
    if user_off is not None:
        total_offset = total_offset + sub(user_off[1])

    variables.subset(keep)
    numeric, factors = variables.for_terms(parsed.fixed)
    X, names = model_matrix(parsed.fixed, n, numeric, factors)
    X, x_names, dropped, rank_warning = drop_aliased(X, names)
    if rank_warning:
        warnings.append(rank_warning)

    factor_levels = {name: f.levels for name, f in variables.factors.items()}
    bernoulli = fam == "binomial" and bool(np.all(prior == 1.0))
    group_cache: dict = {}
    re_terms = []
    for term in parsed.random:
        numeric, factors = variables.for_terms(term.lhs)
        Z, z_names = model_matrix(term.lhs, n, numeric, factors)
        group = _group_factor(term.group, ev, keep, group_cache)
        check_grouping_levels(term.text, term.group_name, len(group.levels), n, Z.shape[1], fam, bernoulli)
        for name_node in iter_nodes(term.group):
            if isinstance(name_node, Name) and name_node.name not in factor_levels:
                factor_levels[name_node.name] = _group_factor(name_node, ev, keep, group_cache).levels
        re_terms.append(ReTerm(term.group_name, group.levels, group.codes, tuple(z_names), Z))

    return Design(
        response=parsed.response_label,
        y=np.ascontiguousarray(y, dtype=np.float64),
        weights=np.ascontiguousarray(prior, dtype=np.float64),
        offset=np.ascontiguousarray(total_offset, dtype=np.float64),
        X=X,
        x_names=x_names,
        re_terms=tuple(re_terms),
        dropped=dropped,
        factor_levels=factor_levels,
        scale_info=scale_info,
        warnings=tuple(warnings),
    )


from fitting.newdata import DesignInfo, NewModelMatrices, design_info, new_model_matrices  # noqa: E402

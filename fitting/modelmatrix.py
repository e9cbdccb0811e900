"""Vectorised building blocks of the model frame: factors, atoms, model matrices.

Everything here works on whole columns (pandas/numpy), never row by row:

* :func:`factor_codes` turns a column into R-style factor codes and level labels
  (categorical order; otherwise sorted values, numeric-like strings sorted as strings;
  ``bool`` -> ``FALSE``/``TRUE``);
* :class:`Evaluator` evaluates arithmetic atoms (``I(age^2)``, ``log(x)``,
  ``scale(HEIGHT)``) and records or re-applies ``scale``/``center`` constants;
* :func:`model_matrix` builds a model matrix from :class:`fitting.terms.ModelTerms`
  with R's treatment contrasts and ``model.matrix`` column names;
* :func:`aliased_columns` finds linearly dependent columns the way R's LINPACK
  ``dqrdc2`` (used by ``lm`` and lme4's ``chkRank.drop.cols``) does: a column is
  dropped when its residual after projecting on the earlier kept columns falls below
  ``tol`` times its own norm, so earlier columns are always kept.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fitting.errors import DataError
from fitting.formula_nodes import Binary, Call, Name, Node, Number, Paren, Unary, deparse, format_r_number
from fitting.terms import ModelTerms

__all__ = [
    "Factor",
    "as_frame",
    "unknown_column_message",
    "vector_argument",
    "Evaluator",
    "is_factor_column",
    "is_logical",
    "factor_codes",
    "subset_factor",
    "missing_mask",
    "numeric_column",
    "r_labels",
    "interaction",
    "model_matrix",
    "aliased_columns",
]

_LOGICAL_LEVELS = ("FALSE", "TRUE")


@dataclass(frozen=True)
class Factor:
    """A factor: int64 codes into ``levels`` (-1 = missing or unknown level)."""

    codes: np.ndarray
    levels: tuple[str, ...]


def as_frame(data, columns) -> tuple[pd.DataFrame, list]:
    """The data as a pandas DataFrame (a pyarrow Table is converted, needed columns only).

    Parameters
    ----------
    data : pandas.DataFrame or pyarrow.Table
    columns : iterable of str
        Columns the model needs.

    Returns
    -------
    frame : pandas.DataFrame
    available : list
        All column names of ``data`` (for unknown-column messages).
    """
    if isinstance(data, pd.DataFrame):
        return data, list(data.columns)
    if hasattr(data, "to_pandas") and hasattr(data, "column_names"):
        available = list(data.column_names)
        needed = [c for c in dict.fromkeys(columns) if c in available]
        table = data.select(needed) if hasattr(data, "select") else data
        return table.to_pandas(), available
    raise DataError(f"data must be a pandas DataFrame or a pyarrow Table, got {type(data).__name__}")


def unknown_column_message(name: str, available: list, what: str) -> str:
    """``unknown column 'agee' in formula; did you mean 'age'?`` (difflib suggestion)."""
    names = [str(c) for c in available]
    close = difflib.get_close_matches(name, names, n=1)
    if close:
        return f"unknown column '{name}' in {what}; did you mean '{close[0]}'?"
    listed = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
    return f"unknown column '{name}' in {what}; available columns: {listed}"


def vector_argument(arg, frame: pd.DataFrame, n: int, what: str):
    """(label, float values) of a weights/offset argument (column name or values), or None."""
    if arg is None:
        return None
    if isinstance(arg, str):
        series = frame[arg]
        if is_factor_column(series) and not pd.api.types.is_bool_dtype(series.dtype):
            raise DataError(f"{what} column '{arg}' is not numeric (dtype {series.dtype})")
        values = series.to_numpy(dtype=np.float64, na_value=np.nan)
        return f"column '{arg}' ({what})", values
    try:
        values = np.asarray(arg, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{what} must be numeric: {exc}") from None
    if values.shape[0] != n:
        raise DataError(f"{what} has length {values.shape[0]} but the data has {n} rows")
    return what, values


def is_factor_column(series: pd.Series) -> bool:
    """Whether a column is a factor (categorical, string/object or bool), not a covariate.

    Parameters
    ----------
    series : pandas.Series

    Returns
    -------
    bool
    """
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        return True
    if pd.api.types.is_bool_dtype(dtype):
        return True
    return not (pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_datetime64_any_dtype(dtype))


def is_logical(series: pd.Series) -> bool:
    return pd.api.types.is_bool_dtype(series.dtype) and not isinstance(
        series.dtype, pd.CategoricalDtype
    )


def missing_mask(series: pd.Series) -> np.ndarray:
    """Rows that are missing (None/NaN/NA) or, for numeric columns, non-finite.

    Parameters
    ----------
    series : pandas.Series

    Returns
    -------
    ndarray of bool
    """
    dtype = series.dtype
    if isinstance(dtype, np.dtype):
        if dtype.kind == "f":
            return ~np.isfinite(series.to_numpy())
        if dtype.kind in "iub":
            return np.zeros(len(series), dtype=bool)
        if dtype.kind == "O":
            return pd.isna(series.to_numpy())
    if isinstance(dtype, pd.CategoricalDtype):
        return series.array.codes < 0
    mask = series.isna().to_numpy()
    if pd.api.types.is_float_dtype(dtype):  # pandas nullable Float64
        values = series.to_numpy(dtype=float, na_value=np.nan)
        mask = mask | ~np.isfinite(values)
    return mask


def numeric_column(series: pd.Series, name: str, where: str) -> np.ndarray:
    """A column as float64 (bool -> 0/1; missing -> NaN), or a DataError if not numeric.

    Parameters
    ----------
    series : pandas.Series
    name : str
        Column name (for messages).
    where : str
        Expression using it (for messages).

    Returns
    -------
    ndarray of float64
    """
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype) or not (
        pd.api.types.is_numeric_dtype(dtype) or pd.api.types.is_bool_dtype(dtype)
    ):
        raise DataError(
            f"column '{name}' is not numeric (dtype {dtype}) and cannot be used in '{where}'"
        )
    if isinstance(dtype, np.dtype):
        return series.to_numpy(dtype=np.float64)
    return series.to_numpy(dtype=np.float64, na_value=np.nan)


def r_labels(values) -> list[str]:
    """Level labels as R's ``as.character`` would print them (``1`` not ``1.0``).

    Parameters
    ----------
    values : iterable
        Distinct level values.

    Returns
    -------
    list of str
    """
    values = list(values)
    if all(type(value) is str for value in values):
        return values
    out = []
    for value in values:
        if isinstance(value, (bool, np.bool_)):
            out.append("TRUE" if value else "FALSE")
        elif isinstance(value, (int, np.integer)):
            out.append(str(int(value)))
        elif isinstance(value, (float, np.floating)):
            out.append(format_r_number(float(value)))
        else:
            out.append(str(value))
    return out


def _compact(codes: np.ndarray, levels: list[str]) -> Factor:
    """Drop levels that no (non-missing) row uses, keeping the level order."""
    valid = codes >= 0
    used = np.bincount(codes[valid], minlength=len(levels)) > 0
    if used.all():
        return Factor(codes, tuple(levels))
    remap = np.cumsum(used) - 1
    new = np.where(valid, remap[np.where(valid, codes, 0)], -1).astype(np.int64)
    return Factor(new, tuple(lv for lv, u in zip(levels, used) if u))


def subset_factor(factor: Factor, keep: np.ndarray | None, *, drop_unused: bool = True) -> Factor:
    """Rows ``keep`` of a factor, dropping levels no kept row uses (R's ``droplevels``).

    Parameters
    ----------
    factor : Factor
    keep : ndarray of bool or None
        Rows to keep (None keeps all).
    drop_unused : bool
        Drop unused levels (False keeps the levels, for ``bool`` in model matrices).

    Returns
    -------
    Factor
    """
    codes = factor.codes if keep is None else factor.codes[keep]
    if not drop_unused:
        return Factor(codes, factor.levels)
    return _compact(codes, list(factor.levels))


def factor_codes(series: pd.Series, *, logical_full: bool = False) -> Factor:
    """Code a column as an R factor with only the observed levels.

    Categorical columns keep their category order; bool columns have levels
    ``FALSE``, ``TRUE`` (both kept when ``logical_full``, as ``model.matrix`` does for
    logical variables); numeric columns sort numerically; other values sort by their
    label (so ``"10" < "2"``, as R sorts strings). Missing values get code -1.

    Parameters
    ----------
    series : pandas.Series
    logical_full : bool
        Keep both levels of a bool column even when one is unobserved.

    Returns
    -------
    Factor
    """
    dtype = series.dtype
    if isinstance(dtype, pd.CategoricalDtype):
        codes = series.array.codes.astype(np.int64)
        return _compact(codes, r_labels(dtype.categories.tolist()))
    if is_logical(series):
        if isinstance(dtype, np.dtype):
            codes = series.to_numpy().astype(np.int64)
        else:
            values = series.to_numpy(dtype=np.float64, na_value=np.nan)
            codes = np.where(np.isnan(values), -1, values).astype(np.int64)
        if logical_full:
            return Factor(codes, _LOGICAL_LEVELS)
        return _compact(codes, list(_LOGICAL_LEVELS))
    if pd.api.types.is_numeric_dtype(dtype):
        values = numeric_column(series, str(series.name), str(series.name))
        ok = np.isfinite(values)
        uniques, inverse = np.unique(values[ok], return_inverse=True)
        codes = np.full(len(values), -1, dtype=np.int64)
        codes[ok] = inverse
        if pd.api.types.is_integer_dtype(dtype):
            labels = [str(int(u)) for u in uniques]
        else:
            labels = r_labels(uniques)
        return Factor(codes, tuple(labels))
    raw_codes, uniques = pd.factorize(series, sort=False, use_na_sentinel=True)
    uniques = list(uniques)
    labels = r_labels(uniques)
    numeric = all(
        isinstance(u, (int, float, np.integer, np.floating)) and not isinstance(u, (bool, np.bool_))
        for u in uniques
    )
    # Merge values that print the same (1 and "1"), then sort the distinct labels.
    distinct = sorted(set(labels), key=(lambda s: float(s)) if numeric else None)
    position = {label: i for i, label in enumerate(distinct)}
    lookup = np.array([position[label] for label in labels] + [-1], dtype=np.int64)
    return Factor(lookup[np.asarray(raw_codes, dtype=np.int64)], tuple(distinct))


def interaction(left: Factor, right: Factor) -> Factor:
    """R's ``factor(a:b)``: observed combinations, ordered by ``a`` then ``b`` levels.

    Parameters
    ----------
    left, right : Factor

    Returns
    -------
    Factor
        Labels ``"a_level:b_level"``.
    """
    nr = max(len(right.levels), 1)
    valid = (left.codes >= 0) & (right.codes >= 0)
    combined = np.where(valid, left.codes * nr + right.codes, -1)
    uniques, inverse = np.unique(combined[valid], return_inverse=True)
    codes = np.full(len(combined), -1, dtype=np.int64)
    codes[valid] = inverse
    labels = tuple(f"{left.levels[u // nr]}:{right.levels[u % nr]}" for u in uniques.tolist())
    return Factor(codes, labels)


class Evaluator:
    """Evaluate numeric atoms of a formula on a data frame.

    Parameters
    ----------
    frame : pandas.DataFrame
        Data (all rows; scale constants are computed over the finite values, as R's
        ``scale()`` sees the whole model frame before ``na.omit``).
    scale_info : dict
        Filled with ``{"center": m, "scale": s}`` per ``scale(...)``/``center(...)``
        call when ``fitted`` is False; read from when True (new data).
    fitted : bool
        Re-apply stored constants instead of computing them.
    """

    def __init__(self, frame: pd.DataFrame, scale_info: dict, *, fitted: bool = False):
        self.frame = frame
        self.n = len(frame)
        self.scale_info = scale_info
        self.fitted = fitted
        self._cache: dict[Node, np.ndarray] = {}
        self._columns: dict[str, np.ndarray] = {}
        self._series: dict[str, pd.Series] = {}

    def series(self, name: str) -> pd.Series:
        """The column ``name`` (looked up once)."""
        series = self._series.get(name)
        if series is None:
            series = self._series[name] = self.frame[name]
        return series

    def evaluate(self, node: Node, where: str | None = None) -> np.ndarray:
        """Evaluate an arithmetic expression to a float64 vector of length ``n``.

        Parameters
        ----------
        node : Node
        where : str, optional
            Enclosing atom for messages (defaults to ``deparse(node)``).

        Returns
        -------
        ndarray of float64
        """
        cached = self._cache.get(node)
        if cached is not None:
            return cached
        where = where or deparse(node)
        with np.errstate(all="ignore"):
            value = self._eval(node, where)
        value = np.broadcast_to(np.asarray(value, dtype=np.float64), (self.n,))
        self._cache[node] = value
        return value

    def _eval(self, node: Node, where: str):
        if isinstance(node, Name):
            if node.name not in self._columns:
                self._columns[node.name] = numeric_column(self.series(node.name), node.name, where)
            return self._columns[node.name]
        if isinstance(node, Number):
            return node.value
        if isinstance(node, Paren):
            return self._eval(node.expr, where)
        if isinstance(node, Unary):
            value = self._eval(node.operand, where)
            return -value if node.op == "-" else value
        if isinstance(node, Binary):
            a = self._eval(node.left, where)
            b = self._eval(node.right, where)
            if node.op == "+":
                return a + b
            if node.op == "-":
                return a - b
            if node.op == "*":
                return a * b
            if node.op == "/":
                return np.divide(a, b)
            if node.op == "^":
                return np.power(np.asarray(a, dtype=float), b)
            raise DataError(f"operator '{node.op}' cannot be evaluated in '{where}'")
        if isinstance(node, Call):
            return self._call(node, where)
        raise DataError(f"cannot evaluate '{deparse(node)}'")  # pragma: no cover

    def _call(self, node: Call, where: str):
        func = node.func
        if func in ("I", "offset"):
            return self._eval(node.args[0], where)
        x = np.broadcast_to(np.asarray(self._eval(node.args[0], where), dtype=float), (self.n,))
        if func == "log":
            return np.log(x)
        if func == "exp":
            return np.exp(x)
        if func == "sqrt":
            return np.sqrt(x)
        if func == "log1p":
            return np.log1p(x)
        if func == "abs":
            return np.abs(x)
        if func in ("scale", "center"):
            key = deparse(node)
            if self.fitted:
                if key not in self.scale_info:
                    raise DataError(f"no stored constants for '{key}' (needed for new data)")
                consts = self.scale_info[key]
            else:
                consts = _scale_constants(x, key, with_scale=func == "scale")
                self.scale_info[key] = consts
            return (x - consts["center"]) / consts["scale"]
        raise DataError(f"cannot evaluate function '{func}' in '{where}'")  # pragma: no cover


def _scale_constants(x: np.ndarray, key: str, *, with_scale: bool) -> dict:
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        raise DataError(f"cannot compute '{key}': no finite values")
    center = float(finite.mean())
    scale = 1.0
    if with_scale:
        if finite.size < 2:
            raise DataError(f"cannot compute '{key}': needs at least 2 finite values")
        scale = float(np.sqrt(np.sum((finite - center) ** 2) / (finite.size - 1)))
        if not scale > 0:
            raise DataError(f"cannot compute '{key}': the values are constant (sd = 0)")
    return {"center": center, "scale": scale}


def _block(var_label: str, values, factor: Factor | None, code: int) -> tuple[np.ndarray, list[str]]:
    """Columns of one variable within one term (numeric, contrasts or indicators)."""
    if factor is None:
        return values.reshape(-1, 1), [var_label]
    nlev = len(factor.levels)
    first = 1 if code == 1 else 0
    indicators = (factor.codes[:, None] == np.arange(first, nlev)[None, :]).astype(np.float64)
    return indicators, [var_label + level for level in factor.levels[first:]]


def model_matrix(
    terms: ModelTerms,
    n: int,
    numeric: dict[int, np.ndarray],
    factors: dict[int, Factor],
) -> tuple[np.ndarray, list[str]]:
    """Build a model matrix as R's ``model.matrix`` (treatment contrasts).

    Parameters
    ----------
    terms : ModelTerms
        Expanded terms.
    n : int
        Number of rows.
    numeric : dict
        Variable index -> float vector, for covariate variables used in terms.
    factors : dict
        Variable index -> :class:`Factor`, for factor variables used in terms.

    Returns
    -------
    X : ndarray (n, p)
    names : list of str
        Column names (``"(Intercept)"``, ``"period2"``, ``"x:fb"``, ...).

    Notes
    -----
    Within an interaction the earlier variable varies fastest, as in R. Without an
    intercept, the first factor found (terms in order, variables in order) is coded by
    indicators instead of contrasts, which is ``model.matrix``'s adjustment.
    """
    codes = [list(c) for c in terms.codes]
    if not terms.intercept:
        done = False
        for j, term in enumerate(terms.terms):
            for k, var in enumerate(term):
                if var in factors and len(factors[var].levels) > 1:
                    codes[j][k] = 2
                    done = True
                    break
            if done:
                break
    blocks: list[np.ndarray] = []
    names: list[str] = []
    if terms.intercept:
        blocks.append(np.ones((n, 1)))
        names.append("(Intercept)")
    for j, term in enumerate(terms.terms):
        mat, mat_names = None, None
        for k, var in enumerate(term):
            block, block_names = _block(
                terms.labels[var], numeric.get(var), factors.get(var), codes[j][k]
            )
            if mat is None:
                mat, mat_names = block, block_names
            else:
                a, b = mat.shape[1], block.shape[1]
                mat = (mat[:, None, :] * block[:, :, None]).reshape(n, a * b)
                mat_names = [f"{m}:{v}" for v in block_names for m in mat_names]
        blocks.append(mat)
        names.extend(mat_names)
    if not blocks:
        return np.empty((n, 0)), []
    return np.ascontiguousarray(np.hstack(blocks)), names


def aliased_columns(X: np.ndarray, tol: float = 1e-7) -> list[int]:
    """Indices of columns that are (numerically) linear combinations of earlier ones.

    Reproduces R's ``qr(X, tol = 1e-7, LAPACK = FALSE)`` (LINPACK ``dqrdc2`` with
    limited pivoting), which lme4 and ``lm`` use: column ``j`` is aliased when the
    norm of its residual on the previously kept columns is below ``tol`` times its
    original norm (all-zero columns are always aliased). Unlike LAPACK's full column
    pivoting (``scipy.linalg.qr(pivoting=True)``), this keeps the earlier columns,
    which is what makes the dropped names match R.

    A Cholesky factor of the column-normalised Gram matrix (p x p) screens the common
    full-rank case: its diagonal is each column's relative residual on the earlier
    columns, and when all exceed ``1e-4`` (far above ``tol``, so the squaring of the
    condition number cannot matter) nothing is aliased. Otherwise an exact sequential
    Gram-Schmidt pass (with reorthogonalisation) decides, column by column.

    Parameters
    ----------
    X : ndarray (n, p)
    tol : float
        Relative tolerance.

    Returns
    -------
    list of int
    """
    n, p = X.shape
    if p == 0:
        return []
    norms = np.sqrt(np.einsum("ij,ij->j", X, X))
    if p <= n and np.all(norms > 0) and np.all(np.isfinite(norms)):
        scaled = X / norms
        try:
            chol = np.linalg.cholesky(scaled.T @ scaled)
        except np.linalg.LinAlgError:
            chol = None
        if chol is not None and np.all(np.diag(chol) > 1e-4):
            return []
    return _sequential_aliased(X, norms, tol)


def _sequential_aliased(X: np.ndarray, norms: np.ndarray, tol: float) -> list[int]:
    """dqrdc2's decision, column by column (see :func:`aliased_columns`)."""
    n, p = X.shape
    reference = np.where(norms > 0, norms, 1.0)
    basis = np.empty((n, min(n, p)))
    rank = 0
    dropped = []
    for j in range(p):
        v = X[:, j].astype(np.float64, copy=True)
        if rank:
            q = basis[:, :rank]
            v -= q @ (q.T @ v)
            v -= q @ (q.T @ v)  # second pass: classical Gram-Schmidt with reorthogonalisation
        norm = float(np.sqrt(v @ v))
        if rank >= n or not norm >= tol * reference[j]:
            dropped.append(j)
            continue
        basis[:, rank] = v / norm
        rank += 1
    return dropped

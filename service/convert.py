"""Turn the outcome of one stratum's fit into a :class:`storage.records.StratumResult`.

This is the only place where a :class:`fitting.result.FitResult` (or the exception a fit
raised) is translated into the plain records that cross the service/storage boundary.
Everything produced here is JSON-serialisable and free of NumPy scalars, NaN and
infinities (they become ``None``), so every storage backend can write it verbatim. The
child tables (coefficients, variance components, conditional modes) are in the columnar
form of :class:`~storage.records.StratumResult` (``{column: list}``): a task's results
then pickle, travel and unpickle as a few lists per stratum rather than one dict per row,
and the coordinator validates them a column at a time.

Outcome rules
-------------
- a fit whose ``diagnostics.converged`` is true → ``"succeeded"``;
- a fit that did not converge → ``"not_converged"`` (estimates and diagnostics stored,
  flagged);
- a :class:`fitting.errors.FittingError` → ``"failed"`` with the error class and message
  (the message names the culprit);
- any other exception → ``"failed"`` with the error class, message and the tail of the
  traceback (an unexpected error is a bug, and the tail says where).
"""
from __future__ import annotations

import dataclasses
import math
import traceback
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from fitting.errors import FittingError
from storage.records import StratumResult

__all__ = [
    "to_stratum_result",
    "failed_result",
    "fit_columns",
    "jsonable",
    "SUCCEEDED",
    "NOT_CONVERGED",
    "FAILED",
    "TRACEBACK_TAIL_LINES",
]

SUCCEEDED = "succeeded"
NOT_CONVERGED = "not_converged"
FAILED = "failed"

#: Lines of traceback kept (from the end) for unexpected exceptions.
TRACEBACK_TAIL_LINES = 12

_COEF_COLUMNS = ("term", "estimate", "std_error", "statistic", "p_value", "conf_low", "conf_high")
_VAR_COLUMNS = ("grp", "term1", "term2", "variance", "sd", "correlation")
_RANEF_COLUMNS = ("grp", "level", "term", "mode", "cond_sd")
_PLAIN_TEXT = frozenset({str, type(None)})  # values a text column ships as they are
_OPTINFO_FIELDS: tuple[str, ...] = ("optimizer", "evaluations", "elapsed", "final_gradient",
                                    "message", "initial", "final", "converged_code", "extra")


def jsonable(value: Any) -> Any:
    """Return ``value`` as plain JSON-compatible Python, NaN/inf replaced by ``None``.

    Parameters
    ----------
    value : Any
        Scalars (Python or NumPy), mappings, sequences, arrays, ``pandas.NA``.

    Returns
    -------
    Any
        ``None``, bool, int, float (finite), str, list or dict (string keys) built
        recursively; unknown objects become their ``str``.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if hasattr(value, "to_dict") and callable(value.to_dict):
        return jsonable(value.to_dict())
    try:
        import pandas as pd

        if value is pd.NA or value is pd.NaT:
            return None
        if isinstance(value, pd.Timestamp):
            return value.isoformat()
    except ImportError:  # pragma: no cover - pandas is a dependency
        pass
    return str(value)


def _column_getter(frame: Any):
    """``get(position)`` → the column's values (array), without building a Series.

    ``DataFrame._get_column_array`` is ~10x cheaper than ``frame[name]`` (pandas 2-3);
    fall back to ``frame.iloc[:, i].array`` if a pandas version lacks it.
    """
    get = getattr(frame, "_get_column_array", None)
    if get is not None:
        return get
    return lambda i: frame.iloc[:, i].array


def _columns(frame: Any, columns: tuple[str, ...], rename: Mapping[str, str]
             ) -> dict[str, list] | list:
    """``frame`` restricted to ``columns`` (after ``rename``) as ``{column: values}``.

    The columnar form of a :class:`~storage.records.StratumResult` child table: one list
    per column (finite floats, NaN/inf as ``None``; plain ints, bools and strings), the
    columns the frame lacks left out (stored as NULL). ``[]`` for an empty frame.
    """
    if frame is None or len(frame) == 0:
        return []
    source: dict[str, int] = {}
    # the names through Arrow like the text columns (iterating a pandas 3 string Index
    # costs ~4 us per frame, as much as converting two of its columns)
    names = _text_list(frame.columns.array)
    for i, name in enumerate(names):  # column-wise: one conversion per column
        source.setdefault(rename.get(name, name), i)
    get = _column_getter(frame)
    out: dict[str, list] = {}
    for c in columns:
        if c not in source:
            continue
        col = get(source[c])
        dtype = col.dtype
        plain = isinstance(dtype, np.dtype)  # not a nullable extension dtype
        if plain and dtype.kind == "f":  # finite floats as they are, NaN/inf → None
            lst = np.asarray(col, dtype=float).tolist()
            total = sum(lst)
            if total - total != 0.0:  # a NaN or inf somewhere (or a sum that overflowed)
                lst = [v if math.isfinite(v) else None for v in lst]
            out[c] = lst
        elif plain and dtype.kind in "iub":
            out[c] = np.asarray(col).tolist()
        else:
            lst = _text_list(col)
            out[c] = lst if set(map(type, lst)) <= _PLAIN_TEXT else [jsonable(v) for v in lst]
    return out


def _text_list(col: Any) -> list:
    """A non-numeric column's values as a list (missing text as ``None``).

    Arrow-backed string arrays (pandas' default string dtype with pyarrow) convert
    through Arrow, ~3x cheaper than their ``tolist`` (which iterates in Python); any
    other array uses ``tolist``.
    """
    if isinstance(getattr(col, "dtype", None), pd.StringDtype) and hasattr(col, "__arrow_array__"):
        try:
            return pa.array(col).to_pylist()
        except (pa.ArrowException, TypeError, ValueError):
            pass
    return col.tolist()


def _record_dict(obj: Any) -> dict | None:
    """``jsonable(obj.to_dict())`` for the fitter's own :class:`~fitting.result.OptInfo`,
    in one pass.

    ``OptInfo.to_dict`` deep-copies the record with :func:`dataclasses.asdict` and then
    converts it, and :func:`jsonable` converts it once more: three walks of the same
    values per stratum. Walking the fields directly gives the same dict (tuples →
    lists, NumPy scalars unwrapped, NaN/inf → ``None``; nested dataclasses as dicts).
    ``None`` for anything else (the caller then uses ``to_dict``).
    """
    from fitting.result import OptInfo

    if type(obj) is not OptInfo:
        return None
    return {f: _plain_json(getattr(obj, f)) for f in _OPTINFO_FIELDS}


def _plain_json(value: Any) -> Any:
    """:func:`jsonable` of what ``dataclasses.asdict`` + ``_jsonable`` would make of ``value``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, float):  # np.float64 too
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, (list, tuple)):
        return [_plain_json(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain_json(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain_json(dataclasses.asdict(value))
    return jsonable(value)


def fit_columns(fit: Any) -> dict[str, Any]:
    """Columns of the ``fits`` table for one :class:`~fitting.result.FitResult`.

    Parameters
    ----------
    fit : FitResult
        A finished fit (converged or not).

    Returns
    -------
    dict
        nobs, ngroups, loglik, aic, bic, deviance, converged, singular, max_grad,
        evaluations, elapsed, warnings, optinfo, formula, family, link, method, reml,
        sigma, hessian_pd (``storage.rows.FIT_COLUMNS``). The optimisation record is
        stored verbatim (``OptInfo.to_dict()``); the diagnostics are spread over
        converged/singular/max_grad/hessian_pd/warnings.
    """
    diag = fit.diagnostics
    opt = fit.optinfo
    optinfo = _record_dict(opt)
    if optinfo is None:
        optinfo = jsonable(opt.to_dict()) if hasattr(opt, "to_dict") else jsonable(opt)
    hessian_pd = getattr(diag, "hessian_pd", None) if hasattr(diag, "to_dict") else None
    return {
        "nobs": jsonable(fit.nobs),
        "ngroups": jsonable(dict(fit.ngroups or {})),
        "loglik": jsonable(fit.loglik),
        "aic": jsonable(fit.aic),
        "bic": jsonable(fit.bic),
        "deviance": jsonable(fit.deviance),
        "converged": bool(diag.converged),
        "singular": bool(diag.singular),
        "max_grad": jsonable(diag.max_grad),
        "evaluations": jsonable(getattr(opt, "evaluations", None)),
        "elapsed": jsonable(getattr(opt, "elapsed", None)),
        "warnings": [str(w) for w in (diag.warnings or ())],
        "optinfo": optinfo,
        "formula": str(fit.formula),
        "family": jsonable(fit.family),
        "link": jsonable(fit.link),
        "method": jsonable(fit.method),
        "reml": bool(getattr(fit, "reml", False)),
        "sigma": jsonable(getattr(fit, "sigma", None)),
        "hessian_pd": jsonable(hessian_pd),
    }


def failed_result(key: str, error_class: str, message: str) -> StratumResult:
    """A ``"failed"`` result carrying only the error class and message.

    Parameters
    ----------
    key : str
        Canonical stratum key.
    error_class : str
        Name of the exception class (or a short reason such as ``"EmptyStratum"``).
    message : str
        One human-readable message naming the culprit.

    Returns
    -------
    StratumResult
    """
    return StratumResult(
        key=key, status=FAILED, error_class=error_class, error_message=message
    )


def _exception_message(exc: BaseException) -> str:
    """Message for a failed stratum: the exception text, plus a traceback tail if unexpected."""
    text = str(exc) or type(exc).__name__
    if isinstance(exc, FittingError):
        return text
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    lines = "".join(tb).rstrip().splitlines()
    tail = "\n".join(lines[-TRACEBACK_TAIL_LINES:])
    return f"{text}\n{tail}" if tail else text


def to_stratum_result(
    key: str, fit_result_or_exception: Any, *, store_random_effects: bool = True
) -> StratumResult:
    """Convert a fit (or the exception it raised) into a :class:`StratumResult`.

    Parameters
    ----------
    key : str
        Canonical stratum key.
    fit_result_or_exception : FitResult or BaseException
        What :func:`fitting.fit` returned or raised for this stratum.
    store_random_effects : bool, default True
        Whether to include the conditional modes (``ranef`` rows).

    Returns
    -------
    StratumResult
        ``"succeeded"``, ``"not_converged"`` or ``"failed"`` (see module docstring).
    """
    obj = fit_result_or_exception
    if isinstance(obj, BaseException):
        return failed_result(key, type(obj).__name__, _exception_message(obj))
    try:
        fit = fit_columns(obj)
        coefficients = _columns(obj.fixed, _COEF_COLUMNS, {})
        variance = _columns(obj.varcorr, _VAR_COLUMNS, {"group": "grp"})
        ranef = (
            _columns(obj.ranef, _RANEF_COLUMNS, {"group": "grp"})
            if store_random_effects
            else []
        )
    except Exception as exc:  # a malformed FitResult is a bug: keep the stratum failed
        return failed_result(key, type(exc).__name__, _exception_message(exc))
    status = SUCCEEDED if fit["converged"] else NOT_CONVERGED
    return StratumResult(
        key=key,
        status=status,
        fit=fit,
        coefficients=coefficients,
        variance=variance,
        ranef=ranef,
    )

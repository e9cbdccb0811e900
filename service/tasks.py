"""What a Dask worker executes: read one slice, fit every stratum in it.

:func:`run_task` is a pure function of its (picklable) arguments: it reads the slice its
task describes, splits the rows by stratum with one vectorised ``groupby``, fits each
stratum with :func:`fitting.fit`, and returns one :class:`~storage.records.StratumResult`
per planned stratum. It never touches the database; the runner on the client side writes
what it returns.

A failing stratum never sinks its task: every per-stratum exception becomes a ``"failed"``
result (see :mod:`service.convert`). Only errors reading the slice itself (file missing,
I/O) propagate, so the runner can tell them apart and retry them.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from storage.records import StratumPlan, StratumResult

__all__ = ["run_task", "split_strata", "fit_stratum", "fit_batched", "warm_up", "WORKER_MODULES", "BATCHED",
           "EMPTY_STRATUM"]

#: ``error_class`` of a planned stratum with no rows in its slice.
EMPTY_STRATUM = "EmptyStratum"

#: Fit a task's strata together with ``fitting.fit_many`` (batched Newton, ~3x faster on
#: the demo's binomial random-intercept strata) instead of one ``fitting.fit`` each. On by
#: default: for one scalar random-effect term ``fit`` runs the same exact-Hessian Newton
#: iterates, so the stored results are the same; other structures fall back to ``fit``
#: inside ``fit_many``. ``STRATAFIT_BATCHED=0`` on the workers turns it off.
BATCHED = os.environ.get("STRATAFIT_BATCHED", "1") != "0"


def _plain(value: Any) -> Any:
    """A data value as the planner sees it: NumPy scalars unwrapped, missing → ``None``."""
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        try:
            value = value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, float) and value != value:  # NaN: an integer column with nulls
        return None
    return value


def split_strata(
    data: pd.DataFrame, plans: Sequence[StratumPlan], columns: Sequence[str]
) -> dict[str, pd.DataFrame]:
    """Split ``data`` into one frame per planned stratum (one vectorised ``groupby``).

    Each group's key is built with :func:`service.planner.stratum_key` from the data's
    own values, so it matches the planner's keys whatever the column types
    (categoricals, integers read back as floats because of nulls, dates).

    Parameters
    ----------
    data : DataFrame
        The rows of one slice (already filtered by the job's filters).
    plans : sequence of StratumPlan
        The strata this slice was planned for.
    columns : sequence of str
        Strata columns in spec order (``SliceDescriptor.strata_columns``).

    Returns
    -------
    dict
        Stratum key → its rows (index reset). A planned stratum without rows is
        absent; rows of strata not in ``plans`` are ignored.
    """
    from service.planner import stratum_key

    if not plans:
        return {}
    columns = list(columns)
    if not columns:  # a job without strata columns: the whole slice is the stratum
        return {plans[0].key: data.reset_index(drop=True)} if len(data) else {}
    missing = [c for c in columns if c not in data.columns]
    if missing:
        raise KeyError(f"strata column(s) {missing} not in the slice (columns: {list(data.columns)})")
    wanted = {p.key for p in plans}
    out: dict[str, pd.DataFrame] = {}
    grouped = data.groupby(columns, sort=False, dropna=False, observed=True)
    for group_values, index in grouped.indices.items():
        if not isinstance(group_values, tuple):
            group_values = (group_values,)
        key = stratum_key(columns, [_plain(v) for v in group_values])
        if key not in wanted:
            continue
        if len(index) and index[-1] - index[0] + 1 == len(index):  # contiguous rows: slice
            rows = data.iloc[int(index[0]):int(index[-1]) + 1].reset_index(drop=True)
        else:
            rows = data.take(index).reset_index(drop=True)
        if key in out:  # two raw values with one key (e.g. 1 and 1.0)
            rows = pd.concat([out[key], rows], ignore_index=True)
        out[key] = rows
    return out


def fit_stratum(
    key: str,
    data: pd.DataFrame,
    fit_kwargs: Mapping[str, Any],
    store_random_effects: bool,
) -> StratumResult:
    """Fit one stratum and convert the outcome; never raises for a bad stratum.

    Parameters
    ----------
    key : str
        Canonical stratum key.
    data : DataFrame
        The stratum's rows.
    fit_kwargs : mapping
        Keyword arguments of :func:`fitting.fit`, including ``formula``.
    store_random_effects : bool
        Keep the conditional modes in the result.

    Returns
    -------
    StratumResult
    """
    from service.convert import failed_result, to_stratum_result

    if len(data) == 0:
        return failed_result(key, EMPTY_STRATUM, f"empty stratum {key!r}: no rows to fit")
    import fitting

    kwargs = dict(fit_kwargs)
    formula = kwargs.pop("formula")
    try:
        outcome: Any = fitting.fit(formula, data, **kwargs)
    except Exception as exc:  # one bad stratum must not sink the task
        outcome = exc
    return to_stratum_result(key, outcome, store_random_effects=store_random_effects)


def fit_batched(
    data: pd.DataFrame,
    plans: Sequence[StratumPlan],
    columns: Sequence[str],
    fit_kwargs: Mapping[str, Any],
    store_random_effects: bool,
) -> dict[str, StratumResult] | None:
    """Fit the strata of one slice with ``fitting.fit_many``; ``None`` to fall back.

    Per-stratum failures stay isolated (``fit_many`` returns the error ``fit`` would
    raise for that stratum). Any error of the call as a whole, a missing ``fit_many``,
    a job without strata columns, or two raw values sharing one stratum key return
    ``None``: the caller then fits stratum by stratum.

    Returns
    -------
    dict or None
        Stratum key → result for the planned strata that have rows.
    """
    from service.convert import to_stratum_result
    from service.planner import stratum_key

    columns = list(columns)
    if not columns or len(data) == 0:
        return None
    try:
        import fitting

        fit_many = fitting.fit_many
    except (ImportError, AttributeError):
        return None
    kwargs = dict(fit_kwargs)
    formula = kwargs.pop("formula")
    try:
        outcomes = fit_many(formula, data, by=columns, **kwargs)
    except Exception:  # whatever it is, the per-stratum path will report it per stratum
        return None
    wanted = {p.key for p in plans}
    out: dict[str, StratumResult] = {}
    for values, outcome in outcomes.items():
        values = values if isinstance(values, tuple) else (values,)
        key = stratum_key(columns, [_plain(v) for v in values])
        if key not in wanted:
            continue
        if key in out:
            return None
        out[key] = to_stratum_result(key, outcome, store_random_effects=store_random_effects)
    return out


#: What :func:`run_task` imports on a worker (``warm_up`` and ``service.cluster``'s
#: ``PreloadPlugin`` import these ahead of the first task). ``fitting`` loads its numerics
#: on first use (PEP 562), so the modules behind ``fitting.fit`` and ``fitting.fit_many``
#: are named themselves: ``import fitting`` alone left ~0.8 s of imports (scipy.special,
#: scipy.optimize, the fitter) to each worker's first task.
WORKER_MODULES = ("service.tasks", "service.convert", "service.dataset", "service.direct_read",
                  "service.heap", "fitting",
                  "fitting.api", "fitting.batch")


def warm_up() -> bool:
    """Import :data:`WORKER_MODULES` (the fitter, pyarrow.dataset), then return.

    The runner sends this to every worker before it plans a job, so the workers' first
    imports (about a second) overlap planning instead of delaying the first task.
    """
    import importlib

    for module in WORKER_MODULES:
        importlib.import_module(module)
    return True


def _read(descriptor: Any) -> pd.DataFrame:
    from service.dataset import read_slice

    return read_slice(descriptor)


def run_task(
    task: Any, fit_kwargs: Mapping[str, Any], store_random_effects: bool = True
) -> list[StratumResult]:
    """Read one task's slice and fit each of its strata (runs on a Dask worker).

    Parameters
    ----------
    task : service.planner.Task
        ``task.strata`` (list of :class:`StratumPlan`) and ``task.descriptor`` (the
        :class:`~service.dataset.SliceDescriptor` to read).
    fit_kwargs : mapping
        From :meth:`JobSpec.fit_kwargs`: ``formula``, ``family``, ``link``, ...
    store_random_effects : bool, default True
        Keep the conditional modes.

    Returns
    -------
    list of StratumResult
        One per planned stratum, in plan order. A planned stratum without rows is
        ``"failed"`` with ``error_class="EmptyStratum"``.

    Raises
    ------
    Exception
        Only when the slice itself cannot be read (the runner decides whether to retry).
    """
    from service.heap import freeze_once

    freeze_once()  # the worker's imported heap, out of the collector's walks (service.heap)
    plans: list[StratumPlan] = list(task.strata)
    data = _read(task.descriptor)
    columns = tuple(getattr(task.descriptor, "strata_columns", ()) or ())
    empty = data.iloc[0:0]
    if BATCHED:
        done = fit_batched(data, plans, columns, fit_kwargs, store_random_effects)
        if done is not None:
            return [done[p.key] if p.key in done
                    else fit_stratum(p.key, empty, fit_kwargs, store_random_effects)
                    for p in plans]
    parts = split_strata(data, plans, columns)
    return [
        fit_stratum(p.key, parts.get(p.key, empty), fit_kwargs, store_random_effects)
        for p in plans
    ]

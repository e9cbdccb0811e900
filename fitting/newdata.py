"""Model matrices for new data (predictions), using the levels and constants of a fit.

:func:`new_model_matrices` rebuilds ``X`` (same columns as the fitted design, aliased
columns left out), the offset of the formula's ``offset(...)`` terms and, per
random-effects term, ``Z`` and group codes into the *fitted* levels (unseen grouping
levels get code -1, i.e. population-level prediction). Factors are coded with the
stored levels, and ``scale()``/``center()`` re-apply the stored constants instead of
recomputing them on the new data (as R's ``predict`` with ``makepredictcall``).

:class:`DesignInfo` is the small JSON-serialisable part of a :class:`Design` needed
for that, so it can be stored with a fit and reloaded.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fitting.design import Design, ReTerm
from fitting.errors import DataError
from fitting.formula import ParsedFormula, parse_formula
from fitting.formula_nodes import Binary, Name, Node, Paren, names_in
from fitting.modelmatrix import (
    Evaluator,
    Factor,
    as_frame,
    factor_codes,
    interaction,
    is_factor_column,
    missing_mask,
    model_matrix,
    unknown_column_message,
    vector_argument,
)

__all__ = ["DesignInfo", "NewModelMatrices", "design_info", "new_model_matrices"]


@dataclass(frozen=True)
class DesignInfo:
    """What prediction needs from a fitted design.

    Attributes
    ----------
    x_names : tuple of str
        Columns of the fitted ``X`` (after dropping aliased columns).
    factor_levels : dict
        Factor name -> levels (reference first).
    scale_info : dict
        ``scale(...)``/``center(...)`` -> ``{"center": m, "scale": s}``.
    groups : tuple of (str, tuple of str)
        Per random-effects term, in order: group name and fitted levels.
    """

    x_names: tuple[str, ...]
    factor_levels: dict = field(default_factory=dict)
    scale_info: dict = field(default_factory=dict)
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def to_dict(self) -> dict:
        """JSON-serialisable representation."""
        return {
            "x_names": list(self.x_names),
            "factor_levels": {k: list(v) for k, v in self.factor_levels.items()},
            "scale_info": {k: dict(v) for k, v in self.scale_info.items()},
            "groups": [[name, list(levels)] for name, levels in self.groups],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> "DesignInfo":
        """Inverse of :meth:`to_dict`."""
        return cls(
            x_names=tuple(data["x_names"]),
            factor_levels={k: tuple(v) for k, v in data.get("factor_levels", {}).items()},
            scale_info={k: dict(v) for k, v in data.get("scale_info", {}).items()},
            groups=tuple((name, tuple(levels)) for name, levels in data.get("groups", [])),
        )


def design_info(design: Design) -> DesignInfo:
    """Extract the :class:`DesignInfo` of a design.

    Parameters
    ----------
    design : Design

    Returns
    -------
    DesignInfo
    """
    return DesignInfo(
        x_names=tuple(design.x_names),
        factor_levels={k: tuple(v) for k, v in design.factor_levels.items()},
        scale_info={k: dict(v) for k, v in design.scale_info.items()},
        groups=tuple((t.group, tuple(t.levels)) for t in design.re_terms),
    )


@dataclass(frozen=True)
class NewModelMatrices:
    """Model matrices of new data.

    Attributes
    ----------
    X : ndarray (m, p)
        Columns ``x_names`` (as fitted).
    x_names : tuple of str
    offset : ndarray (m,)
        Sum of the formula's ``offset(...)`` terms (plus ``offset=`` if given).
    re_terms : tuple of ReTerm
        Fitted levels; ``codes`` is -1 for levels not seen when fitting.
    """

    X: np.ndarray
    x_names: tuple[str, ...]
    offset: np.ndarray
    re_terms: tuple[ReTerm, ...]


def _as_info(design_or_info) -> DesignInfo:
    if isinstance(design_or_info, DesignInfo):
        return design_or_info
    if isinstance(design_or_info, Design):
        return design_info(design_or_info)
    if isinstance(design_or_info, Mapping):
        return DesignInfo.from_dict(design_or_info)
    raise DataError(f"expected a Design or DesignInfo, got {type(design_or_info).__name__}")


def _mapped_factor(series: pd.Series, levels: tuple[str, ...], name: str, *, strict: bool) -> Factor:
    """Code ``series`` into the fitted ``levels`` (unknown -> error if strict, else -1)."""
    observed = factor_codes(series, logical_full=True)
    index = pd.Index(levels).get_indexer(list(observed.levels))
    if strict and (index < 0).any():
        new = [lv for lv, i in zip(observed.levels, index) if i < 0]
        raise DataError(
            f"factor '{name}' has new level(s) {', '.join(map(repr, new[:5]))} "
            "not present when the model was fitted"
        )
    lookup = np.append(index, -1).astype(np.int64)
    return Factor(lookup[observed.codes], tuple(levels))


def _group_codes(node: Node, frame: pd.DataFrame) -> Factor:
    """Grouping factor of new data with its own observed labels."""
    if isinstance(node, Paren):
        return _group_codes(node.expr, frame)
    if isinstance(node, Name):
        return factor_codes(frame[node.name])
    assert isinstance(node, Binary) and node.op == ":"
    return interaction(_group_codes(node.left, frame), _group_codes(node.right, frame))


def new_model_matrices(design_or_info, parsed, newdata, *, offset=None) -> NewModelMatrices:
    """Build ``X``, the offset and per-term ``Z``/group codes for new data.

    Parameters
    ----------
    design_or_info : Design, DesignInfo or dict
        The fitted design (or its :class:`DesignInfo`, or ``DesignInfo.to_dict()``).
    parsed : ParsedFormula or str
        The formula the design was built from.
    newdata : pandas.DataFrame or pyarrow.Table
        New observations; the response is not needed.
    offset : None, str or array-like, optional
        Extra offset, as for :func:`fitting.frame.build_design`.

    Returns
    -------
    NewModelMatrices

    Raises
    ------
    DataError
        Missing values in a used column, a fixed-effect factor level not seen when
        fitting, or columns that do not reproduce the fitted design.
    """
    info = _as_info(design_or_info)
    if isinstance(parsed, str):
        parsed = parse_formula(parsed)
    if not isinstance(parsed, ParsedFormula):
        raise DataError(f"expected a formula, got {type(parsed).__name__}")
    fixed = parsed.fixed
    start = 1 if fixed.has_response else 0
    needed: dict[str, None] = {}
    for var in fixed.variables[start:]:
        needed.update(dict.fromkeys(names_in(var)))
    for term in parsed.random:
        for var in term.lhs.variables:
            needed.update(dict.fromkeys(names_in(var)))
        needed.update(dict.fromkeys(names_in(term.group)))
    extra = (offset,) if isinstance(offset, str) else ()
    frame, available = as_frame(newdata, tuple(needed) + extra)
    present = set(available)
    for name in tuple(needed) + extra:
        if name not in present:
            raise DataError(unknown_column_message(name, available, "newdata"))
    n = len(frame)
    if n == 0:
        raise DataError("newdata has no rows")
    grouping = {name for term in parsed.random for name in names_in(term.group)}
    in_matrices = {
        name
        for terms in (fixed, *(t.lhs for t in parsed.random))
        for idx in terms.used_variables
        for name in names_in(terms.variables[idx])
    }
    for name in needed:
        if name in grouping and name not in in_matrices:
            continue  # grouping only: a missing value just means "no random effect"
        mask = missing_mask(frame[name])
        if mask.any():
            rows = ", ".join(str(i) for i in np.flatnonzero(mask)[:5])
            raise DataError(
                f"column '{name}' has {int(mask.sum())} missing/non-finite values in newdata "
                f"(rows {rows})"
            )

    ev = Evaluator(frame, info.scale_info, fitted=True)

    def variables(terms):
        numeric, factors = {}, {}
        for idx in terms.used_variables:
            node = terms.variables[idx]
            if isinstance(node, Name) and node.name in info.factor_levels and (
                is_factor_column(frame[node.name]) or node.name not in grouping
            ):
                factors[idx] = _mapped_factor(
                    frame[node.name], info.factor_levels[node.name], node.name, strict=True
                )
            else:
                numeric[idx] = ev.evaluate(node)
        return numeric, factors

    numeric, factors = variables(fixed)
    X_full, names = model_matrix(fixed, n, numeric, factors)
    position = {name: j for j, name in enumerate(names)}
    missing = [name for name in info.x_names if name not in position]
    if missing:
        raise DataError(f"newdata does not reproduce the fitted columns {missing[:5]}")
    X = np.ascontiguousarray(X_full[:, [position[name] for name in info.x_names]])
    total_offset = np.zeros(n)
    for node in fixed.offsets:
        total_offset = total_offset + ev.evaluate(node)
    if offset is not None:
        total_offset = total_offset + vector_argument(offset, frame, n, "offset")[1]
    if len(info.groups) != len(parsed.random):
        raise DataError("the design's random-effects terms do not match the formula")
    re_terms = []
    for term, (group_name, levels) in zip(parsed.random, info.groups):
        numeric, factors = variables(term.lhs)
        Z, z_names = model_matrix(term.lhs, n, numeric, factors)
        observed = _group_codes(term.group, frame)
        lookup = np.append(pd.Index(levels).get_indexer(list(observed.levels)), -1).astype(np.int64)
        re_terms.append(ReTerm(group_name, tuple(levels), lookup[observed.codes], tuple(z_names), Z))
    return NewModelMatrices(X=X, x_names=tuple(info.x_names), offset=total_offset, re_terms=tuple(re_terms))

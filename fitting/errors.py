"""Exceptions raised by :mod:`fitting`. Every message names the culprit."""
from __future__ import annotations

__all__ = [
    "FittingError",
    "FormulaError",
    "DataError",
    "FamilyError",
    "ConvergenceError",
]


class FittingError(ValueError):
    """Base class of every error :mod:`fitting` raises on bad input or failed fits."""


class FormulaError(FittingError):
    """The formula does not parse, or names an unknown column or function."""


class DataError(FittingError):
    """The data cannot be used: NaN/inf, invalid response, too few levels, ..."""


class FamilyError(FittingError):
    """Unknown family or link, or a link the family does not allow."""


class ConvergenceError(FittingError):
    """The fit could not produce finite estimates (PIRLS diverged, non-finite deviance)."""

"""stratafit's fitter: lme4-compatible LMMs and GLMMs (Laplace), fast.

The public entry point is :func:`fit`; :func:`fit_design` starts from a ready
:class:`~fitting.design.Design`.
"""
from .api import fit, fit_design
from .errors import ConvergenceError, DataError, FamilyError, FittingError, FormulaError
from .families import get_family
from .result import Diagnostics, FitResult, OptInfo

__all__ = [
    "fit",
    "fit_design",
    "FitResult",
    "OptInfo",
    "Diagnostics",
    "get_family",
    "FittingError",
    "FormulaError",
    "DataError",
    "FamilyError",
    "ConvergenceError",
]

"""stratafit's fitter: lme4-compatible LMMs and GLMMs (Laplace and adaptive quadrature), fast.

The public entry point is :func:`fit`; :func:`fit_design` starts from a ready
:class:`~fitting.design.Design`. Inference on a fit: :func:`predict`,
:func:`marginal_coefs`, :func:`icc`, :func:`odds_ratios`, :func:`exponentiate`,
:func:`full_vcov`, :func:`wald_confint`, :func:`profile_confint` (also methods of
:class:`FitResult`) and :func:`lrt` for nested fits.
"""
from .api import fit, fit_design
from .batch import fit_many
from .compare import LRTResult, exponentiate, lrt, odds_ratios
from .errors import ConvergenceError, DataError, FamilyError, FittingError, FormulaError
from .families import get_family
from .marginal import icc, marginal_coefs
from .predict import predict
from .profile import full_vcov, profile_confint, wald_confint
from .result import Diagnostics, FitResult, OptInfo

__all__ = [
    "fit",
    "fit_design",
    "fit_many",
    "FitResult",
    "OptInfo",
    "Diagnostics",
    "get_family",
    "predict",
    "marginal_coefs",
    "icc",
    "odds_ratios",
    "exponentiate",
    "lrt",
    "LRTResult",
    "full_vcov",
    "wald_confint",
    "profile_confint",
    "FittingError",
    "FormulaError",
    "DataError",
    "FamilyError",
    "ConvergenceError",
]

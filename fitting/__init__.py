"""stratafit's fitter: lme4-compatible LMMs and GLMMs (Laplace and adaptive quadrature), fast.

The public entry point is :func:`fit`; :func:`fit_design` starts from a ready
:class:`~fitting.design.Design`. Inference on a fit: :func:`predict`,
:func:`marginal_coefs`, :func:`icc`, :func:`odds_ratios`, :func:`exponentiate`,
:func:`full_vcov`, :func:`wald_confint`, :func:`profile_confint` (also methods of
:class:`FitResult`) and :func:`lrt` for nested fits.
"""
import importlib

from .errors import ConvergenceError, DataError, FamilyError, FittingError, FormulaError

# The public names load on first use (PEP 562), so ``import fitting.formula`` (what the
# service's spec validation needs on the coordinator) does not pull in the numerics.
_LAZY = {
    "fit": "api", "fit_design": "api", "fit_many": "batch",
    "LRTResult": "compare", "exponentiate": "compare", "lrt": "compare",
    "odds_ratios": "compare", "get_family": "families", "icc": "marginal",
    "marginal_coefs": "marginal", "full_vcov": "profile", "profile_confint": "profile",
    "wald_confint": "profile", "Diagnostics": "result", "FitResult": "result",
    "OptInfo": "result", "predict": "prediction",
}


def __getattr__(name):
    try:
        module = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'fitting' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


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

"""Model design: the plain data handed from the formula/frame stage to the numerics.

This module is the contract between :mod:`fitting.frame` (which builds a
:class:`Design` from a formula and a table) and the numerical stages
(:mod:`fitting.lmm`, :mod:`fitting.glmm`), which never see the formula or the data
frame again.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["ReTerm", "Design"]


@dataclass(frozen=True)
class ReTerm:
    """One random-effects term ``(x1 + ... | g)`` after expansion.

    ``(x || g)`` is expanded by the frame stage into one ``ReTerm`` per column, and
    ``(1 | a/b)`` into ``(1 | a:b)`` and ``(1 | a)``, so every term here has a full
    (lower-triangular) relative covariance factor of size ``k = len(term_names)``.

    Attributes
    ----------
    group : str
        Grouping factor name as lme4 prints it (``"herd"``, ``"b:a"``).
    levels : tuple of str
        Level labels of the grouping factor, in code order (only levels present).
    codes : ndarray of int64, shape (n,)
        Index into ``levels`` for every observation.
    term_names : tuple of str
        Column names of the term, lme4 style (``"(Intercept)"``, ``"urbanY"``, ``"Days"``).
    Z : ndarray of float64, shape (n, k)
        The per-observation model matrix of the term (raw, unscaled); the full random
        effects model matrix block is ``Z[i, j]`` placed at column ``codes[i] * k + j``.
    """

    group: str
    levels: tuple[str, ...]
    codes: np.ndarray
    term_names: tuple[str, ...]
    Z: np.ndarray

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def k(self) -> int:
        return len(self.term_names)


@dataclass(frozen=True)
class Design:
    """Everything the numerics need, with NaN rows already rejected.

    Attributes
    ----------
    response : str
        Response expression as written (``"cbind(incidence, size - incidence)"``).
    y : ndarray (n,)
        Response. For binomial: the proportion of successes in ``[0, 1]``.
    weights : ndarray (n,)
        Prior weights. For binomial with ``cbind(s, f)`` these are ``s + f`` (times any
        user weights); with a proportion response they are the user weights (the number
        of trials). Ones otherwise.
    offset : ndarray (n,)
        Offset on the linear-predictor scale (sum of ``offset(...)`` terms and ``offset=``).
    X : ndarray (n, p)
        Fixed-effects model matrix after dropping aliased columns.
    x_names : tuple of str
        Column names of ``X``, lme4 style.
    re_terms : tuple of ReTerm
        Random-effects terms in formula order (empty for a plain GLM/LM).
    dropped : tuple of str
        Names of aliased fixed-effect columns that were dropped (rank deficiency).
    factor_levels : dict
        Levels of each factor used in the fixed or random part (reference level first).
    scale_info : dict
        Centring/scaling constants of ``scale(x)``/``center(x)`` terms, for prediction.
    warnings : tuple of str
        Warnings raised while building the design (dropped columns, ...).
    """

    response: str
    y: np.ndarray
    weights: np.ndarray
    offset: np.ndarray
    X: np.ndarray
    x_names: tuple[str, ...]
    re_terms: tuple[ReTerm, ...]
    dropped: tuple[str, ...] = ()
    factor_levels: dict = field(default_factory=dict)
    scale_info: dict = field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def nobs(self) -> int:
        return int(self.y.shape[0])

    @property
    def p(self) -> int:
        return int(self.X.shape[1])

"""Predictions from a fit: conditional, population-level, quantile and marginal.

For a row with fixed-effects row ``x``, offset ``o`` and random-effects rows ``z_t`` (one
per term ``t``), the linear predictor is ``eta = x'beta + o + sum_t z_t'b_t`` with
``b_t ~ N(0, Sigma_t)`` independent across terms and levels. :func:`predict` offers

``re="conditional"``
    ``b_t`` at the conditional modes of each row's level (``fit.ranef``); a level not seen
    when fitting gets ``b_t = 0`` (lme4's ``allow.new.levels = TRUE``).
``re="zero"``
    every ``b_t = 0`` (lme4's ``re.form = NA``): the prediction for a *typical* (median)
    group, not the population average.
``re_quantile=q``
    the total random contribution ``s = sum_t z_t'b_t`` held at the ``q``-quantile of its
    distribution ``N(0, v)``, ``v = sum_t z_t' Sigma_t z_t``. As ``g^-1`` is increasing,
    ``g^-1(x'beta + o + sqrt(v) Phi^-1(q))`` is the ``q``-quantile over groups of the
    predicted mean ("if everyone had the same doctor": the spread of the predicted
    probability across doctors). For a scalar random intercept ``v = sigma_g^2``.
``re="marginal"``
    the population-averaged mean ``E[g^-1(eta)] = int g^-1(x'beta + o + s) N(s; 0, v) ds``.

Because ``s`` is a linear combination of jointly normal effects, it is univariate normal
whatever the number of terms, their dimension ``k`` or the number of grouping factors:
every marginal integral here is one-dimensional: closed forms for the identity, log and
probit links, and for logit/cloglog a trapezoidal rule whose step adapts to the largest
sd (accurate to ~1e-15; non-adaptive Gauss-Hermite loses accuracy as the sd grows), or
an ``nagq``-point Gauss-Hermite rule (:func:`fitting.quadrature.gauss_hermite`) on
request (see :func:`marginal_mean`).

The module also holds the small helpers the other inference modules share:
:func:`resolve_design`, :func:`fit_family`, :func:`re_covariances`, :func:`re_variance`,
:func:`ranef_matrices` and :func:`marginal_mean`.
"""
from __future__ import annotations

import numpy as np
from scipy import special

from .design import Design
from .errors import FittingError
from .families import Family, Link, get_family, get_link
from .quadrature import gauss_hermite
from .structure import lme4_order

__all__ = [
    "predict",
    "marginal_mean",
    "resolve_design",
    "fit_family",
    "re_covariances",
    "re_variance",
    "ranef_matrices",
    "tril_colmajor",
    "TYPES",
    "RE_MODES",
]

TYPES = ("response", "link")
RE_MODES = ("conditional", "zero", "marginal")
_CHUNK_CELLS = 4_000_000  # rows x nodes evaluated at once in marginal_mean


# ------------------------------------------------------------------ shared helpers
def resolve_design(fit, design: Design | None = None) -> Design:
    """The :class:`~fitting.design.Design` a fit was made from.

    Parameters
    ----------
    fit : FitResult
    design : Design, optional
        Overrides ``fit.design``; needed while a fit does not carry its design.

    Returns
    -------
    Design

    Raises
    ------
    FittingError
        No design available, or one that does not match the fit (number of rows,
        fixed-effects names, random-effects parameters).
    """
    if design is None:
        design = getattr(fit, "design", None)
    if design is None:
        raise FittingError(
            "this fit does not carry its design; pass design=build_design(formula, data, family)"
        )
    if not isinstance(design, Design):
        raise FittingError(f"design must be a fitting.design.Design, got {type(design).__name__}")
    if design.nobs != fit.nobs:
        raise FittingError(f"design has {design.nobs} rows but the fit used {fit.nobs}")
    if tuple(design.x_names) != tuple(fit.vcov.columns):
        raise FittingError(
            f"design fixed effects {list(design.x_names)} differ from the fit's {list(fit.vcov.columns)}"
        )
    names = _theta_names(design)
    if tuple(names) != tuple(fit.theta_names):
        raise FittingError(
            f"design random-effects parameters {list(names)} differ from the fit's {list(fit.theta_names)}"
        )
    return design


def fit_family(fit) -> Family:
    """The :class:`~fitting.families.Family` (with its link) of a fit."""
    return get_family(fit.family, fit.link)


def _layout(design: Design) -> list[tuple[int, int]]:
    """Per term in formula order: offset of its entries in lme4's theta, and k."""
    order = lme4_order(design.re_terms)
    offsets = [0] * len(order)
    off = 0
    for fi in order:
        k = design.re_terms[fi].k
        offsets[fi] = off
        off += k * (k + 1) // 2
    return [(offsets[i], t.k) for i, t in enumerate(design.re_terms)]


def _theta_names(design: Design) -> list[str]:
    names = []
    for fi in lme4_order(design.re_terms):
        t = design.re_terms[fi]
        for c in range(t.k):
            for r in range(c, t.k):
                names.append(f"{t.group}.{t.term_names[r]}" if r == c
                             else f"{t.group}.{t.term_names[r]}.{t.term_names[c]}")
    return names


def tril_colmajor(k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of a ``k x k`` lower triangle in lme4's ``theta`` order."""
    rows, cols = np.tril_indices(k)
    o = np.lexsort((rows, cols))
    return rows[o], cols[o]


def re_covariances(design: Design, theta, sigma: float = 1.0) -> list[np.ndarray]:
    """Covariance matrices ``Sigma_t = sigma^2 Lambda_t Lambda_t'`` of the terms.

    Parameters
    ----------
    design : Design
        Gives the terms (formula order) and their sizes.
    theta : array_like
        lme4's ``theta`` (terms in lme4 order, lower triangles column-major).
    sigma : float
        Residual sd (1 for GLMMs).

    Returns
    -------
    list of ndarray (k_t, k_t)
        One per term of ``design.re_terms``, in formula order.
    """
    theta = np.asarray(theta, dtype=float)
    out = []
    for off, k in _layout(design):
        lam = np.zeros((k, k))
        rows, cols = tril_colmajor(k)
        lam[rows, cols] = theta[off:off + k * (k + 1) // 2]
        out.append(sigma * sigma * (lam @ lam.T))
    return out


def re_variance(re_terms, covariances) -> np.ndarray:
    """Variance ``v_i = sum_t z_ti' Sigma_t z_ti`` of each row's random contribution.

    Parameters
    ----------
    re_terms : sequence of ReTerm
        Supplies ``Z`` (n, k_t) per term (codes are irrelevant: the distribution is the
        population one).
    covariances : sequence of ndarray
        ``Sigma_t`` per term, as from :func:`re_covariances`.

    Returns
    -------
    ndarray (n,)
    """
    v = None
    for t, S in zip(re_terms, covariances):
        Z = np.asarray(t.Z, dtype=float).reshape(len(t.codes), -1)
        vt = np.einsum("ij,jk,ik->i", Z, S, Z)
        v = vt if v is None else v + vt
    return np.maximum(v, 0.0) if v is not None else None


def ranef_matrices(fit, design: Design) -> list[np.ndarray]:
    """Conditional modes of every term as an (m_t, k_t) matrix, formula order.

    Read from ``fit.ranef`` (columns ``group, level, term, mode``) and aligned to the
    design's level and column order.

    Raises
    ------
    FittingError
        A level or column of the design missing from ``fit.ranef``, or duplicated rows.
    """
    rf = fit.ranef
    out = []
    for t in design.re_terms:
        sub = rf[(rf["group"] == t.group) & rf["term"].isin(t.term_names)]
        if sub.duplicated(["level", "term"]).any():
            raise FittingError(f"fit.ranef has duplicated rows for group {t.group!r}; cannot align "
                               "conditional modes with the design")
        wide = sub.pivot(index="level", columns="term", values="mode")
        wide.index = wide.index.astype(str)
        wide = wide.reindex(index=list(t.levels), columns=list(t.term_names))
        B = wide.to_numpy(dtype=float)
        if np.isnan(B).any():
            raise FittingError(f"fit.ranef lacks conditional modes for some levels/terms of {t.group!r}")
        out.append(B)
    return out


#: trapezoidal (sinc) rule for the logit and cloglog links: step ``min(h_max, c / sd)`` on
#: ``[-9, 9]``; the integrand is analytic in a strip of half-width ``~pi / sd`` (logit), so
#: the error decays like ``exp(-2 pi^2 / (sd h))`` (~1e-15 for these constants, checked
#: against adaptive quadrature for sd up to 10).
_TRAPEZOID = {"logit": (0.55, 0.5), "cloglog": (0.3, 0.3)}
_TRAPEZOID_HALF_WIDTH = 9.0


def _closed_form(eta, sd, link_name):
    """``E[g^-1(eta + sd Z)]`` where it has a closed form, else None."""
    if link_name == "identity":
        return eta.copy()
    if link_name == "log":
        return np.exp(np.minimum(eta + 0.5 * sd * sd, 700.0))
    if link_name == "probit":
        return special.ndtr(eta / np.sqrt(1.0 + sd * sd))
    return None


def _rule(link_name: str, sd_max: float, nagq: int | None):
    """Nodes and weights for the standard normal: Gauss-Hermite or the trapezoid rule."""
    if nagq is not None:
        return gauss_hermite(int(nagq))
    c, h_max = _TRAPEZOID.get(link_name, (0.3, 0.3))
    h = min(h_max, c / sd_max) if sd_max > 0 else h_max
    n = int(np.ceil(_TRAPEZOID_HALF_WIDTH / h))
    z = np.arange(-n, n + 1) * h
    w = np.exp(-0.5 * z * z) * (h / np.sqrt(2.0 * np.pi))
    return z, w


def marginal_mean(eta, sd, link: Link | str, nagq: int | None = None) -> np.ndarray:
    """``E[g^-1(eta + sd Z)]``, ``Z ~ N(0, 1)``, elementwise.

    Parameters
    ----------
    eta, sd : array_like (n,)
        Linear predictor without the random part, and the sd of the random part.
    link : Link or str
    nagq : int, optional
        ``None`` (default): exact — closed forms for the identity (``eta``), log
        (``exp(eta + sd^2 / 2)``) and probit (``Phi(eta / sqrt(1 + sd^2))``) links, and
        for logit/cloglog the trapezoidal rule with a step adapted to the largest ``sd``
        (~1e-15 absolute error; about ``33 sd`` nodes for logit). An integer: the
        ``nagq``-point Gauss-Hermite rule for every link (its error grows with ``sd``:
        ~1e-7 at ``sd = 2`` and ~1e-5 at ``sd = 3`` with 31 nodes, logit link).

    Returns
    -------
    ndarray (n,)
    """
    link = get_link(link)
    eta = np.asarray(eta, dtype=float)
    sd = np.broadcast_to(np.asarray(sd, dtype=float), eta.shape)
    if nagq is None:
        exact = _closed_form(eta, sd, link.name)
        if exact is not None:
            return exact
    elif isinstance(nagq, bool) or not isinstance(nagq, (int, np.integer)) or nagq < 1:
        raise ValueError(f"nagq must be None or an integer >= 1, got {nagq!r}")
    out = np.empty(eta.shape)
    flat_eta, flat_sd, flat_out = eta.reshape(-1), sd.reshape(-1), out.reshape(-1)
    z, w = _rule(link.name, float(flat_sd.max()) if flat_sd.size else 0.0, nagq)
    step = max(1, _CHUNK_CELLS // z.size)
    for i0 in range(0, flat_eta.size, step):
        e = flat_eta[i0:i0 + step, None] + flat_sd[i0:i0 + step, None] * z[None, :]
        flat_out[i0:i0 + step] = link.inverse(e) @ w
    return out


# ------------------------------------------------------------------------ predict
def _check_options(type, re, re_quantile, nagq):
    if type not in TYPES:
        raise ValueError(f"type must be one of {TYPES}, got {type!r}")
    if re not in RE_MODES:
        raise ValueError(f"re must be one of {RE_MODES}, got {re!r}")
    if re_quantile is not None:
        q = float(re_quantile)
        if not 0.0 < q < 1.0:
            raise ValueError(f"re_quantile must be strictly between 0 and 1, got {re_quantile!r}")
        if re == "marginal":
            raise ValueError("re_quantile and re='marginal' are exclusive: a quantile holds the random "
                             "effects at one value, the marginal prediction averages over them")
    if nagq is not None and (isinstance(nagq, bool) or not isinstance(nagq, (int, np.integer)) or nagq < 1):
        raise ValueError(f"nagq must be None or an integer >= 1, got {nagq!r}")


def _matrices(fit, design, newdata, offset):
    """X, offset and ReTerms (codes -1 for unseen levels) of the rows to predict."""
    if newdata is None:
        if offset is not None:
            raise ValueError("offset= only applies with newdata (the fitting data's offset is in the design)")
        return design.X, design.offset, design.re_terms
    from .newdata import new_model_matrices

    parsed = getattr(fit, "parsed", None)
    if callable(parsed):
        parsed = parsed()
    nm = new_model_matrices(design, parsed if parsed is not None else fit.formula, newdata, offset=offset)
    return nm.X, nm.offset, nm.re_terms


def predict(fit, newdata=None, *, type: str = "response", re: str = "conditional",
            re_quantile: float | None = None, design: Design | None = None, nagq: int | None = None,
            offset=None) -> np.ndarray:
    """Predictions of a fitted (G)LMM, on the response or the link scale.

    Parameters
    ----------
    fit : FitResult
    newdata : pandas.DataFrame or pyarrow.Table, optional
        Rows to predict (the response column is not needed). ``None``: the fitting data.
    type : {"response", "link"}
        Mean ``g^-1(eta)`` or linear predictor. With ``re="marginal"`` and
        ``type="link"`` the result is ``g(marginal mean)``, the population-averaged
        linear predictor.
    re : {"conditional", "zero", "marginal"}
        How random effects enter (see the module docstring): the conditional modes of
        each row's levels (unseen levels: 0), all zero, or integrated out.
    re_quantile : float in (0, 1), optional
        Hold each row's total random contribution at this quantile of its distribution
        ``N(0, v_i)`` instead (``0.5`` equals ``re="zero"``). Overrides
        ``re="conditional"``/``"zero"``; not combinable with ``"marginal"``.
    design : Design, optional
        The fitting design (default ``fit.design``).
    nagq : int, optional
        For ``re="marginal"``: ``None`` (default) integrates exactly (closed forms, or
        an adaptive-step trapezoidal rule; see :func:`marginal_mean`); an integer uses
        the ``nagq``-point Gauss-Hermite rule.
    offset : None, str or array-like
        Extra offset for ``newdata`` (the fit's ``offset=`` argument is not part of the
        formula); ``offset(...)`` terms of the formula are applied automatically.

    Returns
    -------
    ndarray (n,)

    Raises
    ------
    ValueError
        Bad options.
    FittingError, DataError
        No or mismatched design; ``newdata`` not reproducing the fitted columns.

    Examples
    --------
    >>> p_cond = predict(fit, design=design)                      # doctest: +SKIP
    >>> p_pop = predict(fit, design=design, re="marginal")        # doctest: +SKIP
    >>> p_q90 = predict(fit, design=design, re_quantile=0.9)      # doctest: +SKIP
    """
    _check_options(type, re, re_quantile, nagq)
    design = resolve_design(fit, design)
    fam = fit_family(fit)
    X, off, re_terms = _matrices(fit, design, newdata, offset)
    eta = X @ np.asarray(fit.beta, dtype=float) + off
    if not re_terms:
        return eta if type == "link" else fam.link.inverse(eta)
    if re_quantile is not None or re == "marginal":
        sd = np.sqrt(re_variance(re_terms, re_covariances(design, fit.theta, _sigma(fit))))
        if re_quantile is not None:
            eta = eta + sd * float(special.ndtri(float(re_quantile)))
            return eta if type == "link" else fam.link.inverse(eta)
        mu = marginal_mean(eta, sd, fam.link, nagq)
        return fam.link.link(mu) if type == "link" else mu
    if re == "conditional":
        for t, B in zip(re_terms, ranef_matrices(fit, design)):
            Bx = np.vstack([B, np.zeros((1, B.shape[1]))])  # code -1 -> the zero row
            Z = np.asarray(t.Z, dtype=float).reshape(len(t.codes), -1)
            eta = eta + np.einsum("ij,ij->i", Z, Bx[np.asarray(t.codes)])
    return eta if type == "link" else fam.link.inverse(eta)


def _sigma(fit) -> float:
    """Scale of ``theta``: the residual sd for Gaussian fits, 1 otherwise."""
    return float(fit.sigma) if fit.family == "gaussian" else 1.0

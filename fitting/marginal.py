"""Population-averaged (marginal) coefficients and intraclass correlations of GLMMs.

:func:`marginal_coefs`
    The coefficients of the marginal mean (Hedeker, du Toit, Demirtas & Gibbons 2018,
    *Biometrics* 74:354-361; GLMMadaptive's ``marginal_coefs``). For each fitting row
    the marginal mean ``mu_i^M = E[g^-1(x_i'beta + o_i + s_i)]``, ``s_i ~ N(0, v_i)``,
    ``v_i = sum_t z_ti' Sigma_t z_ti``, is integrated in one dimension (the random
    part is univariate normal whatever the random-effects structure): exactly by closed
    forms (probit, log) or an adaptive-step trapezoidal rule (logit, cloglog), see
    :func:`fitting.prediction.marginal_mean`. Then ``g(mu^M) - o`` is regressed on ``X``
    by least squares: ``beta^M = (X'X)^-1 X'(g(mu^M) - o)``. Where GLMMadaptive averages
    Monte Carlo draws of ``b``, this is deterministic. Standard errors by the delta
    method: the Jacobian of ``beta^M`` over ``(theta, beta)`` by central differences, and the covariance of
    ``(theta, beta)`` from :func:`fitting.profile.full_vcov`.

    For a probit random intercept ``mu^M = Phi(eta / sqrt(1 + sigma^2))``, so
    ``beta^M = beta / sqrt(1 + sigma^2)`` exactly; for the logit link
    ``beta^M ~ beta / sqrt(1 + c^2 sigma^2)``, ``c = 16 sqrt(3) / (15 pi)``
    (Zeger, Liang & Albert 1988), i.e. ``1 + 0.346 sigma^2``.

:func:`icc`
    Latent-scale intraclass correlation per grouping factor (Nakagawa, Johnson &
    Schielzeth 2017, *J R Soc Interface* 14:20170213).
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import special

from .design import Design
from .errors import FamilyError, FittingError
from .prediction import fit_family, marginal_mean, re_covariances, re_variance, resolve_design

__all__ = ["marginal_coefs", "marginal_coef_values", "icc", "latent_residual_variance",
           "MARGINAL_COLUMNS"]

MARGINAL_COLUMNS = ["term", "estimate", "std_error", "conf_low", "conf_high"]


def marginal_coef_values(design: Design, link, theta, beta, *, sigma: float = 1.0,
                         nagq: int | None = None) -> np.ndarray:
    """``beta^M(theta, beta)``: the marginal coefficients at given parameters.

    Parameters
    ----------
    design : Design
        Rows (``X``, offset, random-effects ``Z``) over which the marginal means are
        computed and regressed.
    link : Link or str
    theta, beta : array_like
        lme4's ``theta`` and the fixed effects.
    sigma : float
        Scale of ``theta`` (1 for GLMMs).
    nagq : int, optional
        ``None``: exact marginal means; an integer: Gauss-Hermite nodes (see
        :func:`fitting.prediction.marginal_mean`).

    Returns
    -------
    ndarray (p,)
    """
    from .families import get_link

    link = get_link(link)
    eta = design.X @ np.asarray(beta, dtype=float) + design.offset
    if not design.re_terms:
        return np.asarray(beta, dtype=float).copy()
    sd = np.sqrt(re_variance(design.re_terms, re_covariances(design, theta, sigma)))
    target = link.link(marginal_mean(eta, sd, link, nagq)) - design.offset
    coef, *_ = np.linalg.lstsq(design.X, target, rcond=None)
    return coef


def _jacobian(fun, x, steps) -> np.ndarray:
    """Central-difference Jacobian of a vector function (columns: coordinates of x)."""
    f0 = fun(x)
    J = np.empty((f0.size, x.size))
    for j in range(x.size):
        e = np.zeros(x.size)
        e[j] = steps[j]
        J[:, j] = (fun(x + e) - fun(x - e)) / (2.0 * steps[j])
    return J


def marginal_coefs(fit, *, design: Design | None = None, nagq: int | None = None, level: float = 0.95,
                   std_errors: bool = True, return_vcov: bool = False):
    """Population-averaged coefficients with delta-method standard errors.

    Parameters
    ----------
    fit : FitResult
    design : Design, optional
        Default ``fit.design``.
    nagq : int, optional
        ``None`` (default): marginal means integrated exactly (closed forms for probit
        and log links, an adaptive-step trapezoidal rule for logit/cloglog); an integer:
        the ``nagq``-point Gauss-Hermite rule (see :func:`fitting.prediction.marginal_mean`).
    level : float
        Confidence level of ``conf_low``/``conf_high`` (Wald on the marginal scale).
    std_errors : bool
        Compute delta-method standard errors (needs the covariance of ``(theta, beta)``:
        one finite-difference Hessian of the deviance).
    return_vcov : bool
        Also return the covariance matrix of the marginal coefficients.

    Returns
    -------
    pandas.DataFrame
        ``term, estimate, std_error, conf_low, conf_high`` (``attrs["nagq"]`` records
        the rule). With ``return_vcov``: ``(table, vcov)``, ``vcov`` a p x p DataFrame.

    Notes
    -----
    Identity links and fits without random effects return ``beta`` and ``fit.vcov``
    (the marginal and conditional means coincide). If the Hessian over ``(theta,
    beta)`` is not positive definite (e.g. a singular fit), the standard errors treat
    ``theta`` as known (``fit.vcov`` for ``beta``) and a warning says so.

    References
    ----------
    Hedeker D, du Toit SHC, Demirtas H, Gibbons RD (2018). A note on marginalization of
    regression parameters from mixed models of binary outcomes. Biometrics 74:354-361.
    """
    design = resolve_design(fit, design)
    fam = fit_family(fit)
    names = list(design.x_names)
    beta = np.asarray(fit.beta, dtype=float)
    theta = np.asarray(fit.theta, dtype=float)
    Vb = fit.vcov.to_numpy(dtype=float)
    if fam.link.name == "identity" or not design.re_terms:
        est, V = beta.copy(), Vb
    else:
        sigma = float(fit.sigma) if fam.estimates_scale else 1.0
        est = marginal_coef_values(design, fam.link, theta, beta, sigma=sigma, nagq=nagq)
        V = np.full((beta.size, beta.size), np.nan)
        if std_errors:
            nt = theta.size
            x = np.concatenate([theta, beta])

            def fun(xx):
                return marginal_coef_values(design, fam.link, xx[:nt], xx[nt:], sigma=sigma, nagq=nagq)

            se_b = np.sqrt(np.diag(Vb))
            steps = np.concatenate([np.full(nt, 1e-5) * np.maximum(np.abs(theta), 0.1),
                                    1e-4 * np.where(se_b > 0, se_b, 1.0)])
            J = _jacobian(fun, x, steps)
            Vfull = _theta_beta_vcov(fit, design)
            if Vfull is None:
                V = J[:, nt:] @ Vb @ J[:, nt:].T
            else:
                V = J @ Vfull @ J.T
    se = np.sqrt(np.maximum(np.diag(V), 0.0))
    z = float(special.ndtri(0.5 * (1.0 + float(level))))
    out = pd.DataFrame({"term": names, "estimate": est, "std_error": se,
                        "conf_low": est - z * se, "conf_high": est + z * se})
    out.attrs["nagq"] = None if nagq is None else int(nagq)
    if return_vcov:
        return out, pd.DataFrame(V, index=names, columns=names)
    return out


def _theta_beta_vcov(fit, design):
    from .profile import full_vcov

    try:
        return full_vcov(fit, design=design).to_numpy(dtype=float)
    except FittingError as exc:
        warnings.warn(f"marginal_coefs: {exc}; standard errors treat theta as known", stacklevel=3)
        return None


# ---------------------------------------------------------------------- ICC
def latent_residual_variance(family: str, link: str, *, intercept: float | None = None,
                             re_variance_total: float = 0.0, sigma: float = 1.0,
                             poisson_lambda: str = "mean") -> float:
    """Distribution-specific ("residual") variance on the latent scale.

    ========================  =========================================================
    gaussian / identity       ``sigma^2``
    binomial / logit          ``pi^2 / 3`` (variance of the standard logistic)
    binomial / probit         ``1``
    binomial / cloglog        ``pi^2 / 6`` (variance of the standard Gumbel)
    poisson / log             ``log(1 + 1/lambda)`` (lognormal approximation)
    ========================  =========================================================

    For Poisson, ``lambda`` is the expected count: ``exp(beta0 + re_variance_total/2)``
    (``poisson_lambda="mean"``, Nakagawa et al. 2017) or ``exp(beta0)``
    (``"median"``, Nakagawa & Schielzeth 2010), with ``beta0`` the intercept (so at
    covariates 0: centre them for a meaningful value).

    Raises
    ------
    FamilyError
        Another family/link.
    """
    family, link = str(family).lower(), str(link).lower()
    if family == "gaussian" and link == "identity":
        return float(sigma) ** 2
    if family == "binomial":
        table = {"logit": math.pi ** 2 / 3.0, "probit": 1.0, "cloglog": math.pi ** 2 / 6.0}
        if link in table:
            return table[link]
    if family == "poisson" and link == "log":
        if intercept is None:
            raise FamilyError("the Poisson latent variance needs the intercept (the model has none)")
        if poisson_lambda not in ("mean", "median"):
            raise ValueError(f"poisson_lambda must be 'mean' or 'median', got {poisson_lambda!r}")
        lam = math.exp(intercept + (0.5 * re_variance_total if poisson_lambda == "mean" else 0.0))
        return math.log1p(1.0 / lam)
    raise FamilyError(f"no latent-scale residual variance for family {family!r} with link {link!r}")


def icc(fit, *, poisson_lambda: str = "mean") -> dict:
    """Latent-scale intraclass correlation (variance partition coefficient) per group.

    ``ICC_g = sigma^2_g / (sum_h sigma^2_h + sigma^2_e)`` with ``sigma^2_g`` the variance
    of the random intercept of grouping factor ``g`` (from ``fit.varcorr``) and
    ``sigma^2_e`` the residual variance of :func:`latent_residual_variance`: ``sigma^2``
    for Gaussian fits, ``pi^2/3`` (logit), ``1`` (probit), ``pi^2/6`` (cloglog), the
    lognormal approximation ``log(1 + 1/lambda)`` for Poisson (Nakagawa et al. 2017).

    Only random intercepts enter: random slopes make the ICC depend on the covariates
    and are left out (the "ICC at covariate 0" of models with slopes would need their
    design values); a grouping factor without a random intercept is omitted.

    Parameters
    ----------
    fit : FitResult
    poisson_lambda : {"mean", "median"}
        How the expected count of a Poisson model is computed (see
        :func:`latent_residual_variance`).

    Returns
    -------
    dict
        Grouping factor -> ICC (floats); empty for a fit without random effects.
    """
    vc = fit.varcorr
    rows = vc[vc["term2"].isna() & (vc["term1"] == "(Intercept)") & (vc["group"] != "Residual")]
    if rows.empty:
        return {}
    variances = rows.groupby("group", sort=False)["variance"].sum()
    total = float(variances.sum())
    intercept = None
    if "(Intercept)" in list(fit.fixed["term"]):
        intercept = float(fit.fixed.loc[fit.fixed["term"] == "(Intercept)", "estimate"].iloc[0])
    resid = latent_residual_variance(fit.family, fit.link, intercept=intercept, re_variance_total=total,
                                     sigma=float(fit.sigma), poisson_lambda=poisson_lambda)
    return {str(g): float(v) / (total + resid) for g, v in variances.items()}

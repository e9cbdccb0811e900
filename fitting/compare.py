"""Comparing nested fits (likelihood-ratio test) and exponentiated coefficients.

:func:`lrt`
    ``2 (loglik_big - loglik_small)`` against ``chi2(df)``, ``df`` the difference in the
    number of parameters, after checking that the two fits can be compared (same
    observations, family and link, log-likelihoods on the same scale: both Laplace, both
    quadrature with the same nodes, or exact GLM/LMM ML log-likelihoods; REML fits only
    with identical fixed effects). When the larger model adds random-effect variance
    parameters, the null value lies on the boundary of the parameter space and the
    ``chi2(df)`` reference is conservative. For the two cases with a known asymptotic
    distribution (Self & Liang 1987; Stram & Lee 1994) :class:`LRTResult` also carries
    the mixture p-value: adding one variance component (``df = 1``): ``0.5 chi2_0 +
    0.5 chi2_1``; adding one random-effect column to a term with ``k`` correlated columns
    (``df = k + 1``): ``0.5 chi2_k + 0.5 chi2_(k+1)``.
:func:`exponentiate`, :func:`odds_ratios`
    ``exp(beta)`` with delta-method standard errors and ``exp`` of the Wald (or
    profile) limits: odds ratios for the logit link, incidence-rate ratios for
    Poisson/log (mean ratios for other log-link families).

References
----------
Self SG, Liang K-Y (1987). Asymptotic properties of maximum likelihood estimators and
likelihood ratio tests under nonstandard conditions. JASA 82:605-610.
Stram DO, Lee JW (1994). Variance components testing in the longitudinal mixed effects
model. Biometrics 50:1171-1177.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats

from .errors import FamilyError, FittingError

__all__ = ["LRTResult", "lrt", "exponentiate", "odds_ratios", "n_parameters", "loglik_scale"]

_LOGLIK_TOL = 1e-6  # a larger model may fall short of the smaller one by optimiser noise


def n_parameters(fit) -> int:
    """Number of estimated parameters: fixed effects, ``theta``, and ``sigma`` (Gaussian)."""
    return len(fit.beta) + len(fit.theta) + (1 if fit.family == "gaussian" else 0)


def loglik_scale(fit) -> str:
    """Which log-likelihood a fit reports, for comparability checks.

    Returns
    -------
    str
        ``"exact"`` (GLM, Gaussian ML), ``"reml"``, ``"laplace"`` or ``"agq<n>"``.
    """
    method = str(fit.method).lower()
    if fit.reml:
        return "reml"
    if method in ("irls", "ml"):
        return "exact"
    if method.startswith("laplace"):
        return "laplace"
    if method.startswith("agq"):
        from .profile import fit_nagq

        try:
            return f"agq{fit_nagq(fit)}"
        except FittingError:
            return "agq"
    return method


def _re_parameters(fit) -> set:
    vc = fit.varcorr
    vc = vc[vc["group"] != "Residual"]
    return {(r.group, r.term1, None if pd.isna(r.term2) else r.term2) for r in vc.itertuples()}


@dataclass(frozen=True)
class LRTResult:
    """Likelihood-ratio test of two nested fits.

    Attributes
    ----------
    statistic : float
        ``2 (loglik_big - loglik_small)`` (negative values from optimiser noise are set
        to 0).
    df : int
        Difference in the number of parameters.
    p_value : float
        ``P(chi2_df > statistic)``.
    p_value_boundary : float or None
        Mixture-of-chi-square p-value when the extra parameters are one variance
        component or one added random-effect column (see the module docstring); None
        otherwise.
    caveat : str
        What the p-values assume; mentions the boundary when variance parameters are
        tested.
    models : tuple of str
        Formulas (small, big).
    npar : tuple of int
    loglik, aic, bic : tuple of float
    scale : str
        Log-likelihood scale (``"laplace"``, ``"exact"``, ...).
    """

    statistic: float
    df: int
    p_value: float
    p_value_boundary: float | None
    caveat: str
    models: tuple = ()
    npar: tuple = ()
    loglik: tuple = ()
    aic: tuple = ()
    bic: tuple = ()
    scale: str = ""

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return {"statistic": float(self.statistic), "df": int(self.df), "p_value": float(self.p_value),
                "p_value_boundary": None if self.p_value_boundary is None else float(self.p_value_boundary),
                "caveat": self.caveat, "models": list(self.models), "npar": list(self.npar),
                "loglik": list(self.loglik), "aic": list(self.aic), "bic": list(self.bic),
                "scale": self.scale}

    def __str__(self) -> str:
        head = ["", "npar", "AIC", "BIC", "logLik", "deviance", "Chisq", "Df", "Pr(>Chisq)"]
        rows = [head]
        for i, label in enumerate(("small", "big")):
            row = [label, str(self.npar[i]), f"{self.aic[i]:.4f}", f"{self.bic[i]:.4f}",
                   f"{self.loglik[i]:.4f}", f"{-2 * self.loglik[i]:.4f}"]
            row += ([f"{self.statistic:.4f}", str(self.df), _fmt_p(self.p_value)] if i else ["", "", ""])
            rows.append(row)
        widths = [max(len(r[j]) for r in rows) for j in range(len(head))]
        lines = [f"Likelihood-ratio test ({self.scale} log-likelihoods)",
                 f"small: {self.models[0]}", f"big:   {self.models[1]}", ""]
        lines += ["  ".join(r[j].ljust(widths[j]) if j == 0 else r[j].rjust(widths[j])
                            for j in range(len(head))).rstrip() for r in rows]
        if self.p_value_boundary is not None:
            lines.append(f"Boundary-corrected p-value (chi-square mixture): {_fmt_p(self.p_value_boundary)}")
        lines.append(textwrap.fill(f"Note: {self.caveat}", width=100, subsequent_indent="  "))
        return "\n".join(lines)

    __repr__ = __str__


def _fmt_p(p: float) -> str:
    return "< 2.2e-16" if p < 2.2e-16 else f"{p:.4g}"


def _check_comparable(small, big) -> str:
    if small.nobs != big.nobs:
        raise FittingError(f"the fits use different numbers of observations ({small.nobs} vs {big.nobs}); "
                           "likelihood-ratio tests need the same data")
    if (small.family, small.link) != (big.family, big.link):
        raise FittingError(f"the fits have different families/links ({small.family}/{small.link} vs "
                           f"{big.family}/{big.link})")
    ds, db = getattr(small, "design", None), getattr(big, "design", None)
    if ds is not None and db is not None and not (
            np.array_equal(ds.y, db.y) and np.array_equal(ds.weights, db.weights)):
        raise FittingError("the fits use different responses or weights; they are not nested")
    for f in (small, big):
        if "penal" in str(f.method) or getattr(f.diagnostics, "penalized", False):
            raise FittingError(f"a penalised fit (method {f.method!r}) maximises a penalised likelihood; "
                               "likelihood-ratio tests need unpenalised fits")
    s_scale, b_scale = loglik_scale(small), loglik_scale(big)
    if "reml" in (s_scale, b_scale):
        if s_scale != b_scale:
            raise FittingError("cannot compare a REML fit with an ML fit; refit both with reml=False")
        if list(small.fixed["term"]) != list(big.fixed["term"]):
            raise FittingError("REML log-likelihoods of models with different fixed effects are not "
                               "comparable; refit both with reml=False")
        return "reml"
    if s_scale == b_scale:
        return s_scale
    if "exact" in (s_scale, b_scale):  # a GLM has no approximation; compare with either
        return b_scale if s_scale == "exact" else s_scale
    raise FittingError(f"the log-likelihoods are on different scales ({s_scale} vs {b_scale}); refit both "
                       "with the same method (and number of quadrature nodes)")


def _check_nested(small, big):
    fs, fb = set(small.fixed["term"]), set(big.fixed["term"])
    rs, rb = _re_parameters(small), _re_parameters(big)
    missing_f = sorted(fs - fb)
    missing_r = sorted(f"{g}: {t1}" + (f"/{t2}" if t2 else "") for g, t1, t2 in rs - rb)
    if missing_f or missing_r:
        what = ", ".join(missing_f + missing_r)
        raise FittingError(f"the smaller model has parameters the larger one lacks ({what}); the models do "
                           "not look nested (pass check_nested=False if they are under another "
                           "parametrisation)")


def _boundary(small, big, df):
    """Mixture p-value parameters: k of 0.5 chi2_k + 0.5 chi2_(k+1), or None; and a caveat."""
    same_fixed = set(small.fixed["term"]) == set(big.fixed["term"])
    extra = _re_parameters(big) - _re_parameters(small)
    if not extra:
        return None, ("chi-square reference for the difference in fixed effects (asymptotic; for "
                      "GLMMs the Laplace/quadrature log-likelihood is itself an approximation)")
    caveat = ("the larger model adds random-effect variance parameters whose null value (0) lies on the "
              "boundary of the parameter space: the chi-square p-value is conservative")
    if not same_fixed:
        return None, caveat + "; fixed effects differ too, so no boundary correction is available"
    new_var = [e for e in extra if e[2] is None]
    new_cov = [e for e in extra if e[2] is not None]
    if len(new_var) != 1 or len(new_cov) != df - 1:
        return None, caveat + "; no simple chi-square mixture applies to this difference"
    g, term, _ = new_var[0]
    if any(term not in (t1, t2) or gg != g for gg, t1, t2 in new_cov):
        return None, caveat + "; no simple chi-square mixture applies to this difference"
    k = df - 1
    mix = "0.5 chi2_0 + 0.5 chi2_1" if k == 0 else f"0.5 chi2_{k} + 0.5 chi2_{k + 1}"
    return k, (caveat + f"; the boundary-corrected p-value uses the {mix} mixture (Self & Liang 1987"
               + (")" if k == 0 else "; Stram & Lee 1994)"))


def lrt(small, big, *, check_nested: bool = True) -> LRTResult:
    """Likelihood-ratio test of a smaller fit against a larger one it is nested in.

    Parameters
    ----------
    small, big : FitResult
        Fits of the same data; ``big`` has more parameters.
    check_nested : bool
        Require the smaller model's fixed-effect names and random-effect parameters to be
        among the larger one's.

    Returns
    -------
    LRTResult

    Raises
    ------
    FittingError
        Different data sizes, families/links or log-likelihood scales (Laplace vs
        quadrature, REML vs ML), REML fits with different fixed effects, not more
        parameters in ``big``, or (``check_nested``) non-nested parameter names.
    """
    scale = _check_comparable(small, big)
    ps, pb = n_parameters(small), n_parameters(big)
    if pb <= ps:
        raise FittingError(f"the larger model must have more parameters ({pb} vs {ps}); swap the arguments?")
    if check_nested:
        _check_nested(small, big)
    df = pb - ps
    stat = 2.0 * (float(big.loglik) - float(small.loglik))
    caveat_extra = ""
    if stat < -2.0 * _LOGLIK_TOL * max(1.0, abs(float(big.loglik))):
        caveat_extra = (f"; the larger model's log-likelihood is below the smaller one's by {-stat / 2:.3g}: "
                        "it is not at its maximum (refit it starting from the smaller model)")
    stat = max(stat, 0.0)
    p = float(stats.chi2.sf(stat, df))
    k, caveat = _boundary(small, big, df)
    p_b = None
    if k is not None:
        p_b = 0.5 * float(stats.chi2.sf(stat, df))
        if k > 0:
            p_b += 0.5 * float(stats.chi2.sf(stat, k))
    return LRTResult(
        statistic=stat, df=df, p_value=p, p_value_boundary=p_b, caveat=caveat + caveat_extra,
        models=(small.formula, big.formula), npar=(ps, pb),
        loglik=(float(small.loglik), float(big.loglik)), aic=(float(small.aic), float(big.aic)),
        bic=(float(small.bic), float(big.bic)), scale=scale,
    )


# ------------------------------------------------------------------ exponentiate
_QUANTITY = {"logit": "odds ratio", "log": "incidence-rate ratio"}


def exponentiate(fit, level: float = 0.95, *, method: str = "wald", design=None) -> pd.DataFrame:
    """Exponentiated fixed effects: odds ratios (logit) or incidence-rate ratios (log).

    Parameters
    ----------
    fit : FitResult
        Logit or log link.
    level : float
    method : {"wald", "profile"}
        Limits ``exp(beta +- z se)`` or ``exp`` of the profile limits
        (:func:`fitting.profile.profile_confint`, needs the design).
    design : Design, optional
        For ``method="profile"`` (default ``fit.design``).

    Returns
    -------
    pandas.DataFrame
        ``term, estimate, std_error, conf_low, conf_high`` with ``estimate = exp(beta)``
        and the delta-method ``std_error = exp(beta) se(beta)``; ``attrs["quantity"]``
        is ``"odds ratio"`` / ``"incidence-rate ratio"`` (``"mean ratio"`` for a
        non-Poisson log link). The intercept row is the baseline odds/rate, not a ratio.

    Raises
    ------
    FamilyError
        Any other link (named).
    """
    link = fit.link
    if link not in _QUANTITY:
        raise FamilyError(f"exponentiated coefficients are ratios only for the logit and log links; this "
                          f"fit uses the {link!r} link")
    level = float(level)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    terms = list(fit.fixed["term"])
    est = fit.fixed["estimate"].to_numpy(float)
    se = fit.fixed["std_error"].to_numpy(float)
    if method == "wald":
        z = float(special.ndtri(0.5 * (1.0 + level)))
        lo, hi = est - z * se, est + z * se
    elif method == "profile":
        from .profile import profile_confint

        pc = profile_confint(fit, parm="beta_", level=level, design=design).set_index("parameter")
        lo, hi = pc.loc[terms, "conf_low"].to_numpy(), pc.loc[terms, "conf_high"].to_numpy()
    else:
        raise ValueError(f"method must be 'wald' or 'profile', got {method!r}")
    out = pd.DataFrame({"term": terms, "estimate": np.exp(est), "std_error": np.exp(est) * se,
                        "conf_low": np.exp(lo), "conf_high": np.exp(hi)})
    quantity = _QUANTITY[link]
    if link == "log" and fit.family != "poisson":
        quantity = "mean ratio"
    out.attrs["quantity"] = quantity
    out.attrs["level"] = level
    out.attrs["method"] = method
    return out


def odds_ratios(fit, level: float = 0.95, *, method: str = "wald", design=None) -> pd.DataFrame:
    """Odds ratios ``exp(beta)`` of a logit-link fit (see :func:`exponentiate`).

    Raises
    ------
    FamilyError
        A link other than logit; for the log link use :func:`exponentiate`
        (incidence-rate ratios).
    """
    if fit.link != "logit":
        hint = "; use exponentiate() for incidence-rate ratios" if fit.link == "log" else ""
        raise FamilyError(f"odds ratios need the logit link; this fit uses the {fit.link!r} link{hint}")
    return exponentiate(fit, level, method=method, design=design)

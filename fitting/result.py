"""Fit results: :class:`FitResult`, :class:`OptInfo`, :class:`Diagnostics` and ``summary()``."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from .design import Design

__all__ = ["OptInfo", "Diagnostics", "FitResult"]


def _jsonable(v):
    if isinstance(v, (np.floating, float)):
        f = float(v)
        return f if math.isfinite(f) else None
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, (tuple, list, np.ndarray)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    return v


@dataclass(frozen=True)
class OptInfo:
    """The optimisation record of a fit (stored verbatim with every result).

    Attributes
    ----------
    optimizer : str
        E.g. ``"L-BFGS-B"``, ``"IRLS"``.
    evaluations : int
        Objective evaluations of the optimisation (excluding the final Hessian).
    elapsed : float
        Seconds for the whole fit.
    final_gradient : tuple of float
        Gradient of the objective at the estimate over (θ, β) for GLMMs, θ for LMMs.
    message : str
    initial, final : tuple of float
        Parameter vector at the start and at the end (same layout as the gradient).
    converged_code : int
        0 converged; 1 iteration limit; 2 other stop.
    extra : dict
        Further details (tolerances, PIRLS iterations, Hessian evaluations, ...).
    """

    optimizer: str
    evaluations: int
    elapsed: float
    final_gradient: tuple
    message: str
    initial: tuple
    final: tuple
    converged_code: int
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-serialisable dict (non-finite numbers become ``None``)."""
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class Diagnostics:
    """Convergence diagnostics.

    Attributes
    ----------
    converged : bool
        Optimiser stopped normally, the (scaled) gradient is below tolerance and the
        Hessian is positive definite (where computed).
    singular : bool
        A diagonal entry of a relative covariance factor is (near) zero.
    max_grad : float
        Largest absolute gradient component at the estimate.
    hessian_pd : bool or None
        Whether the Hessian used for inference is positive definite (None if not computed).
    warnings : tuple of str
    laplace_adequacy : dict or None
        Binomial/Poisson GLMMs with one grouping factor: the change of the log-likelihood
        from Laplace to adaptive quadrature at the estimates
        (:func:`fitting.agq.laplace_adequacy` keys); None when not checked.
    separation : dict or None
        Binomial fits when checked (:func:`fitting.separation.detect_separation`):
        ``separated, kind, terms, message, direction``; None when not checked.
    degenerate_groups : dict or None
        Binomial/Poisson GLMMs: grouping factor -> counts of groups whose outcomes are
        all 0 (or all 1) (:func:`fitting.separation.degenerate_groups`).
    penalized : bool
        The estimates maximise a penalised likelihood (``control={"penalty": ...}``).
    """

    converged: bool
    singular: bool
    max_grad: float
    hessian_pd: bool | None
    warnings: tuple = ()
    laplace_adequacy: dict | None = None
    separation: dict | None = None
    degenerate_groups: dict | None = None
    penalized: bool = False

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class FitResult:
    """Result of :func:`fitting.fit` (see docs/ARCHITECTURE.md for the fields).

    Conventions: ``method`` is the method actually used (``"laplace"`` for GLMMs,
    ``"agq"`` for adaptive quadrature with ``nagq`` nodes, ``"laplace+penalized"`` for a
    penalised Laplace fit, ``"ml"`` or ``"reml"`` for LMMs, ``"irls"`` without random
    effects); ``theta``/``theta_names``, ``varcorr`` and ``ranef`` are in lme4's term order
    (most levels first); ``fixed`` holds Wald statistics with normal p-values and 95%
    intervals for every model (lme4 prints no p-values for LMMs); ``sigma`` is 1 for
    binomial/Poisson; for LMMs ``loglik`` is the REML log-likelihood when ``reml`` and
    ``deviance = -2 loglik``. GLMM log-likelihoods (Laplace and AGQ) include all
    normalising constants.

    Fields added after the core ones (all optional):

    nagq : int
        Quadrature nodes per dimension behind ``loglik`` (1 = Laplace or not a GLMM).
    vcov_full : pandas.DataFrame or None
        Covariance of ``(theta, beta)``, ``2 H^-1`` from the Hessian of the deviance
        the fit computed (GLMMs with ``se="hessian"``); labelled by ``theta_names``
        then the fixed-effect names.
    design : Design or None
        The design the fit was made from (set by :func:`fitting.fit`; needed by
        :meth:`predict`, :meth:`marginal_coefs` and profile intervals). Not compared,
        not in ``repr``.

    The methods :meth:`predict`, :meth:`confint`, :meth:`marginal_coefs`, :meth:`icc`,
    :meth:`odds_ratios` and :meth:`exponentiate` delegate to :mod:`fitting.prediction`,
    :mod:`fitting.profile`, :mod:`fitting.marginal` and :mod:`fitting.compare`.
    """

    formula: str
    family: str
    link: str
    method: str
    reml: bool
    nobs: int
    ngroups: dict
    fixed: pd.DataFrame
    varcorr: pd.DataFrame
    ranef: pd.DataFrame
    loglik: float
    aic: float
    bic: float
    deviance: float
    theta: np.ndarray
    theta_names: tuple
    beta: np.ndarray
    vcov: pd.DataFrame
    sigma: float
    optinfo: OptInfo
    diagnostics: Diagnostics
    nagq: int = 1
    vcov_full: pd.DataFrame | None = field(default=None, repr=False, compare=False)
    design: Design | None = field(default=None, repr=False, compare=False)

    def __repr__(self) -> str:
        return (f"FitResult({self.formula!r}, family={self.family}/{self.link}, nobs={self.nobs}, "
                f"loglik={self.loglik:.4f}, converged={self.diagnostics.converged})")

    __str__ = __repr__

    # ------------------------------------------------------------ summary
    def summary(self, correlation: bool = False, residuals: bool = False) -> str:
        """A text summary laid out like lme4's ``summary()``.

        Parameters
        ----------
        correlation : bool
            Append the correlation of the fixed effects.
        residuals : bool
            Unused placeholder for scaled residuals (not stored in the result).
        """
        lines = []
        has_re = len(self.ngroups) > 0
        gauss = self.family == "gaussian" and self.link == "identity"
        if has_re and gauss:
            crit = "REML" if self.reml else "maximum likelihood"
            lines.append(f"Linear mixed model fit by {crit}")
        elif has_re:
            lines.append(f"Generalized linear mixed model fit by maximum likelihood "
                         f"({self._approximation()}) ['glmerMod']")
            lines.append(f" Family: {self.family}  ( {self.link} )")
        else:
            lines.append(f"Generalized linear model fit by maximum likelihood (IRLS)")
            lines.append(f" Family: {self.family}  ( {self.link} )")
        lines.append(f"Formula: {self.formula}")
        lines.append("")
        df_resid = self.nobs - self._df()
        if self.reml:
            lines.append(f"REML criterion at convergence: {self.deviance:.1f}")
        else:
            lines.append(f"{'AIC':>9} {'BIC':>9} {'logLik':>9} {'deviance':>9} {'df.resid':>9}")
            lines.append(f"{self.aic:9.1f} {self.bic:9.1f} {self.loglik:9.1f} {self.deviance:9.1f} {df_resid:9d}")
        lines.append("")
        if has_re:
            lines.append("Random effects:")
            lines.extend(self._varcorr_lines())
            grp = ", ".join(f"{g}, {n}" for g, n in self.ngroups.items())
            lines.append(f"Number of obs: {self.nobs}, groups:  {grp}")
            lines.extend(self._icc_lines())
            lines.append("")
        lines.append("Fixed effects:")
        lines.extend(self._fixed_lines(gauss and has_re))
        if correlation and len(self.beta) > 1:
            lines.append("")
            lines.append("Correlation of Fixed Effects:")
            v = self.vcov.to_numpy()
            sd = np.sqrt(np.diag(v))
            c = v / np.outer(sd, sd)
            names = list(self.vcov.columns)
            w = max(len(n) for n in names)
            for i in range(1, len(names)):
                lines.append(f"{names[i]:<{w}} " + " ".join(f"{c[i, j]:6.3f}" for j in range(i)))
        notes = list(self.diagnostics.warnings)
        if self.diagnostics.singular:
            notes.append("boundary (singular) fit: see help('isSingular')")
        if not self.diagnostics.converged:
            notes.append(f"Model failed to converge with max|grad| = {self.diagnostics.max_grad:.6g}")
        if notes:
            lines.append("")
            lines.append("Convergence notes / warnings:")
            lines.extend(f"  {n}" for n in dict.fromkeys(notes))
        return "\n".join(lines)

    def _approximation(self) -> str:
        if str(self.method).startswith("agq"):
            return f"Adaptive Gauss-Hermite Quadrature, nAGQ = {self.nagq}"
        if "penal" in str(self.method):
            return "Laplace Approximation, penalised: not MLE"
        return "Laplace Approximation"

    def _icc_lines(self) -> list:
        from .errors import FittingError
        from .marginal import latent_residual_variance

        try:
            values = self.icc()
        except (FittingError, ValueError):
            return []
        if not values:
            return []
        txt = ", ".join(f"{g} {v:.4f}" for g, v in values.items())
        if self.family == "gaussian":
            return [f"ICC (random intercepts): {txt}"]
        note = {"logit": "pi^2/3", "probit": "1", "cloglog": "pi^2/6"}.get(self.link)
        if self.family == "binomial" and note is not None:
            resid = latent_residual_variance(self.family, self.link)
            scale = f"latent scale, residual variance {note} = {resid:.4g}"
        else:
            scale = "latent scale, lognormal approximation" if self.family == "poisson" else "latent scale"
        return [f"ICC ({scale}): {txt}"]

    # ------------------------------------------------------------ inference helpers
    def predict(self, newdata=None, **kw) -> np.ndarray:
        """Predictions; see :func:`fitting.prediction.predict` for the options.

        Examples
        --------
        >>> fit.predict(re="marginal")          # doctest: +SKIP
        >>> fit.predict(new_df, re_quantile=0.8)  # doctest: +SKIP
        """
        from .prediction import predict

        return predict(self, newdata, **kw)

    def confint(self, parm=None, level: float = 0.95, method: str = "wald", **kw) -> pd.DataFrame:
        """Confidence intervals of the fixed effects and random-effect sds.

        Parameters
        ----------
        parm : None, str or list of str
            Parameter names, or ``"beta_"`` / ``"theta_"`` (see
            :func:`fitting.profile.wald_confint`).
        level : float
        method : {"wald", "profile"}
            Wald (fixed effects only; sds get NaN limits, like lme4) or profile
            likelihood (:func:`fitting.profile.profile_confint`; binomial/Poisson GLMMs,
            needs ``design``).
        **kw
            Passed to :func:`fitting.profile.profile_confint` (``design``, ``nagq``,
            ``gtol``).

        Returns
        -------
        pandas.DataFrame
            ``parameter, estimate, conf_low, conf_high, method``.
        """
        from .profile import profile_confint, wald_confint

        if method == "wald":
            if kw:
                raise ValueError(f"method='wald' takes no further options, got {sorted(kw)}")
            return wald_confint(self, level=level, parm=parm)
        if method == "profile":
            return profile_confint(self, parm=parm, level=level, **kw)
        raise ValueError(f"method must be 'wald' or 'profile', got {method!r}")

    def marginal_coefs(self, **kw) -> pd.DataFrame:
        """Population-averaged coefficients; see :func:`fitting.marginal.marginal_coefs`."""
        from .marginal import marginal_coefs

        return marginal_coefs(self, **kw)

    def icc(self, **kw) -> dict:
        """Latent-scale ICC per grouping factor; see :func:`fitting.marginal.icc`."""
        from .marginal import icc

        return icc(self, **kw)

    def odds_ratios(self, level: float = 0.95, **kw) -> pd.DataFrame:
        """Odds ratios with intervals; see :func:`fitting.compare.odds_ratios`."""
        from .compare import odds_ratios

        return odds_ratios(self, level, **kw)

    def exponentiate(self, level: float = 0.95, **kw) -> pd.DataFrame:
        """``exp(beta)`` with intervals; see :func:`fitting.compare.exponentiate`."""
        from .compare import exponentiate

        return exponentiate(self, level, **kw)

    def _df(self) -> int:
        return len(self.beta) + len(self.theta) + (1 if self.family == "gaussian" else 0)

    def _varcorr_lines(self) -> list:
        vc = self.varcorr
        rows = [("Groups", "Name", "Variance", "Std.Dev.", "Corr")]
        for g in dict.fromkeys(vc["group"]):
            sub = vc[vc["group"] == g]
            var = sub[sub["term2"].isna()]
            cov = sub[sub["term2"].notna()]
            terms = list(var["term1"])
            for i, (_, r) in enumerate(var.iterrows()):
                corr = ""
                if i > 0:
                    cs = []
                    for t2 in terms[:i]:
                        m = cov[((cov["term1"] == t2) & (cov["term2"] == r["term1"]))
                                | ((cov["term1"] == r["term1"]) & (cov["term2"] == t2))]
                        cs.append(f"{m['correlation'].iloc[0]:5.2f}" if len(m) else "")
                    corr = " ".join(cs)
                name = r["term1"] if r["term1"] is not None else ""
                rows.append((g if i == 0 else "", name, f"{r['variance']:.4g}", f"{r['sd']:.4g}", corr))
        widths = [max(len(str(r[i])) for r in rows) for i in range(5)]
        return [" " + "  ".join(str(r[i]).ljust(widths[i]) if i < 2 else str(r[i]).rjust(widths[i])
                                for i in range(5)).rstrip() for r in rows]

    def _fixed_lines(self, t_only: bool) -> list:
        f = self.fixed
        stat = "t value" if t_only else "z value"
        hdr = ["", "Estimate", "Std. Error", stat] + ([] if t_only else ["Pr(>|z|)"])
        rows = [hdr]
        for _, r in f.iterrows():
            row = [r["term"], f"{r['estimate']:.6g}", f"{r['std_error']:.6g}", f"{r['statistic']:.3f}"]
            if not t_only:
                row.append(f"{r['p_value']:.3g}")
            rows.append(row)
        widths = [max(len(str(r[i])) for r in rows) for i in range(len(hdr))]
        return ["  ".join(str(r[i]).ljust(widths[i]) if i == 0 else str(r[i]).rjust(widths[i])
                          for i in range(len(hdr))) for r in rows]

"""Fit results: :class:`FitResult`, :class:`OptInfo`, :class:`Diagnostics` and ``summary()``."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

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
    """

    converged: bool
    singular: bool
    max_grad: float
    hessian_pd: bool | None
    warnings: tuple = ()

    def to_dict(self) -> dict:
        """JSON-serialisable dict."""
        return _jsonable(asdict(self))


@dataclass(frozen=True)
class FitResult:
    """Result of :func:`fitting.fit` (see docs/ARCHITECTURE.md for the fields).

    Conventions: ``method`` is the method actually used (``"laplace"`` for GLMMs, ``"ml"``
    or ``"reml"`` for LMMs, ``"irls"`` without random effects); ``theta``/``theta_names``,
    ``varcorr`` and ``ranef`` are in lme4's term order (most levels first); ``fixed`` holds
    Wald statistics with normal p-values and 95% intervals for every model (lme4 prints no
    p-values for LMMs); ``sigma`` is 1 for binomial/Poisson; for LMMs ``loglik`` is the
    REML log-likelihood when ``reml`` and ``deviance = -2 loglik``.
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
                         f"(Laplace Approximation) ['glmerMod']")
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

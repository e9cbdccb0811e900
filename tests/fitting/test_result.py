"""fitting.fit API, control validation, plain GLM/LM fits and FitResult packaging."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, special, stats

import fitting
from fitting import ConvergenceError, FamilyError, FitResult
from fitting.result import Diagnostics, OptInfo

from . import _designs as D


@pytest.fixture(scope="module")
def cbpp_fit():
    ex = D.expected()["cbpp_glmer_laplace"]
    return fitting.fit(ex["formula"], D.load("cbpp"), "binomial")


# ----------------------------------------------------------------------- GLM, no RE
def test_binomial_glm_equals_direct_maximisation():
    df = D.load("cbpp")
    r = fitting.fit("cbind(incidence, size - incidence) ~ period", df, "binomial")
    des = D.cbpp()
    k = des.y * des.weights
    n = des.weights

    def nll(b):
        eta = des.X @ b
        return -np.sum(k * eta - n * np.logaddexp(0, eta))

    res = optimize.minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(r.beta, res.x, atol=1e-5)
    const = np.sum(special.gammaln(n + 1) - special.gammaln(k + 1) - special.gammaln(n - k + 1))
    assert r.loglik == pytest.approx(-res.fun + const, abs=1e-8)
    # Fisher information at the optimum
    mu = special.expit(des.X @ r.beta)
    info = des.X.T @ ((n * mu * (1 - mu))[:, None] * des.X)
    np.testing.assert_allclose(r.vcov.to_numpy(), np.linalg.inv(info), rtol=1e-6)
    assert r.varcorr.empty and r.ranef.empty and r.ngroups == {}
    assert r.theta.size == 0 and r.sigma == 1.0
    assert r.optinfo.optimizer == "IRLS" and r.diagnostics.converged


def test_poisson_glm_equals_direct_maximisation():
    df = D.load("grouseticks")
    r = fitting.fit("TICKS ~ YEAR + scale(HEIGHT)", df, "poisson")
    des = D.grouseticks()

    def nll(b):
        eta = des.X @ b
        return -np.sum(des.y * eta - np.exp(eta))

    res = optimize.minimize(nll, np.zeros(4), method="BFGS", options={"gtol": 1e-9})
    np.testing.assert_allclose(r.beta, res.x, atol=1e-5)
    assert r.loglik == pytest.approx(np.sum(stats.poisson.logpmf(des.y, np.exp(des.X @ r.beta))), abs=1e-8)


def test_gaussian_lm_equals_least_squares():
    df = D.load("sleepstudy")
    r = fitting.fit("Reaction ~ Days", df)
    X = np.column_stack([np.ones(len(df)), df["Days"].to_numpy(float)])
    y = df["Reaction"].to_numpy()
    b, rss, *_ = np.linalg.lstsq(X, y, rcond=None)
    np.testing.assert_allclose(r.beta, b, rtol=1e-10)
    n, p = X.shape
    assert r.sigma == pytest.approx(np.sqrt(rss[0] / (n - p)))
    assert r.loglik == pytest.approx(np.sum(stats.norm.logpdf(y, X @ b, np.sqrt(rss[0] / n))))
    np.testing.assert_allclose(r.vcov.to_numpy(), rss[0] / (n - p) * np.linalg.inv(X.T @ X), rtol=1e-8)


# ----------------------------------------------------------------------- validation
def test_unknown_control_key_is_named():
    with pytest.raises(ValueError, match="'bogus'"):
        fitting.fit("Reaction ~ Days + (1 | Subject)", D.load("sleepstudy"), control={"bogus": 1})


def test_bad_control_values():
    df = D.load("sleepstudy")
    with pytest.raises(ValueError, match="se"):
        fitting.fit("Reaction ~ Days + (1 | Subject)", df, control={"se": "sandwich"})
    with pytest.raises(ValueError, match="theta"):
        fitting.fit("Reaction ~ Days + (1 | Subject)", df, control={"start": {"theta": [1, 2]}})


def test_agq_rejected_for_gaussian_and_bad_nagq():
    with pytest.raises(FamilyError, match="agq"):
        fitting.fit("Reaction ~ Days + (1 | Subject)", D.load("sleepstudy"), method="agq")
    with pytest.raises(ValueError, match="nagq"):
        fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", D.load("cbpp"),
                    "binomial", method="agq", control={"nagq": 0})
    with pytest.raises(ValueError, match="only applies to method='agq'"):
        fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", D.load("cbpp"),
                    "binomial", control={"nagq": 5})


def test_unknown_method():
    with pytest.raises(ValueError, match="unknown method"):
        fitting.fit("Reaction ~ Days + (1 | Subject)", D.load("sleepstudy"), method="mcmc")


def test_reml_only_for_gaussian():
    with pytest.raises(FamilyError, match="reml"):
        fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", D.load("cbpp"),
                    "binomial", reml=True)
    assert issubclass(FamilyError, ValueError)


def test_unknown_family():
    with pytest.raises(FamilyError, match="gamma"):
        fitting.fit("Reaction ~ Days", D.load("sleepstudy"), "gamma")


def test_gaussian_log_link_with_random_effects_rejected():
    with pytest.raises(FamilyError, match="identity"):
        fitting.fit("Reaction ~ Days + (1 | Subject)", D.load("sleepstudy"), "gaussian", "log")


def test_convergence_error_is_a_fitting_error():
    assert issubclass(ConvergenceError, fitting.FittingError)


# ----------------------------------------------------------------------- packaging
def test_fitresult_fields(cbpp_fit):
    r = cbpp_fit
    assert isinstance(r, FitResult)
    assert list(r.fixed.columns) == ["term", "estimate", "std_error", "statistic", "p_value",
                                     "conf_low", "conf_high"]
    assert list(r.varcorr.columns) == ["group", "term1", "term2", "variance", "sd", "correlation"]
    assert list(r.ranef.columns) == ["group", "level", "term", "mode", "cond_sd"]
    f = r.fixed
    np.testing.assert_allclose(f["statistic"], f["estimate"] / f["std_error"])
    np.testing.assert_allclose(f["p_value"], 2 * stats.norm.sf(np.abs(f["statistic"])))
    np.testing.assert_allclose(f["conf_high"] - f["estimate"], stats.norm.ppf(0.975) * f["std_error"])
    assert r.deviance == pytest.approx(-2 * r.loglik)
    assert (r.family, r.link, r.method, r.reml) == ("binomial", "logit", "laplace", False)
    assert r.theta_names == ("herd.(Intercept)",)
    assert r.vcov.shape == (4, 4)
    with pytest.raises(Exception):
        r.loglik = 0.0  # frozen


def test_optinfo_and_diagnostics_json(cbpp_fit):
    r = cbpp_fit
    o = r.optinfo
    assert isinstance(o, OptInfo) and isinstance(r.diagnostics, Diagnostics)
    assert o.optimizer == "newton"  # one grouping factor: exact Newton (fitting.newton_fit)
    assert o.evaluations == len(o.extra["log"])
    assert len(o.final_gradient) == len(o.initial) == len(o.final) == 5
    assert o.converged_code == 0
    assert o.elapsed > 0
    json.dumps(o.to_dict(), allow_nan=False)
    d = r.diagnostics.to_dict()
    json.dumps(d, allow_nan=False)
    assert set(d) == {"converged", "singular", "max_grad", "hessian_pd", "warnings", "laplace_adequacy",
                      "separation", "degenerate_groups", "penalized"}


def test_summary_text(cbpp_fit):
    s = cbpp_fit.summary(correlation=True)
    for part in ["Laplace", "Family: binomial", "logit", "AIC", "BIC", "logLik", "deviance",
                 "df.resid", "Random effects:", "herd", "(Intercept)", "Number of obs: 56",
                 "Fixed effects:", "Estimate", "Std. Error", "z value", "Pr(>|z|)", "period2",
                 "Correlation of Fixed Effects"]:
        assert part in s, part
    assert "FitResult" in repr(cbpp_fit) and len(str(cbpp_fit)) < 200


def test_summary_lmm_and_glm():
    df = D.load("sleepstudy")
    s = fitting.fit("Reaction ~ Days + (Days | Subject)", df, reml=True).summary()
    assert "REML criterion" in s and "Residual" in s and "t value" in s and "Corr" in s
    s = fitting.fit("Reaction ~ Days", df).summary()
    assert "Fixed effects" in s


def test_design_warnings_are_reported():
    df = D.load("cbpp").copy()
    df["period_copy"] = df["period"]
    r = fitting.fit("cbind(incidence, size - incidence) ~ period + period_copy + (1 | herd)", df, "binomial")
    assert any("period_copy" in w for w in r.diagnostics.warnings)

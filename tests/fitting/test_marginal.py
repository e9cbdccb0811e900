"""Marginal coefficients and ICCs against closed forms and independent computations.

References: the probit attenuation ``beta / sqrt(1 + sigma^2)`` (exact); for the logit
link, marginal means by ``scipy.integrate.quad`` regressed with ``numpy.linalg.lstsq``
and the Zeger-Liang-Albert approximation ``beta / sqrt(1 + 0.346 sigma^2)``; delta-method
standard errors against a Monte Carlo propagation of the (theta, beta) covariance; ICCs
by hand from lme4's variance components (``tests/fixtures/lme4_expected.json``).
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import integrate, special, stats

import fitting
from fitting.errors import FamilyError
from fitting.frame import build_design
from fitting.marginal import icc, latent_residual_variance, marginal_coef_values, marginal_coefs
from fitting.profile import full_vcov

from ._designs import load as _load

FIX = Path(__file__).resolve().parents[1] / "fixtures"
REF = json.loads((FIX / "lme4_expected.json").read_text())["fits"]
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp_logit():
    df = _load("cbpp")
    return fitting.fit(CBPP, df, "binomial"), build_design(CBPP, df, "binomial")


# ------------------------------------------------------------------ marginal coefs
def test_probit_attenuation_is_exact():
    df = _load("cbpp")
    fit = fitting.fit(CBPP, df, "binomial", "probit")
    design = build_design(CBPP, df, "binomial")
    mc = marginal_coefs(fit, design=design)
    s2 = fit.theta[0] ** 2
    np.testing.assert_allclose(mc["estimate"], fit.beta / math.sqrt(1 + s2), atol=1e-6)
    # also through the numerical (Gauss-Hermite) path
    mc_gh = marginal_coefs(fit, design=design, nagq=41, std_errors=False)
    np.testing.assert_allclose(mc_gh["estimate"], fit.beta / math.sqrt(1 + s2), atol=1e-6)
    assert list(mc.columns) == ["term", "estimate", "std_error", "conf_low", "conf_high"]


def test_logit_against_quad_and_approximation(cbpp_logit):
    fit, design = cbpp_logit
    mc = marginal_coefs(fit, design=design)
    sigma = fit.theta[0]
    eta = design.X @ fit.beta
    mu = np.array([integrate.quad(lambda b: special.expit(e + b) * stats.norm.pdf(b, scale=sigma),
                                  -np.inf, np.inf, epsabs=1e-14, epsrel=1e-12)[0] for e in eta])
    ref, *_ = np.linalg.lstsq(design.X, special.logit(mu), rcond=None)
    np.testing.assert_allclose(mc["estimate"], ref, atol=1e-9)
    approx = fit.beta / math.sqrt(1 + 0.346 * sigma ** 2)
    np.testing.assert_allclose(mc["estimate"], approx, rtol=0.03)
    assert np.all(np.abs(mc["estimate"]) < np.abs(fit.beta))  # attenuated
    se = mc["std_error"].to_numpy()
    assert np.all(np.isfinite(se)) and np.all(se > 0)
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(mc["conf_high"] - mc["estimate"], z * se, rtol=1e-12)


def test_delta_method_against_monte_carlo(cbpp_logit):
    fit, design = cbpp_logit
    mc, Vm = marginal_coefs(fit, design=design, return_vcov=True)
    V = full_vcov(fit, design=design).to_numpy()
    x = np.concatenate([fit.theta, fit.beta])
    draws = np.random.default_rng(20240611).multivariate_normal(x, V, size=4000)
    vals = np.array([marginal_coef_values(design, "logit", d[:1], d[1:]) for d in draws])
    np.testing.assert_allclose(mc["std_error"], vals.std(axis=0, ddof=1), rtol=0.05)
    Vm = Vm.to_numpy()
    assert Vm.shape == (4, 4) and np.allclose(Vm, Vm.T)
    np.testing.assert_allclose(np.sqrt(np.diag(Vm)), mc["std_error"], rtol=1e-12)


def test_identity_link_and_glm_return_beta():
    df = _load("sleepstudy")
    f = "Reaction ~ Days + (Days | Subject)"
    fit = fitting.fit(f, df)
    mc = marginal_coefs(fit, design=build_design(f, df))
    np.testing.assert_allclose(mc["estimate"], fit.beta, rtol=1e-14)
    np.testing.assert_allclose(mc["std_error"], fit.fixed["std_error"], rtol=1e-12)
    g = "cbind(incidence, size - incidence) ~ period"
    glm = fitting.fit(g, _load("cbpp"), "binomial")
    mc = marginal_coefs(glm, design=build_design(g, _load("cbpp"), "binomial"))
    np.testing.assert_allclose(mc["estimate"], glm.beta, rtol=1e-14)


def test_random_slope_marginal_coefs_vs_quad():
    df = _load("Contraception")
    f = "use ~ age + I(age^2) + urban + livch + (urban | district)"
    fit = fitting.fit(f, df, "binomial")
    design = build_design(f, df, "binomial")
    got = marginal_coefs(fit, design=design, std_errors=False)["estimate"].to_numpy()
    vc = fit.varcorr
    v00, v11, v01 = vc["variance"].to_numpy()[:3]
    urban = design.X[:, list(design.x_names).index("urbanY")]
    eta = design.X @ fit.beta
    sd = np.sqrt(v00 + urban * (2 * v01 + v11))
    mu = np.empty(eta.size)
    for key in np.unique(np.round(np.column_stack([eta, sd]), 12), axis=0):  # rows share (eta, sd)
        e, s = key
        m = integrate.quad(lambda b: special.expit(e + s * b) * stats.norm.pdf(b), -np.inf, np.inf,
                           epsabs=1e-14, epsrel=1e-12)[0]
        mu[(np.abs(eta - e) < 1e-11) & (np.abs(sd - s) < 1e-11)] = m
    ref, *_ = np.linalg.lstsq(design.X, special.logit(mu), rcond=None)
    np.testing.assert_allclose(got, ref, atol=1e-8)


# --------------------------------------------------------------------------- ICC
def test_icc_sleepstudy_uses_residual_variance():
    df = _load("sleepstudy")
    fit = fitting.fit("Reaction ~ Days + (Days | Subject)", df)
    ref = REF["sleepstudy_lmer_ml"]["random_effects"]
    v0 = ref["groups"][0]["variance"][0]
    want = v0 / (v0 + ref["residual_variance"])
    assert icc(fit)["Subject"] == pytest.approx(want, rel=2e-3)


def test_icc_cbpp_logit_by_hand(cbpp_logit):
    fit, _ = cbpp_logit
    s2 = REF["cbpp_glmer_laplace"]["random_effects"]["groups"][0]["variance"][0]
    assert icc(fit)["herd"] == pytest.approx(s2 / (s2 + math.pi ** 2 / 3), rel=2e-3)


def test_icc_probit_cloglog_and_poisson():
    df = _load("cbpp")
    for link, resid in (("probit", 1.0), ("cloglog", math.pi ** 2 / 6)):
        fit = fitting.fit(CBPP, df, "binomial", link)
        s2 = fit.theta[0] ** 2
        assert icc(fit)["herd"] == pytest.approx(s2 / (s2 + resid), rel=1e-10)
    f = "TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)"
    fit = fitting.fit(f, _load("grouseticks"), "poisson")
    ref = REF["grouseticks_glmer_laplace"]
    var = {g["group"]: g["variance"][0] for g in ref["random_effects"]["groups"]}
    b0 = ref["fixed_effects"][0]["estimate"]
    total = sum(var.values())
    for how, lam in (("mean", math.exp(b0 + total / 2)), ("median", math.exp(b0))):
        got = icc(fit, poisson_lambda=how)
        resid = math.log1p(1 / lam)
        for g, v in var.items():
            assert got[g] == pytest.approx(v / (total + resid), rel=5e-3)


def test_icc_without_random_effects_and_bad_link():
    g = "cbind(incidence, size - incidence) ~ period"
    assert icc(fitting.fit(g, _load("cbpp"), "binomial")) == {}
    with pytest.raises(FamilyError, match="identity"):
        latent_residual_variance("poisson", "identity")
    with pytest.raises(ValueError, match="poisson_lambda"):
        latent_residual_variance("poisson", "log", intercept=0.0, poisson_lambda="mode")

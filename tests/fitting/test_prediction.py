"""Predictions against hand computations and independent numerical integrals.

References: conditional/zero predictions rebuilt from ``fit.beta`` and ``fit.ranef`` with
the data's own columns (no design); marginal means against ``scipy.integrate.quad`` /
``dblquad`` and the closed forms ``Phi(eta / sqrt(1 + sigma^2))`` (probit) and
``exp(eta + v / 2)`` (log link).
"""

import numpy as np
import pandas as pd
import pytest
from scipy import integrate, special, stats

import fitting
from fitting.errors import FittingError
from fitting.frame import build_design
from fitting.prediction import marginal_mean, predict, re_covariances

from ._designs import load as _load

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp():
    df = _load("cbpp")
    return df, fitting.fit(CBPP, df, "binomial"), build_design(CBPP, df, "binomial")


@pytest.fixture(scope="module")
def cbpp_probit():
    df = _load("cbpp")
    return df, fitting.fit(CBPP, df, "binomial", "probit"), build_design(CBPP, df, "binomial")


def _hand_eta(df, fit, with_re=True):
    """``x'beta (+ b_herd)`` from the raw columns: period dummies and the ranef table."""
    beta = dict(zip(fit.fixed["term"], fit.fixed["estimate"]))
    period = df["period"].astype(str).to_numpy()
    eta = beta["(Intercept)"] + sum(np.where(period == p, beta[f"period{p}"], 0.0) for p in "234")
    if with_re:
        modes = fit.ranef.set_index("level")["mode"]
        eta = eta + modes.reindex(df["herd"].astype(str)).fillna(0.0).to_numpy()
    return eta


# ------------------------------------------------------------------ conditional
def test_conditional_equals_hand_computation(cbpp):
    df, fit, design = cbpp
    eta = _hand_eta(df, fit)
    np.testing.assert_allclose(predict(fit, design=design, type="link"), eta, rtol=0, atol=1e-12)
    np.testing.assert_allclose(predict(fit, design=design), special.expit(eta), rtol=1e-12)


def test_zero_equals_fixed_part(cbpp):
    df, fit, design = cbpp
    eta = _hand_eta(df, fit, with_re=False)
    np.testing.assert_allclose(predict(fit, design=design, re="zero", type="link"), eta, atol=1e-12)


def test_newdata_reproduces_fitting_rows_and_new_levels_get_zero(cbpp):
    df, fit, design = cbpp
    np.testing.assert_allclose(predict(fit, df, design=design), predict(fit, design=design), rtol=1e-13)
    new = pd.DataFrame({"herd": ["1", "99", "3"], "period": pd.Categorical(["2", "2", "4"],
                                                                          categories=["1", "2", "3", "4"])})
    got = predict(fit, new, design=design, type="link")
    want = _hand_eta(new, fit)  # unknown herd "99": the mode lookup gives 0
    np.testing.assert_allclose(got, want, atol=1e-12)
    zero = predict(fit, new, design=design, re="zero", type="link")
    assert got[1] == pytest.approx(zero[1], abs=1e-14)
    assert got[0] != pytest.approx(zero[0])


def test_random_slope_conditional_hand():
    df = _load("sleepstudy")
    f = "Reaction ~ Days + (Days | Subject)"
    fit = fitting.fit(f, df)
    design = build_design(f, df)
    rf = fit.ranef.pivot(index="level", columns="term", values="mode")
    subj = df["Subject"].astype(str)
    b0 = rf["(Intercept)"].reindex(subj).to_numpy()
    b1 = rf["Days"].reindex(subj).to_numpy()
    eta = fit.beta[0] + b0 + (fit.beta[1] + b1) * df["Days"].to_numpy(float)
    np.testing.assert_allclose(predict(fit, design=design), eta, rtol=1e-12)
    # identity link: the population average is the typical-group prediction
    np.testing.assert_allclose(predict(fit, design=design, re="marginal"),
                               predict(fit, design=design, re="zero"), rtol=1e-12)
    # quantiles use the covariance on the response scale (sigma^2 Lambda Lambda')
    vc = fit.varcorr
    v0, v1, c01 = vc["variance"].iloc[0], vc["variance"].iloc[1], vc["variance"].iloc[2]
    days = df["Days"].to_numpy(float)
    sd = np.sqrt(v0 + 2 * days * c01 + days ** 2 * v1)
    np.testing.assert_allclose(predict(fit, design=design, re_quantile=0.9),
                               fit.beta[0] + fit.beta[1] * days + stats.norm.ppf(0.9) * sd, rtol=1e-12)


# --------------------------------------------------------------------- quantile
def test_quantile_half_equals_zero(cbpp):
    _, fit, design = cbpp
    np.testing.assert_allclose(predict(fit, design=design, re_quantile=0.5),
                               predict(fit, design=design, re="zero"), rtol=1e-14)


def test_quantile_of_predicted_probability(cbpp):
    df, fit, design = cbpp
    sigma = float(fit.varcorr["sd"].iloc[0])
    eta = _hand_eta(df, fit, with_re=False)
    for q in (0.1, 0.9):
        want = special.expit(eta + sigma * stats.norm.ppf(q))
        np.testing.assert_allclose(predict(fit, design=design, re_quantile=q), want, rtol=1e-12)
    # it is a quantile: the fraction of herds below it, by simulation-free integration
    p90 = predict(fit, design=design, re_quantile=0.9)[0]
    frac = stats.norm.cdf((special.logit(p90) - eta[0]) / sigma)
    assert frac == pytest.approx(0.9, abs=1e-12)


# --------------------------------------------------------------------- marginal
def test_marginal_logit_vs_quad(cbpp):
    df, fit, design = cbpp
    sigma = float(fit.varcorr["sd"].iloc[0])
    eta = _hand_eta(df, fit, with_re=False)
    got = predict(fit, design=design, re="marginal")
    for i in (0, 1, 2, 3, 10):
        ref, _ = integrate.quad(lambda b: special.expit(eta[i] + b) * stats.norm.pdf(b, scale=sigma),
                                -np.inf, np.inf, epsabs=1e-13, epsrel=1e-12)
        assert got[i] == pytest.approx(ref, abs=1e-10)
    link = predict(fit, design=design, re="marginal", type="link")
    np.testing.assert_allclose(link, special.logit(got), rtol=1e-12)
    # population-averaged probabilities are pulled towards 1/2 relative to the typical herd
    zero = predict(fit, design=design, re="zero")
    assert np.all(got > zero)  # all below 1/2 here


def test_marginal_probit_closed_form(cbpp_probit):
    df, fit, design = cbpp_probit
    s2 = float(fit.varcorr["variance"].iloc[0])
    eta = _hand_eta(df, fit, with_re=False)
    want = stats.norm.cdf(eta / np.sqrt(1.0 + s2))
    np.testing.assert_allclose(predict(fit, design=design, re="marginal"), want, rtol=1e-12)
    # the numerical path (Gauss-Hermite) reaches the closed form too
    np.testing.assert_allclose(predict(fit, design=design, re="marginal", nagq=31), want, rtol=1e-10)


def test_marginal_log_link_three_factors_closed_form():
    df = _load("grouseticks")
    f = "TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)"
    fit = fitting.fit(f, df, "poisson")
    design = build_design(f, df, "poisson")
    v = float(fit.varcorr["variance"].sum())  # three independent intercepts
    eta = predict(fit, design=design, re="zero", type="link")
    np.testing.assert_allclose(predict(fit, design=design, re="marginal"), np.exp(eta + v / 2), rtol=1e-10)


def test_marginal_vector_term_vs_dblquad():
    df = _load("Contraception")
    f = "use ~ age + I(age^2) + urban + livch + (urban | district)"
    fit = fitting.fit(f, df, "binomial")
    design = build_design(f, df, "binomial")
    (S,) = re_covariances(design, fit.theta)
    vc = fit.varcorr
    assert S[0, 0] == pytest.approx(vc["variance"].iloc[0], rel=1e-12)
    assert S[1, 1] == pytest.approx(vc["variance"].iloc[1], rel=1e-12)
    assert S[0, 1] == pytest.approx(vc["variance"].iloc[2], rel=1e-12)
    got = predict(fit, design=design, re="marginal")
    eta = predict(fit, design=design, re="zero", type="link")
    urban = (df["urban"].astype(str) == "Y").to_numpy(float)
    Sinv, norm = np.linalg.inv(S), 1.0 / (2 * np.pi * np.sqrt(np.linalg.det(S)))
    for i in (int(np.argmax(urban)), int(np.argmin(urban))):
        def f2(b1, b0):
            b = np.array([b0, b1])
            return special.expit(eta[i] + b0 + urban[i] * b1) * norm * np.exp(-0.5 * b @ Sinv @ b)

        ref, _ = integrate.dblquad(f2, -8, 8, -8, 8, epsabs=1e-11, epsrel=1e-10)
        assert got[i] == pytest.approx(ref, abs=1e-8)


@pytest.mark.parametrize("link", ["logit", "cloglog"])
def test_marginal_mean_large_sd_vs_quad(link):
    inv = {"logit": special.expit, "cloglog": lambda e: -np.expm1(-np.exp(np.minimum(e, 700)))}[link]
    eta, sd = np.array([-4.0, -3.0, 0.0, 0.5, 2.0]), np.array([0.2, 5.0, 1.0, 8.0, 2.5])
    got = marginal_mean(eta, sd, link)
    for i in range(eta.size):
        ref, _ = integrate.quad(lambda z: inv(eta[i] + sd[i] * z) * stats.norm.pdf(z), -np.inf, np.inf,
                                epsabs=1e-15, epsrel=1e-13, limit=400)
        assert got[i] == pytest.approx(ref, abs=1e-12)
    # Gauss-Hermite with a fixed number of nodes agrees where the sd is moderate
    np.testing.assert_allclose(marginal_mean(eta[:3:2], sd[:3:2], link, 31), got[:3:2], atol=1e-10)


def test_marginal_mean_closed_forms_vs_gauss_hermite():
    eta, sd = np.array([-2.0, 0.3, 1.5]), np.array([0.5, 1.0, 1.5])
    for link in ("identity", "log", "probit"):
        np.testing.assert_allclose(marginal_mean(eta, sd, link), marginal_mean(eta, sd, link, 60), rtol=1e-10)


# ----------------------------------------------------------------------- errors
def test_options_and_missing_design(cbpp):
    _, fit, design = cbpp
    with pytest.raises(ValueError, match="type"):
        predict(fit, design=design, type="probability")
    with pytest.raises(ValueError, match="re must be"):
        predict(fit, design=design, re="population")
    with pytest.raises(ValueError, match="exclusive"):
        predict(fit, design=design, re="marginal", re_quantile=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        predict(fit, design=design, re_quantile=1.0)
    if getattr(fit, "design", None) is None:
        with pytest.raises(FittingError, match="design"):
            predict(fit)
    other = build_design("cbind(incidence, size - incidence) ~ 1 + (1 | herd)", _load("cbpp"), "binomial")
    with pytest.raises(FittingError, match="fixed effects"):
        predict(fit, design=other)


def test_glm_without_random_effects():
    df = _load("cbpp")
    f = "cbind(incidence, size - incidence) ~ period"
    fit = fitting.fit(f, df, "binomial")
    design = build_design(f, df, "binomial")
    eta = _hand_eta(df, fit, with_re=False)
    for re in ("conditional", "zero", "marginal"):
        np.testing.assert_allclose(predict(fit, design=design, re=re), special.expit(eta), rtol=1e-12)


def test_package_predict_is_the_function_and_formula_import_stays_light():
    """``fitting.predict`` is the function whatever was imported first, and parsing a
    formula (what the service's coordinator does) loads no numerics."""
    import subprocess
    import sys

    code = ("import sys, fitting.formula; light = 'scipy' not in sys.modules; "
            "import fitting.prediction, fitting.result, fitting; "
            "print(light, callable(fitting.predict) and fitting.predict.__name__ == 'predict')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == ["True", "True"]

"""Profile-likelihood and Wald intervals, and the (theta, beta) covariance.

References: lme4 1.1-31 ``confint(m, method = "profile")`` and
``2 * solve(m@optinfo$derivs$Hessian)`` in ``tests/fixtures/lme4_inference.json``
(written by the R script stored in that file); deviance increases at the interval ends
recomputed independently (the core fitter on a design with the parameter moved into the
offset, or :func:`fitting.agq.agq_loglik` minimised by scipy); a finite-difference Hessian
written here from the AGQ Laplace log-likelihood; and Wald intervals on a large simulated
data set.
"""
import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import optimize, stats

import fitting
from fitting.agq import agq_loglik, fit_agq
from fitting.design import Design
from fitting.errors import FamilyError, FittingError
from fitting.frame import build_design
from fitting.profile import full_vcov, profile_confint, wald_confint

FIX = Path(__file__).resolve().parents[1] / "fixtures"
R = json.loads((FIX / "lme4_inference.json").read_text())
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
CHI2_95 = stats.chi2.ppf(0.95, 1)


def _load(name):
    return pd.read_parquet(FIX / f"{name}.parquet")


@pytest.fixture(scope="module")
def cbpp():
    df = _load("cbpp")
    fit = fitting.fit(CBPP, df, "binomial")
    design = build_design(CBPP, df, "binomial")
    return fit, design, profile_confint(fit, design=design)


def _r_frame(block):
    names = [".sig01" if n == ".sig01" else n for n in block["parameter"]]
    return pd.DataFrame({"parameter": names, "conf_low": block["conf_low"], "conf_high": block["conf_high"]})


# --------------------------------------------------------------- against lme4
def test_cbpp_profile_matches_lme4(cbpp):
    fit, _, pc = cbpp
    ref = _r_frame(R["cbpp"]["profile_95"])
    assert list(pc["parameter"]) == ["sd_(Intercept)|herd", "(Intercept)", "period2", "period3", "period4"]
    assert (pc["method"] == "profile").all()
    # lme4 interpolates its profile with splines and its estimates differ by ~1e-4
    np.testing.assert_allclose(pc["conf_low"], ref["conf_low"], atol=5e-4)
    np.testing.assert_allclose(pc["conf_high"], ref["conf_high"], atol=5e-4)
    np.testing.assert_allclose(pc["estimate"].iloc[1:], fit.beta, atol=1e-5)


def test_contraception_profile_matches_lme4():
    df = _load("Contraception")
    f = R["contraception"]["formula"]
    fit = fitting.fit(f, df, "binomial")
    pc = profile_confint(fit, design=build_design(f, df, "binomial"))
    ref = _r_frame(R["contraception"]["profile_95"])
    np.testing.assert_allclose(pc["conf_low"], ref["conf_low"], atol=5e-4)
    np.testing.assert_allclose(pc["conf_high"], ref["conf_high"], atol=5e-4)


def test_vector_term_sds_match_lme4():
    df = _load("Contraception")
    f = R["contraception_slope"]["formula"]
    fit = fitting.fit(f, df, "binomial")
    pc = profile_confint(fit, parm="theta_", design=build_design(f, df, "binomial"))
    assert list(pc["parameter"]) == ["sd_(Intercept)|district", "sd_urbanY|district"]
    ref = R["contraception_slope"]["profile_95_sd"]  # .sig01, .sig03 (the two sds)
    np.testing.assert_allclose(pc["conf_low"], ref["conf_low"], atol=1e-3)
    np.testing.assert_allclose(pc["conf_high"], ref["conf_high"], atol=1e-3)


def test_level_90_sd_matches_lme4(cbpp):
    fit, design, _ = cbpp
    pc = profile_confint(fit, parm="sd_(Intercept)|herd", level=0.90, design=design)
    ref = R["cbpp"]["profile_90_theta"]
    assert pc["conf_low"].iloc[0] == pytest.approx(ref["conf_low"], abs=5e-4)
    assert pc["conf_high"].iloc[0] == pytest.approx(ref["conf_high"], abs=5e-4)


def test_adaptive_quadrature_profile_matches_lme4():
    df = _load("cbpp")
    lap = fitting.fit(CBPP, df, "binomial")
    design = build_design(CBPP, df, "binomial")
    agq = fit_agq(design, "binomial", 25, start_theta=lap.theta, start_beta=lap.beta)
    fit = dataclasses.replace(lap, theta=agq.theta, beta=agq.beta, method="agq",
                              loglik=agq.loglik, deviance=agq.deviance)
    with pytest.raises(FittingError, match="nagq"):
        profile_confint(fit, design=design)
    pc = profile_confint(fit, design=design, nagq=25)
    ref = _r_frame(R["cbpp_agq25"]["profile_95"])
    np.testing.assert_allclose(pc["conf_low"], ref["conf_low"], atol=1e-3)
    np.testing.assert_allclose(pc["conf_high"], ref["conf_high"], atol=1e-3)


# -------------------------------------------------- end points, independently
def _drop_column(design: Design, j: int, value: float) -> Design:
    keep = [i for i in range(design.p) if i != j]
    return dataclasses.replace(design, X=design.X[:, keep], x_names=tuple(design.x_names[i] for i in keep),
                               offset=design.offset + value * design.X[:, j])


def test_fixed_effect_end_points_raise_deviance_by_chi2_quantile(cbpp):
    fit, design, pc = cbpp
    for j, name in enumerate(design.x_names):
        row = pc[pc["parameter"] == name].iloc[0]
        for end in ("conf_low", "conf_high"):
            refit = fitting.fit_design(_drop_column(design, j, row[end]), "binomial")
            assert refit.deviance - fit.deviance == pytest.approx(CHI2_95, abs=1e-4), (name, end)


def test_sd_end_points_raise_deviance_by_chi2_quantile(cbpp):
    fit, design, pc = cbpp
    row = pc.iloc[0]

    def profiled(sd):
        res = optimize.minimize(lambda b: -2 * agq_loglik(design, "binomial", [sd], b, 1)[0], fit.beta,
                                method="Nelder-Mead",
                                options={"xatol": 1e-10, "fatol": 1e-12, "maxiter": 20000, "maxfev": 20000})
        return res.fun

    for end in ("conf_low", "conf_high"):
        assert profiled(row[end]) - fit.deviance == pytest.approx(CHI2_95, abs=1e-4), end
    # asymmetric: the lower limit is nearer the estimate than the upper one
    assert row["estimate"] - row["conf_low"] < row["conf_high"] - row["estimate"]


@pytest.mark.parametrize("seed, sd, singular", [(7, 0.05, True), (1, 0.4, False)])
def test_sd_lower_limit_is_zero_when_profile_stays_within_bound(seed, sd, singular):
    rng = np.random.default_rng(seed)
    m, n = 30, 8
    g = np.repeat(np.arange(m), n)
    x = rng.normal(size=m * n)
    eta = -0.3 + 0.5 * x + sd * rng.normal(size=m)[g]
    df = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x, "g": [f"g{i}" for i in g]})
    f = "y ~ x + (1 | g)"
    fit = fitting.fit(f, df, "binomial")
    assert (fit.theta[0] == 0) == singular  # a singular fit, and one with an interior estimate
    glm = fitting.fit("y ~ x", df, "binomial")
    assert glm.deviance - fit.deviance < CHI2_95  # the boundary model is inside the interval
    design = build_design(f, df, "binomial")
    pc = profile_confint(fit, parm="theta_", design=design)
    assert pc["conf_low"].iloc[0] == 0.0
    hi = pc["conf_high"].iloc[0]
    assert hi > max(fit.theta[0], 0.05)
    dev_hi = optimize.minimize(lambda b: -2 * agq_loglik(design, "binomial", [hi], b, 1)[0], fit.beta,
                               method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-12}).fun
    assert dev_hi - fit.deviance == pytest.approx(CHI2_95, abs=1e-4)


def test_profile_close_to_wald_on_large_well_behaved_data():
    rng = np.random.default_rng(11)
    m, n = 300, 20
    g = np.repeat(np.arange(m), n)
    x1 = rng.normal(size=m * n)
    x2 = rng.binomial(1, 0.5, size=m * n)
    eta = -0.5 + 0.7 * x1 - 0.4 * x2 + 0.8 * rng.normal(size=m)[g]
    df = pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x1": x1, "x2": x2,
                       "g": [f"g{i}" for i in g]})
    f = "y ~ x1 + x2 + (1 | g)"
    fit = fitting.fit(f, df, "binomial")
    pc = profile_confint(fit, parm="beta_", design=build_design(f, df, "binomial")).set_index("parameter")
    wc = wald_confint(fit, parm="beta_").set_index("parameter")
    half = (wc["conf_high"] - wc["conf_low"]) / 2
    for end in ("conf_low", "conf_high"):
        ratio = (pc[end] - pc["estimate"]).abs() / half
        assert ratio.between(0.9, 1.1).all(), ratio


# ------------------------------------------------------------------ full vcov
def _independent_vcov(fit, design):
    """2 inv(Hessian) of the AGQ-module Laplace deviance by second differences."""
    x0 = np.concatenate([fit.theta, fit.beta])
    se = np.sqrt(np.concatenate([[0.03], np.diag(fit.vcov.to_numpy())]))
    h = 2e-3 * se
    d = x0.size

    def dev(x):
        return -2 * agq_loglik(design, "binomial", x[:1], x[1:], 1)[0]

    H = np.empty((d, d))
    for i in range(d):
        for j in range(i + 1):
            ei, ej = np.eye(d)[i] * h[i], np.eye(d)[j] * h[j]
            H[i, j] = H[j, i] = (dev(x0 + ei + ej) - dev(x0 + ei - ej) - dev(x0 - ei + ej)
                                 + dev(x0 - ei - ej)) / (4 * h[i] * h[j])
    return 2 * np.linalg.inv(H)


def test_full_vcov(cbpp):
    fit, design, _ = cbpp
    V = full_vcov(fit, design=design)
    assert list(V.columns) == ["herd.(Intercept)", "(Intercept)", "period2", "period3", "period4"]
    Vi = _independent_vcov(fit, design)
    np.testing.assert_allclose(V.to_numpy(), Vi, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(V.to_numpy()[1:, 1:], fit.vcov.to_numpy(), rtol=1e-3)
    # lme4's own Hessian is a coarse finite difference: agreement to a few percent
    ref = np.array(R["cbpp"]["full_vcov"]["matrix"])
    sd = np.sqrt(np.diag(ref))
    np.testing.assert_allclose(V.to_numpy() / np.outer(sd, sd), ref / np.outer(sd, sd), atol=0.04)


def test_full_vcov_with_quadrature(cbpp):
    fit, design, _ = cbpp
    V1 = full_vcov(fit, design=design).to_numpy()
    Vq = full_vcov(fit, design=design, nagq=1)  # same Laplace deviance
    np.testing.assert_allclose(Vq.to_numpy(), V1, rtol=1e-8)
    V5 = full_vcov(fit, design=design, nagq=5).to_numpy()  # AGQ path (value-based Hessian)
    np.testing.assert_allclose(V5, V1, rtol=0.05)
    assert not np.allclose(V5, V1, rtol=1e-6)


# ----------------------------------------------------------------------- Wald
def test_wald_confint(cbpp):
    fit, _, _ = cbpp
    w = wald_confint(fit, level=0.9)
    z = stats.norm.ppf(0.95)
    fx = w[w["parameter"].isin(fit.fixed["term"])]
    np.testing.assert_allclose(fx["conf_low"], fit.fixed["estimate"] - z * fit.fixed["std_error"])
    np.testing.assert_allclose(fx["conf_high"], fit.fixed["estimate"] + z * fit.fixed["std_error"])
    sd = w[w["parameter"] == "sd_(Intercept)|herd"].iloc[0]
    assert sd["estimate"] == pytest.approx(fit.theta[0]) and np.isnan(sd["conf_low"])
    assert list(wald_confint(fit, parm="beta_")["parameter"]) == list(fit.fixed["term"])
    with pytest.raises(ValueError, match="unknown parameter"):
        wald_confint(fit, parm="period9")
    with pytest.raises(ValueError, match="level"):
        wald_confint(fit, level=95)


def test_profile_rejects_gaussian_and_missing_design(cbpp):
    df = _load("sleepstudy")
    f = "Reaction ~ Days + (1 | Subject)"
    with pytest.raises(FamilyError, match="wald_confint"):
        profile_confint(fitting.fit(f, df), design=build_design(f, df))
    fit, _, _ = cbpp
    if getattr(fit, "design", None) is None:
        with pytest.raises(FittingError, match="design"):
            profile_confint(fit)

"""Likelihood-ratio tests and exponentiated coefficients.

References: lme4 1.1-31 ``anova(m0, m1)`` and ``logLik`` of the nested cbpp fits, and the
GLM-vs-GLMM boundary statistic, in ``tests/fixtures/lme4_inference.json``; chi-square
mixtures from :mod:`scipy.stats`.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

import fitting
from fitting.compare import LRTResult, exponentiate, lrt, odds_ratios
from fitting.errors import FamilyError, FittingError
from fitting.frame import build_design
from fitting.profile import profile_confint

from ._designs import load as _load

FIX = Path(__file__).resolve().parents[1] / "fixtures"
R = json.loads((FIX / "lme4_inference.json").read_text())["cbpp"]
CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"


@pytest.fixture(scope="module")
def cbpp_fits():
    df = _load("cbpp")
    return {
        "big": fitting.fit(CBPP, df, "binomial"),
        "null": fitting.fit(R["null"]["formula"], df, "binomial"),
        "glm": fitting.fit(R["glm"]["formula"], df, "binomial"),
    }


# -------------------------------------------------------------------------- LRT
def test_fixed_effects_lrt_matches_lme4_anova(cbpp_fits):
    res = lrt(cbpp_fits["null"], cbpp_fits["big"])
    assert isinstance(res, LRTResult)
    assert res.df == R["anova"]["df"] == 3
    assert res.statistic == pytest.approx(2 * (R["loglik"] - R["null"]["loglik"]), abs=2e-3)
    assert res.statistic == pytest.approx(R["anova"]["chisq"], abs=2e-3)
    assert res.p_value == pytest.approx(R["anova"]["p_value"], rel=1e-2)
    assert res.p_value_boundary is None
    assert "boundary" not in res.caveat
    assert res.scale == "laplace" and res.npar == (2, 5)
    text = str(res)
    assert "Chisq" in text and "Pr(>Chisq)" in text and "period" in text


def test_variance_component_on_the_boundary(cbpp_fits):
    res = lrt(cbpp_fits["glm"], cbpp_fits["big"])
    assert res.df == 1
    assert res.statistic == pytest.approx(R["glm"]["statistic"], abs=2e-3)
    assert res.p_value == pytest.approx(R["glm"]["p_value_chisq1"], rel=2e-2)
    assert res.p_value_boundary == pytest.approx(R["glm"]["p_value_boundary"], rel=2e-2)
    assert res.p_value_boundary == pytest.approx(0.5 * res.p_value, rel=1e-12)
    assert "boundary" in res.caveat and "Self & Liang" in res.caveat
    text = str(res)
    assert "Boundary-corrected p-value" in text and "boundary" in text
    assert res.to_dict()["p_value_boundary"] == pytest.approx(res.p_value_boundary)


def test_added_random_slope_uses_chi2_1_2_mixture():
    df = _load("sleepstudy")
    small = fitting.fit("Reaction ~ Days + (1 | Subject)", df)
    big = fitting.fit("Reaction ~ Days + (Days | Subject)", df)
    res = lrt(small, big)
    assert res.df == 2 and res.scale == "exact"
    want = 0.5 * stats.chi2.sf(res.statistic, 1) + 0.5 * stats.chi2.sf(res.statistic, 2)
    assert res.p_value_boundary == pytest.approx(want, rel=1e-12)
    assert "Stram & Lee" in res.caveat


def test_incompatible_fits_are_rejected(cbpp_fits):
    big, null = cbpp_fits["big"], cbpp_fits["null"]
    with pytest.raises(FittingError, match="more parameters"):
        lrt(big, null)
    df = _load("cbpp")
    probit = fitting.fit(R["null"]["formula"], df, "binomial", "probit")
    with pytest.raises(FittingError, match="famil"):
        lrt(probit, big)
    with pytest.raises(FittingError, match="observations"):
        lrt(fitting.fit(R["null"]["formula"], df.iloc[:40], "binomial"), big)
    sleep = _load("sleepstudy")
    reml_small = fitting.fit("Reaction ~ 1 + (Days | Subject)", sleep, reml=True)
    reml_big = fitting.fit("Reaction ~ Days + (Days | Subject)", sleep, reml=True)
    with pytest.raises(FittingError, match="REML"):
        lrt(reml_small, reml_big)
    ml_small = fitting.fit("Reaction ~ Days + (1 | Subject)", sleep)
    with pytest.raises(FittingError, match="REML"):
        lrt(ml_small, reml_big)
    other = fitting.fit("cbind(incidence, size - incidence) ~ 1 + (1 | period)", df, "binomial")
    with pytest.raises(FittingError, match="nested"):
        lrt(other, big)


def test_reml_fits_with_same_fixed_effects_are_compared():
    sleep = _load("sleepstudy")
    small = fitting.fit("Reaction ~ Days + (1 | Subject)", sleep, reml=True)
    big = fitting.fit("Reaction ~ Days + (Days | Subject)", sleep, reml=True)
    res = lrt(small, big)
    assert res.scale == "reml"
    assert res.statistic == pytest.approx(2 * (big.loglik - small.loglik))


# ----------------------------------------------------------------- exponentiate
def test_odds_ratios(cbpp_fits):
    fit = cbpp_fits["big"]
    out = odds_ratios(fit, level=0.9)
    est, se = fit.fixed["estimate"].to_numpy(), fit.fixed["std_error"].to_numpy()
    z = stats.norm.ppf(0.95)
    assert list(out.columns) == ["term", "estimate", "std_error", "conf_low", "conf_high"]
    np.testing.assert_allclose(out["estimate"], np.exp(est), rtol=1e-14)
    np.testing.assert_allclose(out["std_error"], np.exp(est) * se, rtol=1e-14)
    np.testing.assert_allclose(out["conf_low"], np.exp(est - z * se), rtol=1e-14)
    np.testing.assert_allclose(out["conf_high"], np.exp(est + z * se), rtol=1e-14)
    assert out.attrs["quantity"] == "odds ratio"


def test_odds_ratios_with_profile_limits(cbpp_fits):
    fit = cbpp_fits["big"]
    design = build_design(CBPP, _load("cbpp"), "binomial")
    out = odds_ratios(fit, method="profile", design=design)
    pc = profile_confint(fit, parm="beta_", design=design)
    np.testing.assert_allclose(out["conf_low"], np.exp(pc["conf_low"]), rtol=1e-12)
    ref = R["profile_95"]
    np.testing.assert_allclose(np.log(out["conf_high"]), ref["conf_high"][1:], atol=5e-4)


def test_exponentiate_links():
    f = "TICKS ~ YEAR + scale(HEIGHT) + (1 | BROOD) + (1 | INDEX) + (1 | LOCATION)"
    pois = fitting.fit(f, _load("grouseticks"), "poisson")
    out = exponentiate(pois)
    assert out.attrs["quantity"] == "incidence-rate ratio"
    np.testing.assert_allclose(out["estimate"], np.exp(pois.beta), rtol=1e-14)
    with pytest.raises(FamilyError, match="'log'.*exponentiate"):
        odds_ratios(pois)
    probit = fitting.fit(CBPP, _load("cbpp"), "binomial", "probit")
    with pytest.raises(FamilyError, match="'probit'"):
        exponentiate(probit)
    with pytest.raises(FamilyError, match="'probit'"):
        odds_ratios(probit)
    with pytest.raises(ValueError, match="method"):
        exponentiate(pois, method="bootstrap")
    assert math.isfinite(out["conf_high"].max())

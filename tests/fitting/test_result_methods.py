"""FitResult wiring (design, vcov_full, delegating methods) and the post-fit diagnostics.

References: the helper modules called directly with an explicitly built design (the
methods must agree with them exactly); hand counts of degenerate groups from the raw
data; ``agq_loglik`` for the Laplace-adequacy numbers; an LP-free separated data set
(a binary covariate whose level 1 has only successes).
"""
import math
import pickle

import numpy as np
import pandas as pd
import pytest

import fitting
from fitting.agq import agq_loglik
from fitting.compare import odds_ratios
from fitting.errors import FittingError
from fitting.frame import build_design
from fitting.marginal import icc, marginal_coefs
from fitting.prediction import predict
from fitting.profile import _full_vcov_array, deviance_function, full_vcov, wald_confint

from . import _designs as D

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
CONTRA = "use ~ age + I(age^2) + urban + livch + (1 | district)"


@pytest.fixture(scope="module")
def cbpp():
    df = D.load("cbpp")
    return df, fitting.fit(CBPP, df, "binomial"), build_design(CBPP, df, "binomial")


# ------------------------------------------------------------------ wiring
def test_fit_carries_design_and_stays_picklable(cbpp):
    _, fit, design = cbpp
    assert fit.design is not None and fit.design.nobs == fit.nobs
    np.testing.assert_array_equal(fit.design.X, design.X)
    assert "design" not in repr(fit)
    back = pickle.loads(pickle.dumps(fit))
    np.testing.assert_array_equal(back.beta, fit.beta)
    assert back.design is not None and back.vcov_full is not None


def test_vcov_full_matches_independent_hessian(cbpp):
    _, fit, design = cbpp
    V = fit.vcov_full
    assert list(V.columns) == list(fit.theta_names) + list(fit.fixed["term"])
    np.testing.assert_allclose(V.to_numpy()[1:, 1:], fit.vcov.to_numpy(), rtol=1e-10)
    Vi = _full_vcov_array(fit, deviance_function(fit, design))  # central differences, computed anew
    np.testing.assert_allclose(V.to_numpy(), Vi, rtol=5e-3, atol=1e-7)
    # full_vcov now returns the stored matrix
    np.testing.assert_array_equal(full_vcov(fit).to_numpy(), V.to_numpy())


def test_methods_delegate(cbpp):
    df, fit, design = cbpp
    np.testing.assert_array_equal(fit.predict(re="marginal"), predict(fit, design=design, re="marginal"))
    np.testing.assert_array_equal(fit.predict(df.head(3), re_quantile=0.8),
                                  predict(fit, df.head(3), design=design, re_quantile=0.8))
    pd.testing.assert_frame_equal(fit.confint(level=0.9), wald_confint(fit, level=0.9))
    pd.testing.assert_frame_equal(fit.marginal_coefs(), marginal_coefs(fit, design=design))
    assert fit.icc() == icc(fit)
    pd.testing.assert_frame_equal(fit.odds_ratios(0.9), odds_ratios(fit, 0.9))
    pd.testing.assert_frame_equal(fit.exponentiate(), odds_ratios(fit))
    with pytest.raises(ValueError, match="wald"):
        fit.confint(method="bootstrap")


def test_profile_confint_method(cbpp):
    _, fit, _ = cbpp
    pc = fit.confint(parm="period2", method="profile")
    row = pc.iloc[0]
    assert row["method"] == "profile" and row["conf_low"] < row["estimate"] < row["conf_high"]
    wald = fit.confint(parm="period2").iloc[0]
    assert row["conf_low"] == pytest.approx(wald["conf_low"], abs=0.05)


def test_module_level_exports():
    for name in ("lrt", "predict", "marginal_coefs", "icc", "odds_ratios", "exponentiate", "full_vcov",
                 "profile_confint", "wald_confint"):
        assert name in fitting.__all__ and callable(getattr(fitting, name))
    df = D.load("cbpp")
    small = fitting.fit("cbind(incidence, size - incidence) ~ 1 + (1 | herd)", df, "binomial")
    big = fitting.fit(CBPP, df, "binomial")
    res = fitting.lrt(small, big)
    assert res.df == 3 and res.statistic == pytest.approx(2 * (big.loglik - small.loglik))


def test_summary_prints_icc(cbpp):
    _, fit, _ = cbpp
    s = fit.summary()
    v = float(fit.varcorr["variance"].iloc[0])
    assert f"herd {v / (v + math.pi ** 2 / 3):.4f}" in s
    assert "pi^2/3" in s
    lmm = fitting.fit("Reaction ~ Days + (1 | Subject)", D.load("sleepstudy"))
    assert "ICC (random intercepts): Subject" in lmm.summary()


# ------------------------------------------------------------- diagnostics
def test_laplace_adequacy_on_cbpp(cbpp):
    _, fit, design = cbpp
    ad = fit.diagnostics.laplace_adequacy
    assert ad is not None and ad["nagq"] == 5
    l1 = agq_loglik(design, "binomial", fit.theta, fit.beta, 1)[0]
    l5 = agq_loglik(design, "binomial", fit.theta, fit.beta, 5)[0]
    assert ad["loglik_laplace"] == pytest.approx(l1, abs=1e-8)
    assert ad["loglik_laplace"] == pytest.approx(fit.loglik, abs=1e-8)
    assert ad["difference"] == pytest.approx(l5 - l1, abs=1e-8)
    assert not ad["flag"] and not any("consider method='agq'" in w for w in fit.diagnostics.warnings)
    off = fitting.fit(CBPP, D.load("cbpp"), "binomial", control={"check_laplace": False})
    assert off.diagnostics.laplace_adequacy is None
    assert fit.diagnostics.separation is None  # not suspicious: the LP check is skipped


def test_laplace_adequacy_flag_warns():
    # binary outcomes in pairs with a large variance: Laplace is poor
    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(150), 2)
    y = (rng.random(300) < 1 / (1 + np.exp(-rng.normal(scale=3.0, size=150)[g]))).astype(int)
    df = pd.DataFrame({"y": y, "g": pd.Categorical(g.astype(str))})
    r = fitting.fit("y ~ 1 + (1 | g)", df, "binomial")
    ad = r.diagnostics.laplace_adequacy
    assert ad["flag"] and ad["abs_difference"] > 0.5
    assert any(w.startswith("AGQ would move the log-likelihood by") for w in r.diagnostics.warnings)


def test_degenerate_group_counts():
    df = D.load("Contraception")
    r = fitting.fit(CONTRA, df, "binomial")
    dg = r.diagnostics.degenerate_groups["district"]
    use = (df["use"].astype(str) == "Y").astype(int) if df["use"].dtype != np.int64 else df["use"]
    by = pd.Series(np.asarray(use, dtype=float)).groupby(df["district"].astype(str).to_numpy()).agg(["min", "max"])
    assert dg["n_all_zero"] == int((by["max"] == 0).sum())
    assert dg["n_all_one"] == int((by["min"] == 1).sum())
    assert sorted(dg["all_zero"]) == sorted(by.index[by["max"] == 0])
    assert dg["n_groups"] == 60


def _separated():
    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(20), 15)
    x = rng.normal(size=300)
    trt = (rng.random(300) < 0.3).astype(int)
    eta = -0.5 + 0.8 * x + rng.normal(scale=0.8, size=20)[g]
    y = (rng.random(300) < 1 / (1 + np.exp(-eta))).astype(int)
    y[trt == 1] = 1  # every treated row is a success: quasi-complete separation in trt
    return pd.DataFrame({"y": y, "x": x, "trt": trt, "g": pd.Categorical(g.astype(str))})


def test_separation_diagnosed_and_penalised_fit():
    df = _separated()
    r = fitting.fit("y ~ x + trt + (1 | g)", df, "binomial")
    sep = r.diagnostics.separation
    assert sep is not None and sep["separated"] and sep["terms"] == ["trt"]
    assert any("trt" in w and "separation" in w for w in r.diagnostics.warnings)
    assert r.beta[2] > 10  # the MLE runs off
    p = fitting.fit("y ~ x + trt + (1 | g)", df, "binomial", control={"penalty": "normal"})
    assert p.method == "laplace+penalized" and p.diagnostics.penalized and p.diagnostics.converged
    assert np.all(np.isfinite(p.beta)) and np.all(np.isfinite(p.fixed["std_error"]))
    assert 1 < p.beta[2] < 15 and p.fixed["std_error"].iloc[2] < 10
    assert any(w.startswith("penalised:") for w in p.diagnostics.warnings)
    # loglik is the unpenalised Laplace value; the penalised deviance is recorded separately
    extra = p.optinfo.extra
    assert extra["penalized_deviance"] == pytest.approx(p.deviance + extra["penalty_value"])
    assert p.loglik < r.loglik  # shrinking trt costs likelihood
    assert p.diagnostics.separation["terms"] == ["trt"]  # checked for every penalised fit
    with pytest.raises(FittingError, match="penalised"):
        fitting.lrt(fitting.fit("y ~ x + (1 | g)", df, "binomial", control={"penalty": "normal"}), p)


def test_penalty_and_check_controls_validated():
    df = D.load("cbpp")
    with pytest.raises(ValueError, match="penalty"):
        fitting.fit(CBPP, df, "binomial", control={"penalty": "laplace"})
    with pytest.raises(ValueError, match="penalty"):
        fitting.fit(CBPP, df, "binomial", method="agq", control={"penalty": "normal"})
    with pytest.raises(ValueError, match="check_laplace"):
        fitting.fit(CBPP, df, "binomial", control={"check_laplace": "yes"})
    r = fitting.fit(CBPP, df, "binomial", control={"check_separation": True})
    assert r.diagnostics.separation["separated"] is False

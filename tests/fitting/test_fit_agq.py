"""``fitting.fit(..., method="agq")`` against lme4's nAGQ=25 fits.

References: ``tests/fixtures/lme4_expected.json`` (lme4 1.1-31): estimates, standard
errors and ``logLik_full_constants`` (lme4's nAGQ>1 logLik plus the saturated
log-likelihood, equal to a per-group ``stats::integrate`` value).
"""
import pickle

import numpy as np
import pytest

import fitting
from fitting.errors import FamilyError, FittingError

from . import _designs as D

REF = D.expected()
CONTRA = "use ~ age + I(age^2) + urban + livch"


def _ref_arrays(ex):
    est = np.array([f["estimate"] for f in ex["fixed_effects"]])
    se = np.array([f["se"] for f in ex["fixed_effects"]])
    return est, se, np.array(list(ex["theta"].values()))


@pytest.mark.parametrize("key,data", [("cbpp_glmer_agq25", "cbpp"), ("contraception_glmer_agq25", "Contraception")])
def test_agq25_matches_lme4(key, data):
    ex = REF[key]
    r = fitting.fit(ex["formula"], D.load(data), "binomial", method="agq", control={"nagq": 25})
    est, se, theta = _ref_arrays(ex)
    assert r.method == "agq" and r.nagq == 25 and r.optinfo.extra["nagq"] == 25
    assert list(r.fixed["term"]) == [f["term"] for f in ex["fixed_effects"]]
    np.testing.assert_allclose(r.beta, est, atol=1e-3)
    np.testing.assert_allclose(r.theta, theta, atol=1e-3)
    np.testing.assert_allclose(r.fixed["std_error"], se, rtol=1e-2)
    assert r.loglik >= ex["logLik_full_constants"] - 1e-4
    assert r.loglik == pytest.approx(ex["logLik_full_constants"], abs=1e-4)
    assert r.deviance == pytest.approx(-2 * r.loglik)
    assert r.aic == pytest.approx(-2 * r.loglik + 2 * (len(est) + 1))
    assert r.diagnostics.converged and r.diagnostics.hessian_pd
    assert r.vcov_full is not None and list(r.vcov_full.columns) == list(r.theta_names) + list(r.fixed["term"])
    np.testing.assert_allclose(r.vcov_full.to_numpy()[1:, 1:], r.vcov.to_numpy())
    # ranef: AGQ conditional modes, lme4 layout
    assert list(r.ranef.columns) == ["group", "level", "term", "mode", "cond_sd"]
    assert len(r.ranef) == ex["n_groups"][next(iter(ex["n_groups"]))]
    assert "nAGQ = 25" in r.summary()
    # the Laplace fit it started from is recorded and is lower than AGQ here
    assert r.optinfo.extra["laplace_loglik"] < r.loglik


def test_agq_auto_picks_and_reports_nagq():
    ex = REF["cbpp_glmer_agq25"]
    r = fitting.fit(ex["formula"], D.load("cbpp"), "binomial", method="agq")
    assert r.nagq > 1 and r.optinfo.extra["nagq_auto"]
    assert r.optinfo.extra["nagq"] == r.nagq
    assert [h["nagq"] for h in r.optinfo.extra["nagq_history"]][-1] == r.nagq
    assert r.loglik == pytest.approx(ex["logLik_full_constants"], abs=1e-4)


def test_nagq_one_is_laplace():
    ex = REF["cbpp_glmer_laplace"]
    lap = fitting.fit(ex["formula"], D.load("cbpp"), "binomial")
    r = fitting.fit(ex["formula"], D.load("cbpp"), "binomial", method="agq", control={"nagq": 1})
    assert r.method == "laplace" and r.nagq == 1
    assert r.loglik == pytest.approx(lap.loglik, abs=1e-9)


def test_vector_random_effect_agq():
    f = f"{CONTRA} + (urban | district)"
    df = D.load("Contraception")
    lap = fitting.fit(f, df, "binomial")
    r = fitting.fit(f, df, "binomial", method="agq", control={"nagq": 3})
    assert r.nagq == 3 and np.isfinite(r.loglik)
    assert abs(r.loglik - lap.loglik) > 1e-3  # quadrature moves the log-likelihood
    assert r.loglik > lap.loglik  # Laplace underestimates the integral here
    assert r.varcorr["correlation"].notna().sum() == 1
    assert len(r.ranef) == 2 * 60
    pickle.loads(pickle.dumps(r))


def test_agq_validation_names_terms():
    df = D.load("cbpp")
    df = df.assign(h2=df["herd"])
    with pytest.raises(FittingError, match=r"herd.*h2|h2.*herd"):
        fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd) + (1 | h2)", df, "binomial",
                    method="agq", control={"nagq": 5})
    with pytest.raises(FamilyError, match="agq"):
        fitting.fit("Reaction ~ Days + (1 | Subject)", D.load("sleepstudy"), method="agq")
    with pytest.raises(ValueError, match="nagq"):
        fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", D.load("cbpp"), "binomial",
                    method="agq", control={"nagq": "many"})
    with pytest.raises(ValueError, match="quadrature points"):
        fitting.fit(f"{CONTRA} + (urban | district)", D.load("Contraception"), "binomial", method="agq",
                    control={"nagq": 200})

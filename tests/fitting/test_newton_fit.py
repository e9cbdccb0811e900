"""fitting.newton_fit: fit's exact-Newton path for one grouping factor (vs its BFGS path)."""
from __future__ import annotations

import numpy as np
import pytest

import fitting
import fitting.newton_fit as nf
from fitting.api import check_control
from fitting.families import get_family
from fitting.frame import build_design
from fitting.glmm_fit import fit_glmm

from . import _designs as D

CBPP = "cbind(incidence, size - incidence) ~ period + (1 | herd)"
SLOPE = "use ~ age + I(age^2) + urban + livch + (urban | district)"
RI = "use ~ age + I(age^2) + urban + livch + (1 | district)"


def _bfgs(formula, df, monkeypatch, family="binomial"):
    """fit_glmm's BFGS path alone (the Newton path declined)."""
    fam = get_family(family)
    design = build_design(formula, df, fam.name)
    with monkeypatch.context() as m:
        m.setattr(nf, "fit_glmm_newton", lambda *a, **k: None)
        return fit_glmm(design, fam, formula, check_control(None), 0.0)


@pytest.mark.parametrize("formula,data", [(CBPP, "cbpp"), (RI, "Contraception")])
def test_newton_matches_bfgs_with_fewer_evaluations(formula, data, monkeypatch):
    df = D.load(data)
    r = fitting.fit(formula, df, "binomial")
    ref = _bfgs(formula, df, monkeypatch)
    o = r.optinfo
    assert o.optimizer == "newton" and o.converged_code == 0 and r.diagnostics.converged
    assert o.evaluations == len(o.extra["log"]) <= 8
    x = ref.optinfo.extra  # every evaluation of the BFGS path: start, iterations, final Hessian
    assert o.evaluations < ref.optinfo.evaluations + x["start_evaluations"] + x["final_evaluations"]
    assert o.extra["newton_decrement"] <= 1e-10 and r.diagnostics.max_grad < 1e-3
    assert r.loglik == pytest.approx(ref.loglik, abs=1e-8)
    np.testing.assert_allclose(np.r_[r.theta, r.beta], np.r_[ref.theta, ref.beta], atol=1e-5)
    # exact Hessian vs BFGS's forward differences: a few 1e-4 relative at most
    np.testing.assert_allclose(r.fixed["std_error"], ref.fixed["std_error"], rtol=1e-3)
    assert r.theta_names == ref.theta_names and r.ngroups == ref.ngroups
    assert list(r.fixed.columns) == list(ref.fixed.columns)
    assert list(r.varcorr.columns) == list(ref.varcorr.columns)
    np.testing.assert_allclose(r.ranef["mode"], ref.ranef["mode"], atol=1e-5)
    np.testing.assert_allclose(r.ranef["cond_sd"], ref.ranef["cond_sd"], atol=1e-5)
    assert r.vcov_full is not None and r.vcov_full.shape == ref.vcov_full.shape


def test_rx_standard_errors_and_start():
    df = D.load("cbpp")
    r = fitting.fit(CBPP, df, "binomial", control={"se": "rx"})
    assert r.optinfo.optimizer == "newton" and r.diagnostics.hessian_pd is None and r.vcov_full is None
    warm = fitting.fit(CBPP, df, "binomial", control={"start": {"theta": r.theta.tolist(), "beta": r.beta.tolist()}})
    assert warm.optinfo.evaluations <= 2
    with pytest.raises(ValueError, match="start"):
        fitting.fit(CBPP, df, "binomial", control={"start": {"theta": [1.0, 2.0]}})


def test_several_grouping_factors_use_bfgs():
    df = D.load("grouseticks")
    r = fitting.fit("TICKS ~ YEAR + cHEIGHT + (1 | BROOD) + (1 | LOCATION)", df, "poisson")
    assert r.optinfo.optimizer == "BFGS"


def test_vector_valued_term_within_max_k_uses_newton(monkeypatch):
    df = D.load("Contraception")
    assert nf.MAX_K >= 2
    r = fitting.fit(SLOPE, df, "binomial")
    assert r.optinfo.optimizer == "newton" and r.optinfo.extra["newton_decrement"] <= 1e-10
    assert r.optinfo.evaluations == len(r.optinfo.extra["log"]) <= 8
    monkeypatch.setattr(nf, "MAX_K", 1)
    assert fitting.fit(SLOPE, df, "binomial").optinfo.optimizer == "BFGS"  # k = 2 > MAX_K


def test_three_column_term_uses_newton_and_agrees_with_bfgs(monkeypatch):
    df = D.load("Contraception")
    f = "use ~ age + urban + (age + urban | district)"  # k = 3: six θ entries
    r = fitting.fit(f, df, "binomial")
    assert r.optinfo.optimizer == "newton" and r.diagnostics.converged
    monkeypatch.setattr(nf, "MAX_K", 2)
    b = fitting.fit(f, df, "binomial")
    assert b.optinfo.optimizer == "BFGS" and b.diagnostics.converged
    assert r.loglik >= b.loglik - 1e-7
    np.testing.assert_allclose(r.beta, b.beta, atol=2e-5)
    np.testing.assert_allclose(r.varcorr["variance"], b.varcorr["variance"], rtol=1e-3, atol=1e-5)
    # analytic Hessian (newton) against finite differences of the gradient (BFGS path)
    np.testing.assert_allclose(r.fixed["std_error"], b.fixed["std_error"], rtol=1e-3)

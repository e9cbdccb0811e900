"""Exact ββ block of the Laplace Hessian (fitting.laplace_hessian) against finite differences."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fitting.families import get_family
from fitting.frame import build_design
from fitting.glmm import GlmmModel, laplace
from fitting.laplace_hessian import has_beta_hessian, laplace_hessian_beta
from fitting.response import make_response
from fitting.structure import build_structure

from . import _designs as D

EXPECTED = D.expected()


def _fixture_model(key, link=None):
    mk, fam = D.DESIGNS[key]
    des = mk()
    resp = make_response(des.y, des.weights, des.offset, get_family(fam, link))
    ex = EXPECTED[key]
    theta = np.array(list(ex["theta"].values()))
    beta = np.array([f["estimate"] for f in ex["fixed_effects"]])
    return GlmmModel(build_structure(des.re_terms, des.nobs), des.X, resp), des, theta, beta


def _crossed_frame(seed, n=1500, na=60, nb=9, family="binomial"):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, na, n)
    b = rng.integers(0, nb, n)
    x = rng.normal(size=n)
    eta = -0.3 + 0.5 * x + rng.normal(0, 0.8, na)[a] * (1 + 0.4 * x) + rng.normal(0, 0.6, nb)[b]
    if family == "binomial":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    else:
        y = rng.poisson(np.exp(0.5 + 0.3 * eta))
    size = rng.integers(1, 8, n)
    succ = rng.binomial(size, 1 / (1 + np.exp(-eta)))
    return pd.DataFrame({"y": y, "x": x, "z": rng.normal(size=n), "s": succ, "f": size - succ,
                         "t": rng.uniform(0.5, 2.0, n),
                         "a": pd.Categorical(a), "b": pd.Categorical(b),
                         "c": pd.Categorical(rng.integers(0, 5, n))})


def _formula_model(formula, family="binomial", seed=1):
    df = _crossed_frame(seed, family=family)
    des = build_design(formula, df, family)
    resp = make_response(des.y, des.weights, des.offset, get_family(family))
    model = GlmmModel(build_structure(des.re_terms, des.nobs), des.X, resp)
    nt = model.ntheta
    theta = np.where(model.struct.diag_theta, 0.7, 0.1)
    beta = np.linalg.lstsq(des.X, np.zeros(des.nobs), rcond=None)[0] + 0.1
    return model, des, theta, beta[: des.X.shape[1]]


def _fd_beta_hessian(model, des, z, h=1e-4):
    """Symmetrised central differences of the analytic β gradient (scaled by X's sd)."""
    nt = model.ntheta
    scales = 1.0 / np.maximum(des.X.std(axis=0), 1.0)
    p = des.X.shape[1]
    H = np.empty((p, p))
    for j in range(p):
        e = np.zeros(z.size)
        e[nt + j] = h * scales[j]
        gp = laplace(model, (z + e)[:nt], (z + e)[nt:]).gradient[nt:]
        gm = laplace(model, (z - e)[:nt], (z - e)[nt:]).gradient[nt:]
        H[:, j] = (gp - gm) / (2 * h * scales[j])
    return 0.5 * (H + H.T)


def _check(model, des, theta, beta):
    assert has_beta_hessian(model)
    nt = model.ntheta
    z = np.concatenate([theta, beta])
    ev = laplace(model, z[:nt], z[nt:], jacobian=True)
    Hb = laplace_hessian_beta(model, ev.pirls, ev.jacobian[:, nt:])
    H_fd = _fd_beta_hessian(model, des, z)
    np.testing.assert_allclose(Hb, H_fd, rtol=1e-6, atol=1e-6 * np.abs(H_fd).max())
    # the log|A| curvature matters: 2 RX'RX alone is much further from the differences
    from fitting.laplace_hessian import _rx_gram
    pr = ev.pirls
    approx = 2.0 * _rx_gram(model.struct, pr.fac, pr.V, pr.ev.W, des.X)
    assert np.abs(approx - H_fd).max() > 20 * np.abs(Hb - H_fd).max()


@pytest.mark.parametrize("key", ["cbpp_glmer_laplace", "contraception_glmer_laplace",
                                 "contraception_slope_glmer_laplace"])
def test_one_term_matches_finite_differences(key):
    """One term (block-diagonal A), away from the optimum."""
    model, des, theta, beta = _fixture_model(key)
    _check(model, des, theta * 1.1, beta * 0.9)


@pytest.mark.parametrize("formula, family", [
    ("y ~ x + z + (1 | a) + (1 | b)", "binomial"),
    ("y ~ x + z + (1 | a) + (1 | b)", "poisson"),
    ("y ~ x + (x | a) + (1 | b)", "binomial"),          # vector leading term (k1 = 2)
    ("y ~ x + z + (1 | a) + (1 | b) + (1 | c)", "binomial"),  # two terms in the dense rest
    ("cbind(s, f) ~ x + (1 | a) + (1 | b)", "binomial"),  # binomial totals as prior weights
    ("y ~ x + offset(log(t)) + (1 | a) + (1 | b)", "poisson"),
])
def test_dense_rest_matches_finite_differences(formula, family):
    model, des, theta, beta = _formula_model(formula, family)
    assert model.struct.level.dense
    _check(model, des, theta, beta)


def test_not_offered_without_a_closed_form():
    """Non-canonical links and recursive layouts (grouseticks' three factors) keep finite
    differences."""
    model, *_ = _fixture_model("cbpp_glmer_laplace", "probit")
    assert not has_beta_hessian(model)
    model, *_ = _fixture_model("grouseticks_glmer_laplace")
    assert model.struct.level.sub is not None or not model.struct.level.dense
    assert not has_beta_hessian(model)

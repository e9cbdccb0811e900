"""Profiled (RE)ML deviance of LMMs (fitting.lmm) against dense marginal likelihoods."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

import fitting
from fitting.design import Design, ReTerm
from fitting.lmm import make_lmm, profiled_deviance
from fitting.structure import build_structure

from . import _designs as D


def _dense_marginal(design, theta, beta, sigma, reml=False):
    """-2 log-likelihood from y ~ N(Xβ, σ²(ZΛΛ'Z' + W⁻¹)) computed densely."""
    struct = build_structure(design.re_terms, design.nobs)
    n, q = struct.n, struct.q
    Z = np.zeros((n, q))
    Lam = np.zeros((q, q))
    for t, lam in zip(struct.terms, struct.lambdas(theta)):
        for j in range(t.k):
            Z[np.arange(n), t.offset + t.codes * t.k + j] = t.Z[:, j]
        for g in range(t.m):
            s = t.offset + g * t.k
            Lam[s:s + t.k, s:s + t.k] = lam
    ZL = Z @ Lam
    Sig = sigma ** 2 * (ZL @ ZL.T + np.diag(1.0 / design.weights))
    y = design.y - design.offset
    ll = stats.multivariate_normal(design.X @ beta, Sig).logpdf(y)
    if reml:
        Si = np.linalg.inv(Sig)
        ll += 0.5 * design.p * np.log(2 * np.pi) - 0.5 * np.linalg.slogdet(design.X.T @ Si @ design.X)[1]
    return -2 * ll


def _random_design(rng, n=120, weights=False, two_terms=False):
    g = rng.integers(0, 9, size=n)
    g[:9] = np.arange(9)
    x = rng.normal(size=n)
    y = 1 + 0.5 * x + rng.normal(scale=0.8, size=9)[g] + rng.normal(scale=0.3, size=9)[g] * x + rng.normal(size=n)
    X = np.column_stack([np.ones(n), x])
    terms = [ReTerm("g", tuple(map(str, range(9))), g, ("(Intercept)", "x"), X.copy())]
    if two_terms:
        h = rng.integers(0, 5, size=n)
        h[:5] = np.arange(5)
        y = y + rng.normal(size=5)[h]
        terms.append(ReTerm("h", tuple(map(str, range(5))), h, ("(Intercept)",), np.ones((n, 1))))
    w = rng.uniform(0.5, 2.0, size=n) if weights else np.ones(n)
    return Design("y", y, w, rng.normal(scale=0.1, size=n), X, ("(Intercept)", "x"), tuple(terms))


@pytest.mark.parametrize("reml", [False, True])
@pytest.mark.parametrize("weights", [False, True])
@pytest.mark.parametrize("two_terms", [False, True])
def test_profiled_deviance_equals_dense_likelihood(reml, weights, two_terms):
    rng = np.random.default_rng(3 + 2 * weights + two_terms)
    des = _random_design(rng, weights=weights, two_terms=two_terms)
    struct = build_structure(des.re_terms, des.nobs)
    model = make_lmm(struct, des.X, des.y, des.weights, des.offset)
    theta = np.array([0.8, 0.2, 0.4] + ([0.6] if two_terms else []))
    ev = profiled_deviance(model, theta, reml)
    assert ev.deviance == pytest.approx(_dense_marginal(des, theta, ev.beta, ev.sigma, reml), rel=1e-10)
    # gradient vs central differences
    h = 1e-6
    g = [(profiled_deviance(model, theta + e, reml, gradient=False).deviance
          - profiled_deviance(model, theta - e, reml, gradient=False).deviance) / (2 * h)
         for e in np.eye(theta.size) * h]
    np.testing.assert_allclose(ev.gradient, g, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reml", [False, True])
def test_fit_is_the_maximum(reml):
    rng = np.random.default_rng(21)
    des = _random_design(rng, weights=True, two_terms=True)
    r = fitting.fit_design(des, "gaussian", reml=reml)
    assert r.diagnostics.converged
    struct = build_structure(des.re_terms, des.nobs)
    model = make_lmm(struct, des.X, des.y, des.weights, des.offset)
    best = profiled_deviance(model, r.theta, reml, gradient=False).deviance
    assert best == pytest.approx(r.deviance)
    for _ in range(20):
        th = r.theta + rng.normal(scale=1e-3, size=r.theta.size)
        assert profiled_deviance(model, th, reml, gradient=False).deviance >= best - 1e-9
    # ML: the fixed effects are the GLS estimate at the fitted covariance
    assert r.method == ("reml" if reml else "ml")


def test_sleepstudy_weights_of_one_change_nothing():
    df = D.load("sleepstudy")
    r0 = fitting.fit("Reaction ~ Days + (Days | Subject)", df)
    r1 = fitting.fit("Reaction ~ Days + (Days | Subject)", df, weights=np.ones(len(df)))
    assert r1.loglik == pytest.approx(r0.loglik, abs=1e-9)


def test_sleepstudy_uncorrelated_terms():
    """(Days || Subject) = two scalar terms on the same factor (lme4: 1744.6 REML? ML -876.0)."""
    df = D.load("sleepstudy")
    r = fitting.fit("Reaction ~ Days + (1 | Subject) + (0 + Days | Subject)", df, reml=False)
    full = fitting.fit("Reaction ~ Days + (Days | Subject)", df, reml=False)
    assert r.loglik <= full.loglik + 1e-8  # nested model
    assert r.loglik > full.loglik - 1.0
    assert r.diagnostics.converged
    assert len(r.theta) == 2


def test_lmm_singular_flagged():
    rng = np.random.default_rng(4)
    n = 200
    g = np.repeat(np.arange(20), 10)
    df = pd.DataFrame({"y": rng.normal(size=n), "x": rng.normal(size=n),
                       "g": pd.Categorical([f"g{i}" for i in g])})
    r = fitting.fit("y ~ x + (1 | g)", df)
    if r.theta[0] > 0:
        pytest.skip("this draw has a positive between-group variance")
    assert r.diagnostics.singular
    lm = fitting.fit("y ~ x", df)
    np.testing.assert_allclose(r.beta, lm.beta, atol=1e-8)

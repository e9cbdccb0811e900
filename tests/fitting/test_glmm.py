"""GLMM Laplace objective (fitting.glmm) and fit (fitting.glmm_fit)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fitting
from fitting.families import get_family
from fitting.glm import fit_glm
from fitting.glmm import GlmmModel, laplace, pirls
from fitting.response import make_response
from fitting.structure import build_structure

from . import _designs as D

EXPECTED = D.expected()


def _model(key, link=None):
    mk, fam = D.DESIGNS[key]
    des = mk()
    resp = make_response(des.y, des.weights, des.offset, get_family(fam, link))
    return GlmmModel(build_structure(des.re_terms, des.nobs), des.X, resp), des


def _ref_point(key):
    ex = EXPECTED[key]
    return np.array(list(ex["theta"].values())), np.array([f["estimate"] for f in ex["fixed_effects"]])


def _fd_gradient(model, z, scales, h=1e-5):
    """Central differences of the deviance along scaled coordinate directions."""
    nt = model.ntheta
    g = np.empty(z.size)
    for j in range(z.size):
        e = np.zeros(z.size)
        e[j] = h * scales[j]
        fp = laplace(model, (z + e)[:nt], (z + e)[nt:], gradient=False).deviance
        fm = laplace(model, (z - e)[:nt], (z - e)[nt:], gradient=False).deviance
        g[j] = (fp - fm) / (2 * h * scales[j])
    return g


_BINOMIAL_KEYS = ["cbpp_glmer_laplace", "contraception_glmer_laplace",
                  "contraception_slope_glmer_laplace"]


# poisson (grouseticks) allows only its canonical log link
@pytest.mark.parametrize("key, link",
                         [(k, lk) for k in _BINOMIAL_KEYS for lk in (None, "probit", "cloglog")]
                         + [("grouseticks_glmer_laplace", None)])
def test_analytic_gradient_matches_finite_differences(key, link):
    model, des = _model(key, link)
    theta, beta = _ref_point(key)
    if link:
        beta = 0.6 * beta  # away from any optimum
    z = np.concatenate([theta * 1.1, beta])
    ev = laplace(model, z[:model.ntheta], z[model.ntheta:])
    # coordinates scaled by the column sd of X (I(age^2) is ~1e2 times age)
    scales = np.concatenate([np.ones(model.ntheta), 1.0 / np.maximum(des.X.std(axis=0), 1.0)])
    g_fd = _fd_gradient(model, z, scales)
    np.testing.assert_allclose(ev.gradient, g_fd, rtol=1e-5, atol=1e-4 * max(1.0, np.abs(g_fd).max()) * 1e-2)


def test_gradient_negative_diagonal_theta_is_symmetric():
    """The deviance is even in each column sign of Λ (θ is optimised unbounded)."""
    model, _ = _model("contraception_slope_glmer_laplace")
    theta, beta = _ref_point("contraception_slope_glmer_laplace")
    a = laplace(model, theta, beta)
    flipped = theta * np.array([-1.0, -1.0, 1.0])  # column 1 flipped
    b = laplace(model, flipped, beta)
    assert a.deviance == pytest.approx(b.deviance, abs=1e-9)
    c = laplace(model, theta * np.array([1.0, 1.0, -1.0]), beta)
    assert a.deviance == pytest.approx(c.deviance, abs=1e-9)


def test_pirls_warm_start_same_modes_fewer_iterations():
    model, _ = _model("grouseticks_glmer_laplace")
    theta, beta = _ref_point("grouseticks_glmer_laplace")
    cold = pirls(model, theta, beta)
    warm = pirls(model, theta * 1.001, beta, cold.u)
    cold2 = pirls(model, theta * 1.001, beta)
    assert warm.converged and cold2.converged
    np.testing.assert_allclose(warm.u, cold2.u, atol=1e-7)
    assert warm.iterations < cold2.iterations


def test_laplace_deviance_matches_reference_at_reference_point():
    """At lme4's estimates our deviance is (slightly) below lme4's: PIRLS is tighter."""
    for key in ["cbpp_glmer_laplace", "grouseticks_glmer_laplace", "contraception_glmer_laplace"]:
        model, _ = _model(key)
        theta, beta = _ref_point(key)
        dev = laplace(model, theta, beta, gradient=False).deviance
        ref = -2 * EXPECTED[key]["logLik"]
        assert ref - 1e-3 < dev <= ref + 1e-9


def test_nonfinite_deviance_reported_not_raised():
    model, _ = _model("grouseticks_glmer_laplace")
    theta, beta = _ref_point("grouseticks_glmer_laplace")
    ev = laplace(model, theta, beta + np.array([1e4, 0, 0, 0]))
    assert ev.deviance == np.inf or np.isfinite(ev.deviance)  # never hangs or raises


def _simulate(rng, n_groups=40, per=25, sd=0.8, link="logit", family="binomial"):
    g = np.repeat(np.arange(n_groups), per)
    x = rng.normal(size=g.size)
    b = rng.normal(scale=sd, size=n_groups)[g]
    eta = -0.3 + 0.7 * x + b
    fam = get_family(family, link)
    mu = fam.link.inverse(eta)
    y = rng.binomial(1, mu) if family == "binomial" else rng.poisson(mu)
    return pd.DataFrame({"y": y, "x": x, "g": pd.Categorical([f"g{i:02d}" for i in g])})


@pytest.mark.parametrize("link", ["probit", "cloglog"])
def test_probit_cloglog_fit_converges(link):
    df = _simulate(np.random.default_rng(7), link=link)
    r = fitting.fit("y ~ x + (1 | g)", df, "binomial", link)
    assert r.diagnostics.converged, r.diagnostics
    assert r.diagnostics.max_grad < 1e-3
    assert np.abs(r.optinfo.final_gradient).max() < 1e-3
    assert r.link == link
    assert 0.3 < r.beta[1] < 1.2
    # the optimum really is one: nudging any parameter does not lower the deviance
    des = D.Design if False else None  # noqa: F841  (kept simple: check via refit from another start)
    r2 = fitting.fit("y ~ x + (1 | g)", df, "binomial", link,
                     control={"start": {"theta": [1.5], "beta": [0.0, 0.0]}})
    assert r2.loglik == pytest.approx(r.loglik, abs=1e-6)


def test_warm_start_same_optimum_fewer_evaluations():
    ex = EXPECTED["contraception_slope_glmer_laplace"]
    df = D.load("Contraception")
    r = fitting.fit(ex["formula"], df, "binomial")
    warm = fitting.fit(ex["formula"], df, "binomial",
                       control={"start": {"theta": r.theta.tolist(), "beta": r.beta.tolist()}})
    assert warm.loglik == pytest.approx(r.loglik, abs=1e-7)
    np.testing.assert_allclose(warm.beta, r.beta, atol=1e-5)
    total = lambda f: f.optinfo.evaluations + f.optinfo.extra["start_evaluations"]  # noqa: E731
    assert total(warm) < total(r)
    assert warm.optinfo.evaluations <= 3


def test_singular_fit_flagged():
    rng = np.random.default_rng(11)
    df = _simulate(rng, n_groups=30, per=20, sd=0.0)
    r = fitting.fit("y ~ x + (1 | g)", df, "binomial")
    if r.theta[0] > 0:  # sampling variation can give a small positive variance
        df = _simulate(np.random.default_rng(3), n_groups=30, per=20, sd=0.0)
        r = fitting.fit("y ~ x + (1 | g)", df, "binomial")
    assert r.theta[0] == 0.0
    assert r.diagnostics.singular
    assert r.varcorr["variance"].iloc[0] == 0.0
    # the fixed effects then equal the GLM's
    glm = fitting.fit("y ~ x", df, "binomial")
    np.testing.assert_allclose(r.beta, glm.beta, atol=1e-5)
    assert r.loglik == pytest.approx(glm.loglik, abs=1e-6)


def test_non_singular_not_flagged():
    df = _simulate(np.random.default_rng(5), sd=1.0)
    r = fitting.fit("y ~ x + (1 | g)", df, "binomial")
    assert not r.diagnostics.singular
    assert r.diagnostics.converged
    assert r.diagnostics.warnings == ()


def test_poisson_offset_and_weights_pass_through():
    rng = np.random.default_rng(2)
    df = _simulate(rng, family="poisson", link="log", sd=0.5)
    df["t"] = rng.uniform(0.5, 2.0, size=len(df))
    r0 = fitting.fit("y ~ x + (1 | g)", df, "poisson")
    r1 = fitting.fit("y ~ x + (1 | g)", df, "poisson", offset=np.zeros(len(df)))
    assert r1.loglik == pytest.approx(r0.loglik, abs=1e-8)
    r2 = fitting.fit("y ~ x + (1 | g)", df, "poisson", offset=np.log(df["t"].to_numpy()))
    assert r2.diagnostics.converged
    assert r2.loglik != pytest.approx(r0.loglik)


def test_glm_start_is_used():
    model, des = _model("cbpp_glmer_laplace")
    g = fit_glm(des.X, model.resp)
    assert g.converged


def _crossed_frame(sd_a, sd_b, seed=11, n=4000):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 80, n)
    b = rng.integers(0, 10, n)
    x = rng.normal(size=n)
    eta = -0.2 + 0.6 * x + rng.normal(0, sd_a, 80)[a] + rng.normal(0, sd_b, 10)[b] if sd_b else \
        -0.2 + 0.6 * x + rng.normal(0, sd_a, 80)[a]
    return pd.DataFrame({"y": rng.binomial(1, 1 / (1 + np.exp(-eta))), "x": x,
                         "a": pd.Categorical(a), "b": pd.Categorical(b)})


def test_moment_theta_start_is_nearer_the_optimum_than_the_default():
    from fitting.frame import build_design
    from fitting.glmm_fit import THETA_START_SCALE, moment_theta_start

    df = _crossed_frame(0.9, 0.4)
    formula = "y ~ x + (1 | a) + (1 | b)"
    fit = fitting.fit(formula, df, family="binomial")
    design = build_design(formula, df, get_family("binomial"))
    resp = make_response(design.y, design.weights, design.offset, get_family("binomial"))
    struct = build_structure(design.re_terms, design.nobs)
    glm = fit_glm(design.X, resp)
    start = moment_theta_start(struct, resp, design.X @ glm.beta + resp.offset)
    default = THETA_START_SCALE * struct.theta_start()
    assert np.all(np.abs(start - fit.theta) < np.abs(default - fit.theta))
    assert np.all(start > 0.1)


def test_moment_theta_start_without_signal_starts_off_zero():
    from fitting.frame import build_design
    from fitting.glmm_fit import moment_theta_start

    df = _crossed_frame(0.9, 0.0)  # b has no effect
    design = build_design("y ~ x + (1 | a) + (1 | b)", df, get_family("binomial"))
    resp = make_response(design.y, design.weights, design.offset, get_family("binomial"))
    struct = build_structure(design.re_terms, design.nobs)
    glm = fit_glm(design.X, resp)
    start = moment_theta_start(struct, resp, design.X @ glm.beta + resp.offset)
    b_index = [t.theta_offset for t in struct.terms if t.group == "b"][0]
    assert start[b_index] == pytest.approx(0.1, abs=0.05)  # off the symmetric point θ = 0
    fit = fitting.fit("y ~ x + (1 | a) + (1 | b)", df, family="binomial")
    assert fit.diagnostics.converged

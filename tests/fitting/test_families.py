"""Property tests of every link and family (hypothesis): inverses, derivatives against
finite differences, log-likelihoods against scipy.stats."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from fitting.errors import FamilyError
from fitting.families import FAMILIES, LINKS, get_family, get_link

ETA = {
    "identity": st.floats(-50, 50),
    "logit": st.floats(-15, 15),
    "probit": st.floats(-7, 7),
    "cloglog": st.floats(-15, 2.5),
    "log": st.floats(-20, 20),
}
settings.register_profile("fitting", max_examples=200, deadline=None)
settings.load_profile("fitting")


def _fd(f, x, h):
    return (f(np.array([x + h]))[0] - f(np.array([x - h]))[0]) / (2 * h)


@pytest.mark.parametrize("name", sorted(LINKS))
def test_link_inverse_roundtrip(name):
    link = get_link(name)

    @given(ETA[name])
    def check(eta):
        mu = link.inverse(np.array([eta]))
        back = link.link(mu)[0]
        # near 0/1 a mean in [0, 1] has too few significant digits left to invert
        if name in ("logit", "cloglog", "probit") and min(mu[0], 1 - mu[0]) <= 1e-8:
            return
        assert back == pytest.approx(eta, rel=1e-7, abs=1e-7)

    check()


@pytest.mark.parametrize("name", sorted(LINKS))
def test_mu_eta_is_derivative_of_inverse(name):
    link = get_link(name)

    @given(ETA[name])
    def check(eta):
        h = 1e-6 * max(1.0, abs(eta))
        fd = _fd(link.inverse, eta, h)
        d = link.mu_eta(np.array([eta]))[0]
        assert d == pytest.approx(fd, rel=1e-5, abs=1e-9)

    check()


@pytest.mark.parametrize("name", sorted(LINKS))
def test_mu_eta2_is_derivative_of_mu_eta(name):
    link = get_link(name)

    @given(ETA[name])
    def check(eta):
        h = 1e-5 * max(1.0, abs(eta))
        fd = _fd(link.mu_eta, eta, h)
        d = link.mu_eta2(np.array([eta]))[0]
        if abs(link.mu_eta(np.array([eta]))[0]) <= 1e-15:
            return  # mu_eta floored at eps
        assert d == pytest.approx(fd, rel=1e-4, abs=1e-8)

    check()


MU = {"gaussian": st.floats(-100, 100), "binomial": st.floats(1e-6, 1 - 1e-6), "poisson": st.floats(1e-4, 500)}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_variance_deriv(name):
    fam = get_family(name)

    @given(MU[name])
    def check(mu):
        h = 1e-6 * max(1e-3, min(abs(mu), 1 - abs(mu)) if name == "binomial" else max(1.0, abs(mu)))
        fd = _fd(fam.variance, mu, h)
        assert fam.variance_deriv(np.array([mu]))[0] == pytest.approx(fd, rel=1e-5, abs=1e-8)

    check()


@given(st.integers(0, 40), st.integers(1, 40), st.floats(1e-4, 1 - 1e-4))
def test_binomial_loglik_vs_scipy(k, extra, p):
    n = k + extra
    fam = get_family("binomial")
    ll = fam.loglik(np.array([k / n]), np.array([p]), np.array([float(n)]))[0]
    assert ll == pytest.approx(stats.binom.logpmf(k, n, p), rel=1e-9, abs=1e-9)


@given(st.integers(0, 500), st.floats(1e-3, 1e3))
def test_poisson_loglik_vs_scipy(y, mu):
    fam = get_family("poisson")
    ll = fam.loglik(np.array([float(y)]), np.array([mu]), np.array([1.0]))[0]
    assert ll == pytest.approx(stats.poisson.logpmf(y, mu), rel=1e-9, abs=1e-9)


@given(st.floats(-100, 100), st.floats(-100, 100), st.floats(0.01, 100), st.floats(0.1, 10))
def test_gaussian_loglik_vs_scipy(y, mu, scale, w):
    fam = get_family("gaussian")
    ll = fam.loglik(np.array([y]), np.array([mu]), np.array([w]), scale)[0]
    assert ll == pytest.approx(stats.norm.logpdf(y, mu, np.sqrt(scale / w)), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_deviance_is_twice_loglik_gap_to_saturated(name):
    fam = get_family(name)
    rng = np.random.default_rng(0)
    if name == "binomial":
        w = rng.integers(1, 20, size=50).astype(float)
        y = rng.integers(0, 21, size=50) % (w + 1) / w
        mu = rng.uniform(0.05, 0.95, size=50)
    elif name == "poisson":
        y, w, mu = rng.poisson(3, size=50).astype(float), np.ones(50), rng.uniform(0.5, 6, size=50)
    else:
        y, w, mu = rng.normal(size=50), rng.uniform(0.5, 2, size=50), rng.normal(size=50)
    dev = fam.deviance_residuals(y, mu, w)
    gap = 2 * (fam.loglik(y, y, w) - fam.loglik(y, mu, w))
    np.testing.assert_allclose(dev, gap, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_working_weights(name):
    for link in FAMILIES[name].allowed_links:
        fam = get_family(name, link)
        eta = np.linspace(-1.0, 1.0, 7)
        w = np.linspace(1.0, 3.0, 7)
        mu = fam.link.inverse(eta)
        expected = w * fam.link.mu_eta(eta) ** 2 / fam.variance(mu)
        np.testing.assert_allclose(fam.working_weights(eta, w), expected)


def test_lookup_errors_name_the_culprit():
    with pytest.raises(FamilyError, match="gama"):
        get_family("gama")
    with pytest.raises(FamilyError, match="probit"):
        get_family("poisson", "probit")
    with pytest.raises(FamilyError, match="valid links"):
        get_link("logitt")

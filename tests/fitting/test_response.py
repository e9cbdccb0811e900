"""fitting.response: the log-likelihood constants of a response."""
from __future__ import annotations

import numpy as np
import pytest

from fitting.families import get_family
from fitting.response import make_response


def _general_constants(y, w, fam):
    """``const`` and the saturated term as the general path computes them."""
    mu0 = fam.starting_mu(y, w)
    dres0 = fam.deviance_residuals(y, mu0, w)
    const = float(np.sum(-2.0 * fam.loglik(y, mu0, w) - dres0))
    eta0 = fam.link.link(mu0)
    sat = -2.0 * float((w * y) @ eta0 - w @ np.logaddexp(0.0, eta0)) - float(np.sum(dres0))
    return const, sat


@pytest.mark.parametrize("link", ["logit", "probit", "cloglog"])
def test_binary_outcomes_take_the_exact_constants(link):
    rng = np.random.default_rng(3)
    y = (rng.random(3000) < 0.3).astype(float)
    w = np.ones_like(y)
    fam = get_family("binomial", link)
    r = make_response(y, w, np.zeros_like(y), fam)
    const, sat = _general_constants(y, w, fam)
    assert r.const == 0.0 and abs(const) < 1e-9
    if link == "logit":
        assert r.fast == "logit" and r.sat == 0.0 and abs(sat) < 1e-8
    # the deviance and log-likelihood at any η are those of the family
    eta = rng.normal(0, 1.5, y.size)
    ev = r.evaluate(eta)
    mu = fam.link.inverse(eta)
    assert ev.dev == pytest.approx(float(np.sum(fam.deviance_residuals(y, mu, w))), rel=1e-10)
    assert r.loglik(ev.dev) == pytest.approx(float(np.sum(fam.loglik(y, mu, w))), rel=1e-10)


def test_proportions_and_totals_keep_their_constants():
    rng = np.random.default_rng(4)
    n = rng.integers(1, 9, 500).astype(float)
    y = rng.binomial(n.astype(int), 0.4) / n
    fam = get_family("binomial")
    r = make_response(y, n, np.zeros_like(y), fam)
    const, _ = _general_constants(y, n, fam)
    assert r.const == pytest.approx(const, rel=1e-12) and r.const != 0.0

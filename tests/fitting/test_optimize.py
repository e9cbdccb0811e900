"""Tests of :mod:`fitting.optimize` (whitened BFGS)."""
from __future__ import annotations

import numpy as np
import pytest

from fitting.optimize import minimize_whitened


def _quadratic(H, zstar):
    def fun(z, state):
        dz = z - zstar
        return 0.5 * float(dz @ H @ dz), H @ dz, state
    return fun


@pytest.mark.parametrize("cond", [1e2, 1e4, 1e5])
def test_whitening_keeps_small_curvatures_of_an_ill_conditioned_quadratic(cond):
    # A positive definite start Hessian with eigenvalues spread over `cond` (a GLMM's θ
    # directions against its β directions): whitening by it makes the problem the identity,
    # so BFGS lands in one step. Flooring the small eigenvalues at 1e-3 of the largest (the
    # old default) left curvatures up to 20x wrong and cost 6+ iterations on such problems.
    rng = np.random.default_rng(3)
    Q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    H = Q @ np.diag(np.geomspace(1.0, cond, 5)) @ Q.T
    zstar = rng.normal(size=5)
    zstar *= 3.0 / np.sqrt(zstar @ H @ zstar)  # 3 whitened units away (below the step cap)
    res = minimize_whitened(_quadratic(H, zstar), np.zeros(5), gtol=1e-8)
    assert res.outcome.status == 0
    assert res.outcome.iterations <= 2
    np.testing.assert_allclose(res.z, zstar, atol=1e-6)


def test_indefinite_start_hessian_still_converges():
    # f = sum(z^4)/4 - z0^2/2 has an indefinite Hessian at the start: |eigenvalues| whiten
    def fun(z, state):
        g = z ** 3
        g[0] -= z[0]
        return float(np.sum(z ** 4) / 4 - z[0] ** 2 / 2), g, state
    res = minimize_whitened(fun, np.array([0.3, 0.5, -0.4]), gtol=1e-8)
    assert res.outcome.status == 0
    np.testing.assert_allclose(np.abs(res.z), [1.0, 0.0, 0.0], atol=1e-2)

"""Gauss–Hermite rules for the standard normal: exactness and the tensor grid.

References are closed-form normal moments (E z^(2j) = (2j-1)!!) and the normal
moment generating function, not the rule itself.
"""
import math

import numpy as np
import pytest

from fitting.quadrature import MAX_GRID_POINTS, gauss_hermite, tensor_rule


def normal_moment(j: int) -> float:
    """E[z**j] for z ~ N(0, 1)."""
    if j % 2:
        return 0.0
    return float(math.prod(range(j - 1, 0, -2))) if j else 1.0


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 10, 15, 25])
def test_exact_for_polynomials_up_to_degree_2n_minus_1(n):
    z, w = gauss_hermite(n)
    assert z.shape == w.shape == (n,)
    assert np.all(w > 0)
    assert w.sum() == pytest.approx(1.0, abs=1e-14)
    np.testing.assert_allclose(z, -z[::-1], atol=1e-14)
    for j in range(2 * n):
        got = float(np.sum(w * z**j))
        scale = float(np.sum(w * np.abs(z) ** j))  # size of the terms (odd j cancel)
        assert abs(got - normal_moment(j)) <= 1e-12 * scale, (n, j)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_not_exact_at_degree_2n(n):
    # the check above can fail: degree 2n is beyond the rule's exactness
    z, w = gauss_hermite(n)
    assert abs(np.sum(w * z ** (2 * n)) - normal_moment(2 * n)) > 1e-3


def test_one_node_is_the_mode():
    z, w = gauss_hermite(1)
    assert z.tolist() == [0.0] and w.tolist() == [1.0]


def test_smooth_integrand_converges():
    # E exp(t z) = exp(t^2 / 2)
    for t in (0.5, 1.0, 2.0):
        z, w = gauss_hermite(30)
        assert np.sum(w * np.exp(t * z)) == pytest.approx(math.exp(t * t / 2), rel=1e-12)


def test_cached_and_read_only():
    z1, w1 = gauss_hermite(9)
    z2, w2 = gauss_hermite(9)
    assert z1 is z2 and w1 is w2
    with pytest.raises(ValueError):
        z1[0] = 1.0
    assert tensor_rule(5, 2) is tensor_rule(5, 2)


@pytest.mark.parametrize("n", [1, 3, 4, 6])
def test_tensor_grid_2d_exact_for_products(n):
    rule = tensor_rule(n, 2)
    assert rule.nodes.shape == (n * n, 2) and rule.size == n * n and rule.k == 2
    assert rule.weights.sum() == pytest.approx(1.0, abs=1e-13)
    np.testing.assert_allclose(rule.log_weights, np.log(rule.weights), rtol=1e-12)
    np.testing.assert_allclose(rule.half_sq_norm, 0.5 * (rule.nodes**2).sum(axis=1), rtol=1e-14)
    z1, z2 = rule.nodes.T
    for a in range(2 * n):
        for b in range(2 * n):
            got = float(np.sum(rule.weights * z1**a * z2**b))
            scale = float(np.sum(rule.weights * np.abs(z1**a * z2**b)))
            assert abs(got - normal_moment(a) * normal_moment(b)) <= 1e-12 * scale, (a, b)


def test_tensor_grid_2d_mgf_and_correlated_quadratic():
    rule = tensor_rule(20, 2)
    t = np.array([0.7, -1.1])
    got = np.sum(rule.weights * np.exp(rule.nodes @ t))
    assert got == pytest.approx(math.exp(0.5 * t @ t), rel=1e-12)
    # E (a'z)^2 (b'z)^2 for z ~ N(0, I2): a'a b'b + 2 (a'b)^2
    a, b = np.array([1.0, 2.0]), np.array([-0.5, 0.3])
    got = np.sum(rule.weights * (rule.nodes @ a) ** 2 * (rule.nodes @ b) ** 2)
    assert got == pytest.approx((a @ a) * (b @ b) + 2 * (a @ b) ** 2, rel=1e-12)


def test_tensor_grid_3d_first_coordinate_slowest():
    rule = tensor_rule(3, 3)
    z, _ = gauss_hermite(3)
    assert rule.size == 27
    np.testing.assert_array_equal(rule.nodes[:9, 0], np.full(9, z[0]))
    np.testing.assert_array_equal(rule.nodes[:3, 2], z)


def test_pruning_drops_negligible_corners():
    full, pruned = tensor_rule(15, 2), tensor_rule(15, 2, prune=1e-12)
    assert pruned.size < full.size
    assert 1.0 - pruned.weights.sum() < 1e-12 * full.size
    t = np.array([0.3, 0.4])
    assert np.sum(pruned.weights * np.exp(pruned.nodes @ t)) == pytest.approx(
        math.exp(0.5 * t @ t), rel=1e-10
    )


def test_validation():
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError):
            gauss_hermite(bad)
    with pytest.raises(ValueError):
        tensor_rule(3, 0)
    with pytest.raises(ValueError, match="cap"):
        tensor_rule(101, 2)
    assert 100**2 <= MAX_GRID_POINTS
    with pytest.raises(ValueError):
        tensor_rule(5, 2, prune=1.0)

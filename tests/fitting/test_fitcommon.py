"""Moment starts of θ (fitting.fitcommon.moment_cov_theta) and their use by the fit paths."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fitting
from fitting.fitcommon import MOMENT_CAP, MOMENT_FLOOR, moment_cov_theta

from . import _designs as D


def _group_stats(rng, sigma, m=400, n_per=200):
    """Exact per-group (G, s) of a Gaussian working model with known covariance Σ."""
    k = sigma.shape[0]
    L = np.linalg.cholesky(sigma)
    G = np.empty((m, k, k))
    s = np.empty((m, k))
    for g in range(m):
        Z = np.column_stack([np.ones(n_per)] + [rng.normal(size=n_per) for _ in range(k - 1)])
        Wg = np.full(n_per, 0.2)
        b = L @ rng.normal(size=k)
        r = Z @ b + rng.normal(size=n_per) / np.sqrt(Wg)  # working residuals
        G[g] = Z.T @ (Wg[:, None] * Z)
        s[g] = Z.T @ (Wg * r)
    return G, s


def test_recovers_a_known_covariance():
    rng = np.random.default_rng(4)
    sigma = np.array([[0.8, -0.3], [-0.3, 0.5]])
    G, s = _group_stats(rng, sigma)
    th = moment_cov_theta(G, s, np.zeros(len(G), dtype=np.int64), 1, np.array([0.5, 0.0, 0.5]))[0]
    L = np.array([[th[0], 0.0], [th[1], th[2]]])  # lme4 order: column-major lower triangle
    np.testing.assert_allclose(L @ L.T, sigma, atol=0.12)


def test_strata_are_separate_and_short_strata_keep_the_default():
    rng = np.random.default_rng(5)
    G1, s1 = _group_stats(rng, np.diag([1.0, 0.25]), m=300)
    G2, s2 = _group_stats(rng, np.diag([0.09, 1.0]), m=300)
    G3, s3 = _group_stats(rng, np.eye(2), m=1)  # one group: no estimate
    G = np.concatenate([G1, G2, G3])
    s = np.concatenate([s1, s2, s3])
    strata = np.repeat([0, 1, 2], [300, 300, 1])
    default = np.array([0.5, 0.0, 0.5])
    th = moment_cov_theta(G, s, strata, 3, default)
    # θ = (sd1, 0, sd2) for a diagonal Σ: stratum 0 has sds (1, 0.5), stratum 1 (0.3, 1)
    np.testing.assert_allclose(th[0], [1.0, 0.0, 0.5], atol=0.1)
    np.testing.assert_allclose(th[1], [0.3, 0.0, 1.0], atol=0.1)
    np.testing.assert_array_equal(th[2], default)


def test_singular_groups_are_left_out_and_eigenvalues_clipped():
    rng = np.random.default_rng(6)
    G, s = _group_stats(rng, np.diag([1e-6, 1e-6]), m=200)
    # groups whose slope column is constant (rank-one G) carry no slope information
    G_bad = np.tile(np.array([[5.0, 0.0], [0.0, 0.0]]), (50, 1, 1))
    s_bad = np.tile(np.array([1e6, 0.0]), (50, 1))  # would dominate if used
    G = np.concatenate([G, G_bad])
    s = np.concatenate([s, s_bad])
    th = moment_cov_theta(G, s, np.zeros(len(G), dtype=np.int64), 1, np.array([0.5, 0.0, 0.5]))[0]
    L = np.array([[th[0], 0.0], [th[1], th[2]]])
    w = np.linalg.eigvalsh(L @ L.T)
    assert np.all(w >= MOMENT_FLOOR ** 2 * (1 - 1e-9)) and np.all(w <= MOMENT_CAP ** 2)
    assert np.abs(L @ L.T - MOMENT_FLOOR ** 2 * np.eye(2)).max() < 1e-3  # no evidence: the floor


def test_non_finite_groups_give_the_default():
    G = np.full((3, 2, 2), np.nan)
    s = np.zeros((3, 2))
    default = np.array([0.5, 0.0, 0.5])
    np.testing.assert_array_equal(moment_cov_theta(G, s, np.zeros(3, dtype=np.int64), 1, default)[0], default)


def test_contraception_slope_starts_near_the_optimum_and_saves_evaluations():
    df = D.load("Contraception")
    f = "use ~ age + I(age^2) + urban + livch + (urban | district)"
    res = fitting.fit(f, df, family="binomial")
    old = fitting.fit(f, df, family="binomial", control={"start": {"theta": [0.5, 0.0, 0.5]}})
    assert res.loglik == pytest.approx(old.loglik, abs=1e-7)
    np.testing.assert_allclose(res.theta, old.theta, atol=1e-5)
    start = np.asarray(res.optinfo.initial[:3])
    assert np.abs(start - res.theta).max() < 0.25  # (0.62, -0.77, 0.46) for (0.62, -0.58, 0.45)
    assert res.optinfo.evaluations < old.optinfo.evaluations


def test_fit_many_uses_the_same_vector_start_as_fit():
    df = D.load("Contraception")
    df = df.assign(half=np.where(df["district"].astype(str).str.len() % 2 == 0, "a", "b"))
    f = "use ~ age + urban + (urban | district)"
    many = fitting.fit_many(f, df, by=["half"], family="binomial")
    for key, sub in df.groupby("half", observed=True):
        one = fitting.fit(f, sub.reset_index(drop=True), family="binomial")
        got = many[(key,)] if (key,) in many else many[key]
        np.testing.assert_allclose(got.optinfo.initial, one.optinfo.initial, rtol=1e-8, atol=1e-10)
        assert got.loglik == pytest.approx(one.loglik, abs=1e-6)


"""Separation (Konis LP), degenerate groups and the opt-in penalty."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import special

from fitting.separation import (
    DEFAULT_PRIOR_SCALE,
    SeparationReport,
    degenerate_groups,
    detect_separation,
    penalty_deviance,
    penalty_scales,
)

FIX = Path(__file__).resolve().parents[1] / "fixtures"
NAMES = ("(Intercept)", "x", "z")


def _toy(seed=1, n=60):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    z = rng.normal(size=n)
    return x, z


def _glm_loglik_unbounded(X, y, direction, steps=(1, 10, 100, 1e6)):
    """Bernoulli log-likelihood along ``t * direction``: increases towards 0 if separated."""
    return [float(np.sum(y * special.log_expit(X @ (t * direction))
                         + (1 - y) * special.log_expit(-(X @ (t * direction))))) for t in steps]


def test_complete_separation_names_the_predictor():
    x, z = _toy()
    y = (x > 0.2).astype(float)
    X = np.column_stack([np.ones_like(x), x, z])
    rep = detect_separation(X, y, None, NAMES)
    assert isinstance(rep, SeparationReport)
    assert rep.separated and rep.kind == "complete"
    assert "x" in rep.terms and "z" not in rep.terms
    assert "x" in rep.message and "complete" in rep.message
    d = np.array(rep.direction)
    assert d[1] > 0  # x -> +inf
    # the reported direction does separate: the likelihood climbs to 0 along it
    ll = _glm_loglik_unbounded(X, y, d)
    assert ll[0] < ll[1] < ll[2] and ll[-1] > -1e-6


def test_quasi_complete_separation_with_a_tie():
    x, _ = _toy()
    y = (x > 0.2).astype(float)
    # a tied pair at the boundary with both outcomes: no direction separates strictly
    x = np.concatenate([x, [0.2, 0.2]])
    y = np.concatenate([y, [0.0, 1.0]])
    X = np.column_stack([np.ones_like(x), x])
    rep = detect_separation(X, y, None, NAMES[:2])
    assert rep.separated and rep.kind == "quasi"
    assert rep.terms == ("(Intercept)", "x")
    d = np.array(rep.direction)
    # along the direction the tied rows sit exactly on the boundary
    np.testing.assert_allclose(X[x == 0.2] @ d, 0.0, atol=1e-9)
    assert np.all((X[y == 1] @ d) >= -1e-9) and np.all((X[y == 0] @ d) <= 1e-9)


def test_no_separation_random_logistic_data():
    rng = np.random.default_rng(7)
    n = 400
    X = np.column_stack([np.ones(n), rng.normal(size=(n, 3))])
    y = rng.binomial(1, special.expit(X @ [0.2, 1.0, -0.5, 0.3])).astype(float)
    rep = detect_separation(X, y)
    assert not rep.separated and rep.kind == "none" and rep.terms == ()


def test_no_separation_contraception():
    d = pd.read_parquet(FIX / "Contraception.parquet")
    age = d["age"].to_numpy(float)
    X = np.column_stack([
        np.ones(len(d)), age, age**2, (d["urban"] == "Y").to_numpy(float),
        *[(d["livch"] == lv).to_numpy(float) for lv in ("1", "2", "3+")],
    ])
    rep = detect_separation(X, d["use"].to_numpy(float), np.ones(len(d)),
                            ("(Intercept)", "age", "I(age^2)", "urbanY", "livch1", "livch2", "livch3+"))
    assert not rep.separated and rep.kind == "none"


def test_factor_level_with_all_zero_outcomes():
    rng = np.random.default_rng(3)
    f = np.repeat([0, 1, 2], 25)
    y = rng.binomial(1, 0.5, f.size).astype(float)
    y[f == 2] = 0.0
    X = np.column_stack([np.ones(f.size), f == 1, f == 2, rng.normal(size=f.size)]).astype(float)
    rep = detect_separation(X, y, None, ("(Intercept)", "gb", "gc", "z"))
    assert rep.separated and rep.kind == "quasi"
    assert rep.terms == ("gc",)
    assert rep.direction[2] < 0 and "gc -> -inf" in rep.message


def test_binomial_proportions_and_weights():
    # 0 < y < 1 rows are both successes and failures: no separation through them
    x = np.array([-2.0, -1.0, 0.0, 1.0, 2.0])
    X = np.column_stack([np.ones(5), x])
    y = np.array([0.0, 0.0, 0.5, 1.0, 1.0])
    w = np.array([3.0, 2.0, 4.0, 2.0, 5.0])
    rep = detect_separation(X, y, w, ("(Intercept)", "x"))
    assert rep.separated and rep.kind == "quasi" and rep.terms == ("x",)
    # a middle row with all successes: then the x threshold is not at 0
    rep2 = detect_separation(X, np.array([0.0, 0.0, 1.0, 1.0, 1.0]), w, ("(Intercept)", "x"))
    assert rep2.kind == "complete" and set(rep2.terms) == {"(Intercept)", "x"}
    # zero-weight rows are ignored: a conflicting row with weight 0 changes nothing
    Xc = np.vstack([X, [1.0, 2.0]])
    rep3 = detect_separation(Xc, np.r_[y, 0.0], np.r_[w, 0.0], ("(Intercept)", "x"))
    assert rep3.separated
    rep4 = detect_separation(Xc, np.r_[y, 0.0], np.r_[w, 1.0], ("(Intercept)", "x"))
    assert not rep4.separated


def test_all_successes_is_separation_in_the_intercept():
    rng = np.random.default_rng(0)
    X = np.column_stack([np.ones(20), rng.uniform(1, 2, 20)])
    rep = detect_separation(X, np.ones(20), None, ("(Intercept)", "age"))
    assert rep.kind == "complete" and rep.terms == ("(Intercept)",)


def test_input_validation():
    with pytest.raises(ValueError):
        detect_separation(np.ones((3, 1)), np.array([0.0, 2.0, 1.0]))
    with pytest.raises(ValueError):
        detect_separation(np.ones((3, 1)), np.ones(4))
    with pytest.raises(ValueError):
        detect_separation(np.ones((3, 2)), np.ones(3), names=("a",))


def test_degenerate_groups_counts():
    rng = np.random.default_rng(11)
    n_levels = 40
    codes = rng.integers(0, n_levels - 1, size=300)  # last level empty
    y = rng.binomial(1, 0.5, size=300).astype(float)
    y[np.isin(codes, [0, 1, 2])] = 0.0
    y[np.isin(codes, [5, 6])] = 1.0
    w = np.ones(300)
    out = degenerate_groups(y, w, codes, n_levels)
    # independent reference: pandas groupby
    df = pd.DataFrame({"g": codes, "y": y})
    grp = df.groupby("g")["y"]
    all0 = sorted(grp.max()[lambda s: s == 0].index)
    all1 = sorted(grp.min()[lambda s: s == 1].index)
    assert out["all_zero"] == all0 and out["all_one"] == all1
    assert set(all0) >= {0, 1, 2} and set(all1) >= {5, 6}
    assert out["n_all_zero"] == len(all0) and out["n_all_one"] == len(all1)
    assert out["n_empty"] == 1 and out["n_groups"] == n_levels
    assert out["n_degenerate"] == len(all0) + len(all1)
    assert out["fraction_degenerate"] == pytest.approx(out["n_degenerate"] / (n_levels - 1))


def test_degenerate_groups_binomial_proportions_and_poisson():
    codes = np.array([0, 0, 1, 1, 2, 2, 3])
    y = np.array([0.0, 0.0, 0.5, 1.0, 1.0, 1.0, 0.0])
    w = np.array([3, 2, 4, 1, 2, 2, 0.0])  # group 3 only has a zero-weight row
    out = degenerate_groups(y, w, codes, 4)
    assert out["all_zero"] == [0] and out["all_one"] == [2] and out["n_empty"] == 1
    counts = np.array([0, 0, 3, 1, 0, 0, 2.0])
    outp = degenerate_groups(counts, None, np.array([0, 0, 1, 1, 2, 2, 3]), 4, family="poisson")
    assert outp["all_zero"] == [0, 2] and outp["n_all_one"] == 0 and outp["n_degenerate"] == 2
    with pytest.raises(ValueError):
        degenerate_groups(y, w, codes, 3)


def test_penalty_value_gradient_and_intercept():
    beta = np.array([1.5, -2.0, 0.7])
    names = ("(Intercept)", "x", "z")
    pen, grad = penalty_deviance(beta, 2.5, names=names)
    assert pen == pytest.approx((2.0**2 + 0.7**2) / 2.5**2)
    assert grad[0] == 0.0
    eps = 1e-6
    for j in range(3):
        e = np.zeros(3)
        e[j] = eps
        fd = (penalty_deviance(beta + e, 2.5, names=names)[0]
              - penalty_deviance(beta - e, 2.5, names=names)[0]) / (2 * eps)
        assert grad[j] == pytest.approx(fd, rel=1e-7, abs=1e-10)
    # -2 log normal density, up to a constant
    from scipy.stats import norm

    c = -2 * (norm.logpdf(0.0, 0, 2.5) * 2)
    assert pen == pytest.approx(-2 * (norm.logpdf(-2.0, 0, 2.5) + norm.logpdf(0.7, 0, 2.5)) - c)
    pen2, _ = penalty_deviance(beta, [np.inf, 1.0, 2.0], penalized=[True, True, False])
    assert pen2 == pytest.approx(4.0)


def test_penalty_scales_and_finite_fit_under_separation():
    x, z = _toy()
    y = (x > 0.2).astype(float)
    X = np.column_stack([np.ones_like(x), x])
    s = penalty_scales(X, ("(Intercept)", "x"))
    assert np.isinf(s[0]) and s[1] == pytest.approx(DEFAULT_PRIOR_SCALE / x.std(ddof=1))
    from scipy.optimize import minimize

    def pdev(b):
        eta = X @ b
        dev = -2 * np.sum(y * special.log_expit(eta) + (1 - y) * special.log_expit(-eta))
        pen, _ = penalty_deviance(b, s)
        return dev + pen

    res = minimize(pdev, np.zeros(2), method="BFGS")
    assert res.success and np.all(np.isfinite(res.x)) and 0 < res.x[1] < 50
    with pytest.raises(ValueError):
        penalty_deviance(np.ones(2), 0.0)

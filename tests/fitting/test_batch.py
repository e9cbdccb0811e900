"""fitting.fit_many (fitting.batch*): batched per-stratum GLMM fits equal fitting.fit."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import fitting
from fitting.batch import fit_many
from fitting.batch_kernels import GenericKernel, row_kernel
from fitting.batch_laplace import evaluate
from fitting.batch_stack import stack_designs
from fitting.errors import DataError, FittingError
from fitting.families import get_family
from fitting.frame import build_design
from fitting.glmm import GlmmModel, laplace
from fitting.glmm_checks import check_laplace_at
from fitting.response import make_response
from fitting.structure import build_structure

FORMULA = "y ~ x1 + x2 + (1 | g)"


# ------------------------------------------------------------------------ data
def _stratum(rng, s, family, n_groups, lo, hi, sd=None):
    sd = rng.uniform(0.5, 1.2) if sd is None else sd
    b = rng.normal([-0.3, 0.6, -0.4], 0.2)
    sizes = rng.integers(lo, hi + 1, size=n_groups)
    g = np.repeat(np.arange(n_groups), sizes)
    n = g.size
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    eta = b[0] + b[1] * x1 + b[2] * x2 + rng.normal(0, sd, n_groups)[g]
    if family == "binomial":
        y = rng.binomial(1, 1 / (1 + np.exp(-eta)))
    else:
        y = rng.poisson(np.exp(0.5 + 0.5 * eta))
    return pd.DataFrame({"s": s, "g": [f"g{j:02d}" for j in g], "x1": x1, "x2": x2, "y": y.astype(float)})


def many_strata(family="binomial", n_strata=30, seed=1, broken=True):
    """30 strata x 10-30 groups x 5-40 rows, plus broken strata (last keys)."""
    rng = np.random.default_rng(seed)
    parts = [_stratum(rng, f"s{s:02d}", family, int(rng.integers(10, 31)), 5, 40) for s in range(n_strata)]
    if broken:
        one = _stratum(rng, "z1_one_group", family, 1, 30, 40)
        nan = _stratum(rng, "z2_nan_x2", family, 12, 5, 20)
        nan["x2"] = np.nan
        bad = _stratum(rng, "z3_bad_y", family, 12, 5, 20)
        bad.loc[bad.index[3], "y"] = 2.5 if family == "binomial" else -1.0
        parts += [one, nan, bad]
        if family == "binomial":
            sep = _stratum(rng, "z4_separated", family, 12, 5, 20)
            sep["y"] = (sep["x1"] > 0).astype(float)
            parts.append(sep)
    return pd.concat(parts, ignore_index=True)


@pytest.fixture(scope="module")
def binomial_data():
    return many_strata("binomial")


@pytest.fixture(scope="module")
def binomial_fits(binomial_data):
    return fit_many(FORMULA, binomial_data, by="s", family="binomial")


def _fit_alone(data, key, formula=FORMULA, family="binomial", **kw):
    sub = data[data["s"] == key[0]]
    try:
        return fitting.fit(formula, sub, family, **kw)
    except FittingError as exc:
        return exc


def _exact_se(data, key, res, formula=FORMULA, family="binomial"):
    """SE from a Richardson-extrapolated central-difference Hessian of fitting.glmm.laplace."""
    d = build_design(formula, data[data["s"] == key[0]], family)
    fam = get_family(family)
    m = GlmmModel(build_structure(d.re_terms, d.nobs), d.X, make_response(d.y, d.weights, d.offset, fam))
    nt = len(res.theta)
    z = np.concatenate([res.theta, res.beta])
    u = laplace(m, res.theta, res.beta, tol=1e-24, maxit=200).pirls.u

    def grad(zz):
        return laplace(m, zz[:nt], zz[nt:], u, tol=1e-24, maxit=200).gradient

    def central(h):
        H = np.empty((z.size, z.size))
        for j in range(z.size):
            e = np.zeros(z.size)
            e[j] = h
            H[:, j] = (grad(z + e) - grad(z - e)) / (2 * h)
        return 0.5 * (H + H.T)

    H = (4 * central(1e-4) - central(2e-4)) / 3
    return np.sqrt(np.diag(2 * np.linalg.inv(H))[nt:])


def _est_tol(ref):
    """1e-6; 1e-4 at a singular fit, where fit's L-BFGS stops at |grad| ~1e-5 (ours ~1e-11)."""
    return 1e-4 if ref.diagnostics.singular else 1e-6


def assert_same_fit(res, ref, *, est=1e-6, se=1e-3, loglik=1e-8):
    """Estimates, θ, loglik, tables equal; SE within ``se``.

    fit's SEs come from a forward-difference Hessian (step 1e-4 along whitened
    directions) whose error reaches a few 1e-4 relative on small strata; ours are exact
    (checked against a Richardson-extrapolated central-difference Hessian at 1e-6).
    """
    assert isinstance(res, fitting.FitResult), res
    np.testing.assert_allclose(res.theta, ref.theta, rtol=0, atol=est)
    np.testing.assert_allclose(res.beta, ref.beta, rtol=0, atol=est)
    assert abs(res.loglik - ref.loglik) <= loglik
    assert abs(res.aic - ref.aic) <= 2 * loglik and abs(res.bic - ref.bic) <= 2 * loglik
    np.testing.assert_allclose(res.fixed["std_error"], ref.fixed["std_error"], rtol=se)
    assert list(res.fixed["term"]) == list(ref.fixed["term"])
    assert res.theta_names == ref.theta_names and res.ngroups == ref.ngroups and res.nobs == ref.nobs
    assert list(res.vcov.columns) == list(ref.vcov.columns)
    pd.testing.assert_frame_equal(res.varcorr, ref.varcorr, check_exact=False, rtol=1e-5, atol=10 * est)
    pd.testing.assert_frame_equal(res.ranef.drop(columns=["mode", "cond_sd"]),
                                  ref.ranef.drop(columns=["mode", "cond_sd"]))
    np.testing.assert_allclose(res.ranef["mode"], ref.ranef["mode"], atol=10 * est)
    np.testing.assert_allclose(res.ranef["cond_sd"], ref.ranef["cond_sd"], atol=10 * est)
    assert res.diagnostics.converged == ref.diagnostics.converged
    assert res.diagnostics.singular == ref.diagnostics.singular
    assert (res.family, res.link, res.method, res.formula) == (ref.family, ref.link, ref.method, ref.formula)


# ----------------------------------------------------------------------- tests
def test_fit_many_equals_fit_per_stratum(binomial_data, binomial_fits):
    keys = list(binomial_fits)
    assert keys == sorted(keys) and all(isinstance(k, tuple) and len(k) == 1 for k in keys)
    assert len(keys) == binomial_data["s"].nunique()
    batched = 0
    for key, res in binomial_fits.items():
        ref = _fit_alone(binomial_data, key)
        if isinstance(ref, FittingError):
            assert type(res) is type(ref) and str(res) == str(ref), key
            continue
        if res.optinfo.optimizer == "batched-newton":
            batched += 1
            # converged by the Newton decrement: the remaining step is below 1e-5 SE
            assert (res.optinfo.extra["newton_decrement"] <= 1e-10
                    or res.diagnostics.max_grad <= 1e-10), key
            assert res.diagnostics.max_grad < 1e-3
            assert_same_fit(res, ref, est=_est_tol(ref))
            np.testing.assert_allclose(res.fixed["std_error"], _exact_se(binomial_data, key, res), rtol=1e-6)
        else:  # refitted by fit itself: identical
            assert res.optinfo.optimizer == ref.optinfo.optimizer
            np.testing.assert_array_equal(res.beta, ref.beta)
    assert batched == 30


def test_broken_strata_fail_alone_with_their_own_messages(binomial_data, binomial_fits):
    one = binomial_fits[("z1_one_group",)]
    assert isinstance(one, DataError) and "only 1 level" in str(one)
    nan = binomial_fits[("z2_nan_x2",)]
    assert isinstance(nan, DataError) and "x2" in str(nan)
    bad = binomial_fits[("z3_bad_y",)]
    assert isinstance(bad, DataError) and "outside [0, 1]" in str(bad)
    sep = binomial_fits[("z4_separated",)]
    # separated data (flat deviance): handed to fit itself, so the answer is exactly fit's
    assert isinstance(sep, fitting.FitResult) and sep.optinfo.optimizer != "batched-newton"
    ref = _fit_alone(binomial_data, ("z4_separated",))
    np.testing.assert_array_equal(sep.beta, ref.beta)
    assert sep.diagnostics == ref.diagnostics


def test_optinfo_and_diagnostics(binomial_fits):
    res = binomial_fits[("s03",)]
    oi = res.optinfo
    assert oi.optimizer == "batched-newton" and oi.converged_code == 0
    assert oi.evaluations >= oi.extra["iterations"] >= 1
    assert len(oi.extra["log"]) == oi.extra["iterations"] + 1
    assert oi.extra["batch_strata"] >= 30 and 0 < oi.elapsed < oi.extra["batch_elapsed"] + 1
    assert np.all(np.diff(oi.extra["log"]) <= 1e-8)
    assert len(oi.final) == len(oi.initial) == 4 and oi.final == tuple(np.r_[res.theta, res.beta])
    assert res.diagnostics.converged and res.diagnostics.hessian_pd
    oi.to_dict(), res.diagnostics.to_dict()


def test_poisson_strata():
    data = many_strata("poisson", n_strata=12, seed=5)
    out = fit_many(FORMULA, data, by=["s"], family="poisson")
    n_batched = 0
    for key, res in out.items():
        ref = _fit_alone(data, key, family="poisson")
        if isinstance(ref, FittingError):
            assert type(res) is type(ref) and str(res) == str(ref)
            continue
        assert res.optinfo.optimizer == "batched-newton"
        n_batched += 1
        assert_same_fit(res, ref, est=_est_tol(ref))
    assert n_batched == 12


def test_warm_start_reproduces_the_optimum_with_fewer_evaluations(binomial_data, binomial_fits):
    good = {k: r for k, r in binomial_fits.items() if isinstance(r, fitting.FitResult)
            and r.optinfo.optimizer == "batched-newton"}
    sub = binomial_data[binomial_data["s"].isin([k[0] for k in good])]
    # a start per stratum: last night's result, or a dict matched by term name (reordered)
    start = {}
    for i, (k, r) in enumerate(good.items()):
        start[k] = r if i % 2 else {"theta": list(r.theta),
                                    "beta": dict(reversed(list(zip(r.fixed["term"], r.beta))))}
    warm = fit_many(FORMULA, sub, by="s", family="binomial", start=start)
    cold_ev = sum(r.optinfo.evaluations for r in good.values())
    warm_ev = sum(warm[k].optinfo.evaluations for k in good)
    assert warm_ev < 0.5 * cold_ev
    for k, r in good.items():
        w = warm[k]
        np.testing.assert_allclose(np.r_[w.theta, w.beta], np.r_[r.theta, r.beta], atol=1e-7)
        assert w.optinfo.initial == tuple(np.r_[r.theta, r.beta])


def test_max_rows_chunking_gives_identical_results(binomial_data, binomial_fits):
    small = fit_many(FORMULA, binomial_data, by="s", family="binomial", max_rows=1500)
    chunks = {r.optinfo.extra["batch_rows"] for r in small.values()
              if isinstance(r, fitting.FitResult) and r.optinfo.optimizer == "batched-newton"}
    assert max(chunks) <= 1500 and len(chunks) > 5
    for k, r in binomial_fits.items():
        s = small[k]
        if isinstance(r, FittingError):
            assert str(s) == str(r)
            continue
        np.testing.assert_allclose(np.r_[s.theta, s.beta], np.r_[r.theta, r.beta], atol=1e-9)
        np.testing.assert_allclose(s.fixed["std_error"], r.fixed["std_error"], rtol=1e-8)
        assert abs(s.loglik - r.loglik) < 1e-9


def test_factor_level_absent_in_a_stratum_and_two_by_columns():
    rng = np.random.default_rng(3)
    parts = []
    for s in range(4):
        d = _stratum(rng, s, "binomial", 14, 10, 30)
        d["region"] = "north" if s < 2 else "south"
        levels = ["a", "b", "c"] if s != 1 else ["a", "b"]
        d["f"] = rng.choice(levels, size=len(d))
        parts.append(d)
    data = pd.concat(parts, ignore_index=True)
    formula = "y ~ x1 + f + (1 | g)"
    out = fit_many(formula, data, by=["region", "s"], family="binomial")
    assert list(out) == [("north", 0), ("north", 1), ("south", 2), ("south", 3)]
    assert list(out[("north", 1)].fixed["term"]) == ["(Intercept)", "x1", "fb"]
    assert list(out[("north", 0)].fixed["term"]) == ["(Intercept)", "x1", "fb", "fc"]
    for (region, s), res in out.items():
        assert res.optinfo.optimizer == "batched-newton"
        ref = fitting.fit(formula, data[data["s"] == s], "binomial")
        assert_same_fit(res, ref, est=_est_tol(ref))


def test_non_batchable_formula_falls_back_to_fit():
    rng = np.random.default_rng(4)
    parts = []
    for s in range(3):
        d = _stratum(rng, s, "binomial", 10, 15, 30)
        d["h"] = rng.choice(["p", "q", "r", "t"], size=len(d))
        parts.append(d)
    data = pd.concat(parts, ignore_index=True)
    formula = "y ~ x1 + (1 | g) + (1 | h)"
    out = fit_many(formula, data, by="s", family="binomial")
    for (s,), res in out.items():
        ref = fitting.fit(formula, data[data["s"] == s], "binomial")
        assert res.optinfo.optimizer == ref.optinfo.optimizer != "batched-newton"
        np.testing.assert_allclose(np.r_[res.theta, res.beta], np.r_[ref.theta, ref.beta], rtol=0, atol=0)
        assert res.loglik == ref.loglik


@pytest.mark.parametrize("formula", ["y ~ x1 + x2 + (1 + x1 | g)", "y ~ x1 + x2 + (0 + x1 | g)"])
def test_random_slope_strata(formula):
    rng = np.random.default_rng(8)
    data = pd.concat([_stratum(rng, s, "binomial", 25, 20, 40, sd=1.0) for s in range(4)], ignore_index=True)
    out = fit_many(formula, data, by="s", family="binomial")
    for (s,), res in out.items():
        ref = fitting.fit(formula, data[data["s"] == s], "binomial")
        assert res.optinfo.optimizer == "batched-newton"
        assert_same_fit(res, ref, est=_est_tol(ref))
        _assert_same_diagnostics(res, ref, tol=_check_tol(res, ref))


def test_argument_errors_raise_once():
    data = many_strata(n_strata=2, broken=False)
    with pytest.raises(ValueError, match="not in the data"):
        fit_many(FORMULA, data, by="nope", family="binomial")
    with pytest.raises(ValueError, match="max_rows"):
        fit_many(FORMULA, data, by="s", family="binomial", max_rows=0)
    with pytest.raises(FittingError):
        fit_many(FORMULA, data, by="s", family="binomal")
    with pytest.raises(ValueError, match="control"):
        fit_many(FORMULA, data, by="s", family="binomial", control={"bogus": 1})
    assert fit_many(FORMULA, data.iloc[:0], by="s", family="binomial") == {}


# ------------------------------------------------------------- the numerics alone
@pytest.mark.parametrize("family,link,formula", [
    ("binomial", None, FORMULA), ("binomial", "probit", FORMULA), ("binomial", "cloglog", FORMULA),
    ("poisson", None, FORMULA), ("binomial", None, "y ~ x1 + x2 + (1 + x1 | g)"),
    ("poisson", None, "y ~ x1 + x2 + (1 + x1 | g)"),
])
def test_batched_laplace_matches_glmm_and_finite_differences(family, link, formula):
    data = many_strata(family, n_strata=3, seed=9, broken=False)
    fam = get_family(family, link)
    designs = [build_design(formula, data[data["s"] == s], family) for s in sorted(data["s"].unique())]
    kern = row_kernel(fam)
    st = stack_designs(designs, kern)
    k = st.k
    nt = k * (k + 1) // 2
    rng = np.random.default_rng(0)
    theta = np.tile([0.8, 0.3, 0.5][:nt] if nt == 3 else [0.8], (st.S, 1))
    beta = rng.normal(0, 0.3, size=(st.S, st.p))
    ev = evaluate(st, kern, theta, beta)
    assert ev.ok.all()
    for s, d in enumerate(designs):
        m = GlmmModel(build_structure(d.re_terms, d.nobs), d.X, make_response(d.y, d.weights, d.offset, fam))
        ref = laplace(m, theta[s], beta[s], tol=1e-22, maxit=200)
        assert abs(ev.f[s] - ref.deviance) < 1e-8
        np.testing.assert_allclose(ev.g[s], ref.gradient, atol=1e-7 * max(1.0, np.abs(ref.gradient).max()))
        z = np.r_[theta[s], beta[s]]
        Hfd = np.empty((z.size, z.size))
        for j in range(z.size):
            e = np.zeros(z.size)
            e[j] = 1e-5
            gp = laplace(m, (z + e)[:nt], (z + e)[nt:], ref.pirls.u, tol=1e-22, maxit=200).gradient
            gm = laplace(m, (z - e)[:nt], (z - e)[nt:], ref.pirls.u, tol=1e-22, maxit=200).gradient
            Hfd[:, j] = (gp - gm) / 2e-5
        np.testing.assert_allclose(ev.H[s], Hfd, atol=1e-6 * np.abs(Hfd).max())


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_fast_kernels_equal_the_family_methods(family):
    fam = get_family(family)
    rng = np.random.default_rng(2)
    n = 2000
    eta = rng.normal(0, 3, n)
    if family == "binomial":
        w = rng.integers(1, 5, n).astype(float)
        y = rng.binomial(w.astype(int), 0.4) / w
    else:
        w = np.ones(n)
        y = rng.poisson(3.0, n).astype(float)
    fast, slow = row_kernel(fam), GenericKernel(fam)
    assert type(fast) is not GenericKernel
    c_fast, c_slow = fast.deviance_const(y, w), slow.deviance_const(y, w)
    for a, b in zip(fast.basic(eta, y, w, c_fast)[:3], slow.basic(eta, y, w, c_slow)[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    for a, b in zip(fast.higher(eta, y, w), slow.higher(eta, y, w)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    const = make_response(y, w, np.zeros(n), fam).const
    assert abs(fast.loglik_const(y, w).sum() - const) < 1e-8 * max(1.0, abs(const))


def test_se_rx_matches_fit():
    data = many_strata(n_strata=4, seed=6, broken=False)
    out = fit_many(FORMULA, data, by="s", family="binomial", control={"se": "rx"})
    for (s,), res in out.items():
        ref = fitting.fit(FORMULA, data[data["s"] == s], "binomial", control={"se": "rx"})
        assert res.optinfo.optimizer == "batched-newton" and res.diagnostics.hessian_pd is None
        assert_same_fit(res, ref, est=_est_tol(ref), se=1e-5)


@pytest.mark.parametrize("family,link,formula", [
    ("binomial", None, FORMULA), ("binomial", "probit", FORMULA), ("poisson", None, FORMULA),
    ("poisson", None, "y ~ x1 + x2 + (0 + x1 | g)"),
])
def test_scalar_fast_path_equals_general_path(family, link, formula):
    from fitting.batch_laplace import evaluate_general
    from fitting.batch_scalar import evaluate_scalar

    data = many_strata(family, n_strata=4, seed=12, broken=False)
    fam = get_family(family, link)
    designs = [build_design(formula, data[data["s"] == s], family) for s in sorted(data["s"].unique())]
    kern = row_kernel(fam)
    st = stack_designs(designs, kern)
    theta = np.full((st.S, 1), 0.9)
    beta = np.random.default_rng(1).normal(0, 0.3, size=(st.S, st.p))
    a = evaluate_scalar(st, kern, theta, beta, tol=1e-12, maxit=100)
    b = evaluate_general(st, kern, theta, beta, tol=1e-12, maxit=100)
    np.testing.assert_allclose(a.f, b.f, rtol=1e-12)
    np.testing.assert_allclose(a.g, b.g, atol=1e-8)
    np.testing.assert_allclose(a.H, b.H, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(a.du, b.du, atol=1e-8)
    np.testing.assert_allclose(a.u, b.u, atol=1e-9)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_fast_kernels_with_unit_weights(family):
    fam = get_family(family)
    rng = np.random.default_rng(4)
    eta = rng.normal(0, 2, 500)
    y = (rng.random(500) < 0.5).astype(float) if family == "binomial" else rng.poisson(2.0, 500).astype(float)
    kern = row_kernel(fam)
    ones = np.ones_like(y)
    c = kern.deviance_const(y, ones)
    full = kern.basic(eta, y, ones, c)
    lean = kern.basic(eta, y, None, c if np.any(c) else None)
    for a, b in zip(full[:3], lean[:3]):
        np.testing.assert_allclose(a, b, rtol=1e-14)
    for a, b in zip(kern.higher(eta, y, ones), kern.higher(eta, y, None)):
        np.testing.assert_allclose(a, b, rtol=1e-14)


def test_counts_weights_and_offsets_match_fit():
    rng = np.random.default_rng(21)
    parts = []
    for s in range(3):
        d = _stratum(rng, s, "binomial", 15, 3, 8)
        d["n"] = rng.integers(1, 12, len(d)).astype(float)
        d["k"] = rng.binomial(d["n"].astype(int), 1 / (1 + np.exp(-(0.3 * d["x1"] - 0.2)))).astype(float)
        d["expo"] = np.log(rng.uniform(0.5, 2.0, len(d)))
        d["cnt"] = rng.poisson(np.exp(0.5 + 0.4 * d["x1"] + d["expo"])).astype(float)
        parts.append(d)
    data = pd.concat(parts, ignore_index=True)
    cases = [("cbind(k, n - k) ~ x1 + x2 + (1 | g)", "binomial", {}),
             ("cnt ~ x1 + (1 | g)", "poisson", {"offset": "expo"}),
             ("cnt ~ x1 + offset(expo) + (1 | g)", "poisson", {"weights": np.full(len(data), 2.0)})]
    for formula, family, kw in cases:
        out = fit_many(formula, data, by="s", family=family, **kw)
        for (s,), res in out.items():
            rows = (data["s"] == s).to_numpy()
            kw1 = {k: (v[rows] if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
            ref = fitting.fit(formula, data[rows], family, **kw1)
            assert res.optinfo.optimizer == "batched-newton", (formula, s)
            assert_same_fit(res, ref, est=_est_tol(ref))
            _assert_same_diagnostics(res, ref, tol=_check_tol(res, ref))


# ------------------------------------------------------- post-fit checks (glmm_checks)
def _assert_same_tree(a, b, path="", tol=1e-6):
    """Equal JSON trees: floats within ``tol``, everything else exactly."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), (path, a, b)
        for key in a:
            _assert_same_tree(a[key], b[key], f"{path}.{key}", tol)
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{path}[{i}]", tol)
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, (int, float)) and abs(a - b) <= tol, (path, a, b)
    else:
        assert a == b, (path, a, b)


def _check_tol(res, ref):
    """1e-6 plus the first-order effect of fit's distance from the optimum (see below)."""
    return 1e-6 + 0.1 * float(np.abs(np.r_[res.theta - ref.theta, res.beta - ref.beta]).max())


#: Diagnostics keys that are facts of the optimiser, not of the post-fit checks: fit's
#: BFGS stops at |grad| ~1e-5, the batched Newton at ~1e-10 (compared in assert_same_fit)
_OPTIMIZER_KEYS = ("max_grad",)


def _assert_same_diagnostics(res, ref, tol=1e-6):
    got, want = res.diagnostics.to_dict(), ref.diagnostics.to_dict()
    for key in _OPTIMIZER_KEYS:
        got.pop(key), want.pop(key)
    assert set(got) == set(want)
    for key in want:  # key by key, so that a failure names the field
        _assert_same_tree(got[key], want[key], key, tol)


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_fit_many_diagnostics_equal_fit(family, binomial_data, binomial_fits):
    if family == "binomial":
        data, out = binomial_data, binomial_fits
    else:
        data = many_strata("poisson", n_strata=12, seed=5)
        out = fit_many(FORMULA, data, by="s", family="poisson")
    n_batched = n_checked = 0
    for key, res in out.items():
        ref = _fit_alone(data, key, family=family)
        if isinstance(ref, FittingError):
            continue
        n_batched += res.optinfo.optimizer == "batched-newton"
        d = res.diagnostics
        assert d.laplace_adequacy is not None and d.degenerate_groups is not None and not d.penalized
        assert "checks_elapsed" in res.optinfo.extra
        _assert_same_diagnostics(res, ref)
        n_checked += 1
    assert n_batched >= 12 and n_checked >= n_batched


def test_fit_many_diagnostics_flags_and_warnings_equal_fit():
    """Strata that trip the checks: Laplace inadequate (few rows per group, large sd) and
    most groups degenerate (rare outcome); the warnings must be fit's, text and order.

    On these nearly flat deviances fit's BFGS stops up to ~3e-4 away from the optimum
    the batched Newton finds (same log-likelihood to 1e-10); the AGQ log-likelihood is
    not stationary there and moves by ~0.03x that gap. So the batched check is compared
    with fit's own check code at the batched estimates to 1e-6, and with fit's report to
    1e-6 plus that first-order effect.
    """
    rng = np.random.default_rng(31)
    parts = []
    for s in range(4):
        d = _stratum(rng, f"a{s}", "binomial", 30, 2, 4, sd=3.0)
        parts.append(d)
    for s in range(3):
        d = _stratum(rng, f"b{s}", "binomial", 25, 3, 8)
        d["y"] = (rng.random(len(d)) < 0.04).astype(float)
        parts.append(d)
    data = pd.concat(parts, ignore_index=True)
    out = fit_many(FORMULA, data, by="s", family="binomial")
    warned = set()
    for key, res in out.items():
        ref = _fit_alone(data, key)
        if isinstance(ref, FittingError):
            assert type(res) is type(ref)
            continue
        _assert_same_diagnostics(res, ref, tol=_check_tol(res, ref))
        if res.optinfo.optimizer == "batched-newton":
            design = build_design(FORMULA, data[data["s"] == key[0]], "binomial")
            direct = check_laplace_at(design, get_family("binomial"), res.theta, res.beta)
            _assert_same_tree(res.diagnostics.to_dict()["laplace_adequacy"], direct, "laplace_adequacy")
        warned.update(w.split(" ")[0] for w in res.diagnostics.warnings)
        if res.optinfo.optimizer == "batched-newton":
            warned.add("batched")
    assert {"AGQ", "batched"} <= warned and any(w[0].isdigit() for w in warned), warned


def test_fit_many_check_controls_are_honoured_like_fit(binomial_data):
    sub = binomial_data[binomial_data["s"].isin(["s00", "s01", "s02"])]
    ctl = {"check_laplace": False, "check_separation": True}
    out = fit_many(FORMULA, sub, by="s", family="binomial", control=ctl)
    for key, res in out.items():
        ref = _fit_alone(sub, key, control=ctl)
        assert res.optinfo.optimizer == "batched-newton"  # honoured by the batched path
        assert res.diagnostics.laplace_adequacy is None and res.diagnostics.separation is not None
        _assert_same_diagnostics(res, ref)


def test_penalized_control_falls_back_to_fit(binomial_data):
    keys = ["s00", "s01", "z4_separated"]
    sub = binomial_data[binomial_data["s"].isin(keys)]
    ctl = {"penalty": "normal"}
    out = fit_many(FORMULA, sub, by="s", family="binomial", control=ctl)
    assert list(out) == [(k,) for k in keys]
    for key, res in out.items():
        ref = _fit_alone(sub, key, control=ctl)
        assert res.optinfo.optimizer == ref.optinfo.optimizer != "batched-newton"
        assert res.method == ref.method == "laplace+penalized" and res.diagnostics.penalized
        np.testing.assert_array_equal(np.r_[res.theta, res.beta], np.r_[ref.theta, ref.beta])
        assert res.diagnostics.to_dict() == ref.diagnostics.to_dict()


@pytest.mark.parametrize("family", ["binomial", "poisson"])
def test_moment_theta_start_stacked_equals_alone_and_nears_the_optimum(family):
    """The batched start of fit_many is the one fit() uses (same per-stratum values
    whatever the stack), and lands nearer the estimate than the fixed 0.5."""
    from fitting.batch_newton import glm_start, moment_theta

    data = many_strata(family, n_strata=6, broken=False)
    fam = get_family(family)
    kern = row_kernel(fam)
    designs = [build_design(FORMULA, data[data["s"] == key].reset_index(drop=True), fam)
               for key in sorted(data["s"].unique())]
    st = stack_designs(designs, kern)
    beta = glm_start(st, kern, maxit=3)
    together = moment_theta(st, kern, beta, 0.5)
    for i, d in enumerate(designs):
        one = stack_designs([d], kern)
        alone = moment_theta(one, kern, glm_start(one, kern, maxit=3), 0.5)
        assert alone[0] == pytest.approx(together[i], rel=1e-12)
    fits = fit_many(FORMULA, data, by="s", family=family)
    est = np.array([fits[key].theta[0] for key in sorted(fits)])
    assert np.mean(np.abs(together - est)) < np.mean(np.abs(0.5 - est))
    assert np.all((together >= 0.1) & (together <= 10.0))

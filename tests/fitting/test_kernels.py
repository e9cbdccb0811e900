"""Compiled kernels (fitting.kernels) against their numpy twins, and fits with either."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest

import fitting
from fitting import group_kernels, kernels, linalg
from fitting.families import get_family
from fitting.frame import build_design
from fitting.response import make_response
from fitting.structure import build_structure



#: for the tests of compiled kernels that have no numpy twin of their own (they return
#: None when switched off): they run wherever numba is in use, as in CI
needs_numba = pytest.mark.skipif(not kernels.enabled(),
                                 reason="numba kernels switched off (STRATAFIT_NUMBA=0) or numba missing")


@contextmanager
def numpy_twins():
    """Run the block with the numpy twins of the kernels."""
    saved = kernels._jit()
    kernels._compiled = False
    try:
        yield
    finally:
        kernels._compiled = saved


def _frame(seed, n=900, na=40, nb=7, slope=False):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, na, n)
    b = rng.integers(0, nb, n)
    x = rng.normal(size=n)
    eta = -0.2 + 0.6 * x + rng.normal(0, 0.9, na)[a] * (1 + 0.5 * x * slope) + rng.normal(0, 0.5, nb)[b]
    return pd.DataFrame({
        "y": rng.binomial(1, 1 / (1 + np.exp(-eta))),
        "k": rng.binomial(6, 1 / (1 + np.exp(-eta))),
        "x": x,
        "a": pd.Categorical([f"a{i}" for i in a]),
        "b": pd.Categorical([f"b{i}" for i in b]),
    })


LAYOUTS = {
    "crossed": "y ~ x + (1 | a) + (1 | b)",  # K = 2, dense rest, k1 = 1
    "vector": "y ~ x + (x | a) + (1 | b)",  # K = 3, dense rest, k1 = 2
    "nested": "y ~ x + (1 | b/a)",  # K = 2, a:b leading
}


def _pieces(formula, seed=3):
    df = _frame(seed, slope="(x |" in formula)
    des = build_design(formula, df, "binomial", weights=None, offset=None, na_action="error")
    st = build_structure(des.re_terms, des.nobs)
    rng = np.random.default_rng(seed)
    theta = np.where(st.diag_theta, 0.8, 0.2)
    V = st.zlambda(theta)
    u = rng.normal(0, 0.7, st.q)
    W = rng.uniform(0.05, 0.25, st.n)
    return st, V, u, W, des


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_structure_products_match_numpy(layout):
    st, V, u, W, _ = _pieces(LAYOUTS[layout])
    assert st.K > 1
    v = np.random.default_rng(1).normal(size=st.n)
    M = np.asfortranarray(np.random.default_rng(2).normal(size=(st.n, 3)))  # as W[:, None] * X
    got = (st.z_times(V, u), st.zt_times(V, v), linalg.weighted_buffer(st, V, W),
           st.zt_times_matrix(V, M))
    with numpy_twins():
        want = (st.z_times(V, u), st.zt_times(V, v), linalg.weighted_buffer(st, V, W),
                st.zt_times_matrix(V, M))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-13, atol=1e-13)
    # and against dense Z Λ
    ZL = np.zeros((st.n, st.q))
    np.add.at(ZL, (np.repeat(np.arange(st.n), st.K), st.col_index.ravel()), V.ravel())
    np.testing.assert_allclose(got[0], ZL @ u, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[1], ZL.T @ v, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got[3], ZL.T @ M, rtol=1e-12, atol=1e-12)
    assert got[3].shape == (st.q, 3) and st.zt_times_matrix(V, M[:, :0]).shape == (st.q, 0)


def test_one_term_zt_times_matrix_matches_dense():
    st, V, _, _, _ = _pieces("y ~ x + (1 | a)")  # K = 1: bincounts, no kernel
    assert st.K == 1
    M = np.asfortranarray(np.random.default_rng(4).normal(size=(st.n, 3)))
    ZL = np.zeros((st.n, st.q))
    ZL[np.arange(st.n), st.col_index[:, 0]] = V[:, 0]
    np.testing.assert_allclose(st.zt_times_matrix(V, M), ZL.T @ M, rtol=1e-12, atol=1e-12)
    assert st.zt_times_matrix(V, M[:, :0]).shape == (st.q, 0)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_factor_and_inverse_match_numpy_and_dense(layout):
    st, V, u, W, _ = _pieces(LAYOUTS[layout])
    fac = linalg.factorize(st, V, W)
    buf = linalg.inverse_buffer(st, fac)
    Y, quad = kernels.own_products(V, buf, st.gather_tgt_t)
    with numpy_twins():
        fac0 = linalg.factorize(st, V, W)
        buf0 = linalg.inverse_buffer(st, fac0)
        Y0, quad0 = kernels.own_products(V, buf0, st.gather_tgt_t)
    assert fac.logdet == pytest.approx(fac0.logdet, rel=1e-13)
    np.testing.assert_allclose(buf, buf0, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(Y, Y0, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(quad, quad0, rtol=1e-11, atol=1e-13)
    ZL = np.zeros((st.n, st.q))
    np.add.at(ZL, (np.repeat(np.arange(st.n), st.K), st.col_index.ravel()), V.ravel())
    A = ZL.T @ (W[:, None] * ZL) + np.eye(st.q)
    Ainv = np.linalg.inv(A)
    assert fac.logdet == pytest.approx(np.linalg.slogdet(A)[1], rel=1e-12)
    np.testing.assert_allclose(quad, np.einsum("iq,qr,ir->i", ZL, Ainv, ZL), rtol=1e-10)
    b = np.random.default_rng(2).normal(size=st.q)
    np.testing.assert_allclose(linalg.solve_A(st, fac, b), Ainv @ b, rtol=1e-10, atol=1e-12)
    B = np.random.default_rng(3).normal(size=(st.q, 3))  # several right-hand sides (Jacobians)
    np.testing.assert_allclose(linalg.solve_A(st, fac, B), Ainv @ B, rtol=1e-10, atol=1e-12)
    with numpy_twins():
        np.testing.assert_allclose(linalg.solve_A(st, fac0, B), Ainv @ B, rtol=1e-10, atol=1e-12)


def test_factor_reports_a_schur_complement_that_is_not_positive_definite():
    st, V, u, W, _ = _pieces(LAYOUTS["crossed"])
    lv = st.level
    buf = linalg.weighted_buffer(st, V, W).copy()
    buf[lv.off_rest] = -100.0  # the first diagonal entry of the rest block
    with pytest.raises(linalg.NotPositiveDefinite, match="Schur complement"):
        linalg._factor_level(lv, buf)
    with numpy_twins(), pytest.raises(linalg.NotPositiveDefinite, match="Schur complement"):
        linalg._factor_level(lv, buf)


def test_factor_reports_a_non_positive_leading_block():
    st, V, u, W, _ = _pieces(LAYOUTS["crossed"])
    W = W.copy()
    W[st.col_index[:, 0] == 0] = -50.0  # the first leading block 1 + Σ W v² < 0
    with pytest.raises(linalg.NotPositiveDefinite, match="diagonal block"):
        linalg.factorize(st, V, W)


def test_gradient_rows_match_numpy():
    st, V, u, W, _ = _pieces(LAYOUTS["vector"])
    rng = np.random.default_rng(5)
    x = rng.normal(size=st.q)
    d1, c, D2 = rng.normal(size=(3, st.n))
    Y = rng.normal(size=(st.K, st.n))
    s, M = kernels.gradient_rows(V, st.col_index_t, u, x, d1, c, D2, W, Y)
    with numpy_twins():
        s0, M0 = kernels.gradient_rows(V, st.col_index_t, u, x, d1, c, D2, W, Y)
    np.testing.assert_allclose(s, s0, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(M, M0, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("weighted", [False, True])
def test_logit_response_matches_the_numpy_response(weighted):
    rng = np.random.default_rng(11)
    n = 2000  # several blocks of the Σ log product, and a partial one
    eta = np.concatenate([rng.normal(0, 3, n - 4), [0.0, -745.0, 40.0, -40.0]])
    size = rng.integers(1, 9, n) if weighted else np.ones(n)
    y = rng.binomial(size.astype(int), 0.4) / size
    fam = get_family("binomial", None)
    fused = make_response(y, size, np.zeros(n), fam, fused=True).evaluate(eta)
    plain = make_response(y, size, np.zeros(n), fam).evaluate(eta)
    for name in ("mu", "var", "W"):
        np.testing.assert_allclose(getattr(fused, name), getattr(plain, name), rtol=1e-14, atol=1e-300)
    assert fused.dev == pytest.approx(plain.dev, rel=1e-12)
    with numpy_twins():
        twin = make_response(y, size, np.zeros(n), fam, fused=True).evaluate(eta)
    assert twin.dev == pytest.approx(plain.dev, rel=1e-12)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fit_is_the_same_with_either_kernels(layout):
    df = _frame(8, slope="(x |" in LAYOUTS[layout])
    res = fitting.fit(LAYOUTS[layout], df, family="binomial")
    with numpy_twins():
        ref = fitting.fit(LAYOUTS[layout], df, family="binomial")
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-8)
    np.testing.assert_allclose(res.fixed["estimate"], ref.fixed["estimate"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(res.fixed["std_error"], ref.fixed["std_error"], rtol=1e-5)
    np.testing.assert_allclose(res.theta, ref.theta, rtol=1e-5, atol=1e-7)


def test_binomial_totals_fit_is_the_same_with_either_kernels():
    df = _frame(9)
    df["n"] = 6
    res = fitting.fit("cbind(k, n - k) ~ x + (1 | a) + (1 | b)", df, family="binomial")
    with numpy_twins():
        ref = fitting.fit("cbind(k, n - k) ~ x + (1 | a) + (1 | b)", df, family="binomial")
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-8)
    np.testing.assert_allclose(res.fixed["std_error"], ref.fixed["std_error"], rtol=1e-5)


def test_exp_neg_abs_is_within_an_ulp_of_numpy():
    x = np.linspace(-700.0, 700.0, 400_001)
    ref = np.exp(-np.abs(x))
    got = kernels.exp_neg_abs(x)
    ulps = np.abs(got - ref) / np.spacing(ref)
    assert ulps.max() <= 1.0  # within one unit in the last place of numpy's value
    assert np.all(got[x == 0.0] == 1.0)
    odd = kernels.exp_neg_abs(np.array([np.nan, 701.0, -800.0, np.inf, -0.0]))
    assert np.isnan(odd[0])
    np.testing.assert_array_equal(odd[1:4], np.exp(-700.0))  # clamped: a normal number, not 0
    assert odd[4] == 1.0
    with numpy_twins():
        twin = kernels.exp_neg_abs(np.array([np.nan, 701.0, 3.0]))
    assert np.isnan(twin[0]) and twin[1] == np.exp(-700.0) and twin[2] == np.exp(-3.0)


def _groups(seed, k, G=25):
    rng = np.random.default_rng(seed)
    gsize = rng.integers(1, 40, G)
    gstart = np.concatenate(([0], np.cumsum(gsize)[:-1])).astype(np.int64)
    N = int(gsize.sum())
    V = rng.normal(size=(k, N))
    return rng, gstart, gsize.astype(np.int64), V, N


@needs_numba
@pytest.mark.parametrize("k", [2, 3])
def test_group_kernels_match_dense_algebra(k):
    rng, gstart, gsize, V, N = _groups(5 + k, k)
    G = gstart.size
    base = rng.normal(size=N)
    u = rng.normal(0, 0.8, (G, k))
    W = rng.uniform(0.01, 0.25, N)
    sc = rng.normal(0, 0.3, N)
    rows = np.repeat(np.arange(G), gsize)
    u[3] = V[:, rows == 3] @ sc[rows == 3]  # a group at its mode: δ = 0
    eta = group_kernels.group_eta(base, V, u, gstart, gsize)
    np.testing.assert_allclose(eta, base + (V * u[rows].T).sum(axis=0), rtol=1e-14, atol=1e-14)
    tol = 1e-3
    A, Ainv, delta, small = group_kernels.group_step(W, sc, V, u, gstart, gsize, tol)
    for g in range(G):
        r = rows == g
        Ag = np.eye(k) + (V[:, r] * W[r]) @ V[:, r].T
        np.testing.assert_allclose(A[g], Ag, rtol=1e-13)
        np.testing.assert_allclose(Ainv[g], np.linalg.inv(Ag), rtol=1e-11, atol=1e-13)
        dg = np.linalg.solve(Ag, V[:, r] @ sc[r] - u[g])
        np.testing.assert_allclose(delta[g], dg, rtol=1e-11, atol=1e-13)
        assert small[g] == (np.abs(dg).max() <= tol * (1.0 + np.abs(u[g]).max()))
    assert small.any() and not small.all()  # both outcomes are exercised


@needs_numba
def test_group_step_marks_a_non_finite_block():
    rng, gstart, gsize, V, N = _groups(2, 2, G=4)
    W = np.full(N, 0.1)
    W[gstart[2]] = np.nan
    A, Ainv, delta, small = group_kernels.group_step(W, np.zeros(N), V, np.zeros((4, 2)), gstart, gsize, 1e-8)
    assert np.isnan(Ainv[2]).all() and np.isnan(delta[2]).all() and not small[2]
    assert np.isfinite(Ainv[[0, 1, 3]]).all() and small[[0, 1, 3]].all()


def test_group_kernels_are_none_without_numba():
    rng, gstart, gsize, V, N = _groups(1, 2, G=3)
    with numpy_twins():
        assert group_kernels.group_eta(np.zeros(N), V, np.zeros((3, 2)), gstart, gsize) is None
        assert group_kernels.group_step(np.ones(N), np.zeros(N), V, np.zeros((3, 2)), gstart, gsize, 1e-8) is None


@pytest.mark.parametrize("family,link,term", [
    ("binomial", None, "(x | a)"), ("poisson", None, "(x | a)"),
    ("binomial", "probit", "(x | a)"),  # not canonical: H_u⁻¹ is not A⁻¹/2
    ("binomial", None, "(x + z | a)"),  # k = 3
])
def test_vector_term_batch_evaluation_is_the_same_with_either_path(family, link, term):
    # fitting.batch_laplace.evaluate_general through group_eta, group_step and
    # group_derivatives, or numpy; three strata stacked
    from fitting.batch_kernels import row_kernel
    from fitting.batch_laplace import evaluate_general
    from fitting.batch_stack import stack_designs

    designs = []
    for seed in range(3):
        df = _frame(20 + seed, n=500, na=15, slope=True)
        df["z"] = np.random.default_rng(seed).normal(size=len(df))
        if family == "poisson":
            df["y"] = np.random.default_rng(seed).poisson(np.exp(0.3 + 0.4 * df["x"]))
        designs.append(build_design(f"y ~ x + z + {term}", df, family, weights=None,
                                    offset=None, na_action="error"))
    kern = row_kernel(get_family(family, link))
    st = stack_designs(designs, kern)
    nt = st.k * (st.k + 1) // 2
    theta = np.tile(np.where(np.arange(nt) % (st.k + 1) == 0, 0.8, 0.15)[:nt], (st.S, 1))
    beta = np.random.default_rng(1).normal(0, 0.3, size=(st.S, st.p))
    for order in (1, 2):
        a = evaluate_general(st, kern, theta, beta, order=order)
        with numpy_twins():
            b = evaluate_general(st, kern, theta, beta, order=order)
        assert a.ok.all() and b.ok.all()
        np.testing.assert_array_equal(a.iterations, b.iterations)
        np.testing.assert_allclose(a.f, b.f, rtol=1e-13)
        np.testing.assert_allclose(a.u, b.u, atol=1e-10)
        np.testing.assert_allclose(a.g, b.g, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(a.du, b.du, rtol=1e-9, atol=1e-9)
        if order == 2:
            np.testing.assert_allclose(a.H, b.H, rtol=1e-9, atol=1e-9)
        else:
            assert a.H is None and b.H is None


def test_vector_term_fit_is_the_same_with_either_path():
    df = _frame(31, slope=True)
    res = fitting.fit("y ~ x + (x | a)", df, family="binomial")
    with numpy_twins():
        ref = fitting.fit("y ~ x + (x | a)", df, family="binomial")
    assert res.optinfo.optimizer == ref.optinfo.optimizer
    assert res.loglik == pytest.approx(ref.loglik, abs=1e-9)
    np.testing.assert_allclose(res.theta, ref.theta, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(res.fixed["std_error"], ref.fixed["std_error"], rtol=1e-6)


@needs_numba
def test_warm_compiles_what_a_fit_uses():
    counts = kernels.warm()
    used = {"z_times", "zt_times", "zt_times_matrix", "weighted_buffer", "logit_finish", "own_products",
            "gradient_rows", "factor_dense1", "inverse_dense1", "exp_neg_abs",
            "group_eta", "group_step", "group_derivatives"}
    assert used <= set(counts)
    assert all(counts[name] >= 1 for name in used)


def _kernels_state(env: dict) -> str:
    code = ("import fitting.kernels as k; import sys; "
            "print(k.enabled(), 'numba' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_switch_off_by_environment_and_lazy_import():
    import os

    env = dict(os.environ)
    env["STRATAFIT_NUMBA"] = "0"
    assert _kernels_state(env) == "False False"
    env["STRATAFIT_NUMBA"] = "1"
    assert _kernels_state(env) == "True True"


def test_one_term_fit_does_not_import_numba():
    # a (1 | g) model never needs the kernels: worker processes do not pay numba's import
    code = ("import sys, numpy as np, pandas as pd, fitting\n"
            "rng = np.random.default_rng(0)\n"
            "g = rng.integers(0, 20, 400)\n"
            "df = pd.DataFrame({'y': rng.binomial(1, 0.4, 400), 'x': rng.normal(size=400),"
            " 'g': [f'g{i}' for i in g]})\n"
            "fitting.fit('y ~ x + (1 | g)', df, family='binomial')\n"
            "print('numba' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

"""Blocked Cholesky (fitting.linalg) against dense numpy on random designs."""
from __future__ import annotations

import numpy as np
import pytest

from fitting import linalg
from fitting.design import ReTerm
from fitting.structure import build_structure


def random_terms(rng, n, spec):
    """spec: list of (n_levels, k)."""
    terms = []
    for t, (m, k) in enumerate(spec):
        codes = rng.integers(0, m, size=n)
        codes[:m] = rng.permutation(m)  # every level present
        Z = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(k - 1)])
        terms.append(ReTerm(group=f"g{t}", levels=tuple(str(i) for i in range(m)), codes=codes,
                            term_names=("(Intercept)",) + tuple(f"x{j}" for j in range(1, k)), Z=Z))
    return tuple(terms)


def dense_parts(struct, theta):
    n, q = struct.n, struct.q
    Z = np.zeros((n, q))
    Lam = np.zeros((q, q))
    for t, lam in zip(struct.terms, struct.lambdas(theta)):
        for j in range(t.k):
            Z[np.arange(n), t.offset + t.codes * t.k + j] = t.Z[:, j]
        for g in range(t.m):
            s = t.offset + g * t.k
            Lam[s:s + t.k, s:s + t.k] = lam
    return Z, Lam


SPECS = [
    [(7, 1)],
    [(9, 2)],
    [(5, 3)],
    [(12, 1), (5, 1)],
    [(10, 2), (4, 1)],
    [(11, 1), (6, 2)],
    [(30, 1), (8, 1), (3, 1)],
    [(15, 2), (6, 2), (3, 1)],
]


def nested_terms(rng, n, ks, partial=False):
    """Row-level factor ⊂ groups ⊂ supergroups (``partial``: a few groups span two supergroups)."""
    obs = np.arange(n)
    grp = obs // 5
    sup = grp // 3
    if partial:
        sup = sup.copy()
        sup[::17] = (sup[::17] + 1) % (sup.max() + 1)
    terms = []
    for name, codes, k in zip(("obs", "grp", "sup"), (obs, grp, sup), ks):
        m = int(codes.max()) + 1
        Z = np.column_stack([np.ones(n)] + [rng.normal(size=n) for _ in range(k - 1)])
        terms.append(ReTerm(group=name, levels=tuple(str(i) for i in range(m)), codes=codes,
                            term_names=("(Intercept)",) + tuple(f"x{j}" for j in range(1, k)), Z=Z))
    return tuple(terms)


NESTED = [((1, 1, 1), False), ((1, 2, 1), False), ((1, 1, 2), False), ((1, 1, 1), True), ((1, 2, 2), True)]


@pytest.mark.parametrize("ks,partial", NESTED)
def test_nested_factor_matches_dense(ks, partial):
    rng = np.random.default_rng(sum(ks) + 10 * partial)
    terms = nested_terms(rng, 60, ks, partial)
    struct = build_structure(terms, 60)
    assert struct.level.sub is not None  # the Schur complement keeps a block-diagonal leading term
    _check_against_dense(struct, rng)


@pytest.mark.parametrize("spec", SPECS)
def test_factor_matches_dense(spec):
    rng = np.random.default_rng(len(spec) * 100 + sum(m * k for m, k in spec))
    n = 60
    terms = random_terms(rng, n, spec)
    struct = build_structure(terms, n)
    _check_against_dense(struct, rng)


@pytest.mark.parametrize("spec", [s for s in SPECS if len(s) > 1])
def test_dense_and_pair_fill_paths_match_dense(spec, monkeypatch):
    """Crossed terms: the BLAS fill of a dense Schur complement (small problems) and the
    pair-of-pairs fill (forced here, the path of large sparse problems) both match numpy."""
    import fitting.structure as S

    rng = np.random.default_rng(7 + len(spec))
    terms = random_terms(rng, 60, spec)
    dense = build_structure(terms, 60)
    assert dense.level.dense
    monkeypatch.setattr(S, "_DENSE_L21_MAX", 0)
    pairs = build_structure(terms, 60)
    assert not pairs.level.dense
    _check_against_dense(pairs, np.random.default_rng(3))
    _check_against_dense(dense, np.random.default_rng(3))


def _check_against_dense(struct, rng):
    n = struct.n
    theta = rng.normal(size=struct.ntheta)
    theta[struct.diag_theta] = np.abs(theta[struct.diag_theta]) + 0.3
    V = struct.zlambda(theta)
    W = rng.uniform(0.2, 2.0, size=n)
    Z, Lam = dense_parts(struct, theta)
    ZL = Z @ Lam
    A = ZL.T @ (W[:, None] * ZL) + np.eye(struct.q)
    fac = linalg.factorize(struct, V, W)
    assert fac.logdet == pytest.approx(np.linalg.slogdet(A)[1], rel=1e-12, abs=1e-10)
    b = rng.normal(size=(struct.q, 3))
    Ld = np.linalg.cholesky(A)
    np.testing.assert_allclose(linalg.solve_L(struct, fac, b), np.linalg.solve(Ld, b), atol=1e-10)
    np.testing.assert_allclose(linalg.solve_Lt(struct, fac, b), np.linalg.solve(Ld.T, b), atol=1e-10)
    np.testing.assert_allclose(linalg.solve_A(struct, fac, b[:, 0]), np.linalg.solve(A, b[:, 0]), atol=1e-10)
    # products with Z Lambda
    u = rng.normal(size=struct.q)
    np.testing.assert_allclose(struct.z_times(V, u), ZL @ u, atol=1e-12)
    v = rng.normal(size=n)
    np.testing.assert_allclose(struct.zt_times(V, v), ZL.T @ v, atol=1e-12)
    M = rng.normal(size=(n, 4))
    np.testing.assert_allclose(struct.zt_times_matrix(V, M), ZL.T @ M, atol=1e-12)
    # inverse on the pattern
    Ainv = np.linalg.inv(A)
    buf = linalg.inverse_buffer(struct, fac)
    own = linalg.own_inverse(struct, buf)
    ci = struct.col_index
    np.testing.assert_allclose(own, Ainv[ci[:, :, None], ci[:, None, :]], atol=1e-10)
    # A⁻¹ v_i on the own columns (v_i the row of Z Lambda), and v_i'A⁻¹v_i
    Y = linalg.own_products(struct, V, buf)
    AinvZL = Ainv @ ZL.T  # (q, n)
    np.testing.assert_allclose(Y, AinvZL[ci.T, np.arange(n)[None, :]], atol=1e-10)
    np.testing.assert_allclose(np.einsum("ni,in->n", V, Y), np.einsum("nq,qn->n", ZL, AinvZL), atol=1e-10)
    # the weighted buffer is what factorize factors, less the identity
    if struct.K > 1:
        fac2 = linalg._factor_level(struct.level, linalg.weighted_buffer(struct, V, W))
        assert fac2.logdet == pytest.approx(fac.logdet, rel=1e-13)
    for t, blocks in zip(struct.terms, linalg.diag_blocks(struct, buf)):
        for g in range(t.m):
            s = t.offset + g * t.k
            np.testing.assert_allclose(blocks[g], Ainv[s:s + t.k, s:s + t.k], atol=1e-10)
    # fixed blocks
    X = np.column_stack([np.ones(n), rng.normal(size=(n, 2))])
    fb = linalg.fixed_blocks(struct, fac, V, W, X)
    full = np.block([[A, ZL.T @ (W[:, None] * X)], [X.T @ (W[:, None] * ZL), X.T @ (W[:, None] * X)]])
    Lf = np.linalg.cholesky(full)
    np.testing.assert_allclose(fb.RZX, Lf[struct.q:, :struct.q].T, atol=1e-10)
    np.testing.assert_allclose(fb.R, Lf[struct.q:, struct.q:].T, atol=1e-10)


def test_term_order_and_theta_names():
    rng = np.random.default_rng(1)
    terms = random_terms(rng, 40, [(3, 1), (10, 2), (5, 1)])
    struct = build_structure(terms, 40)
    assert [t.group for t in struct.terms] == ["g1", "g2", "g0"]
    assert struct.theta_names == ("g1.(Intercept)", "g1.x1.(Intercept)", "g1.x1", "g2.(Intercept)", "g0.(Intercept)")
    assert list(struct.theta_lower) == [0.0, -np.inf, 0.0, 0.0, 0.0]


def test_not_positive_definite():
    rng = np.random.default_rng(2)
    terms = random_terms(rng, 30, [(6, 1), (3, 1)])
    struct = build_structure(terms, 30)
    V = struct.zlambda(np.array([1.0, 1.0]))
    with pytest.raises(linalg.NotPositiveDefinite):
        linalg.factorize(struct, V, -10.0 * np.ones(30))

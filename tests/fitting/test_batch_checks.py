"""Laplace adequacy at the fit's modes (fitting.batch_checks.changes_at) against fitting.agq."""
from __future__ import annotations

import pytest

import fitting

from . import _designs as D


def test_vector_term_adequacy_from_the_fit_equals_the_mode_search():
    # the fit's check (fitting.batch_checks.changes_at at its exact modes, several quadrature
    # nodes per kernel call) against fitting.agq's own mode search at the same estimates
    from fitting.families import get_family
    from fitting.frame import build_design
    from fitting.glmm_checks import check_laplace_at

    df = D.load("Contraception")
    f = "use ~ age + I(age^2) + urban + livch + (urban | district)"
    res = fitting.fit(f, df, family="binomial")
    fast = res.diagnostics.to_dict()["laplace_adequacy"]
    design = build_design(f, df, "binomial")
    slow = check_laplace_at(design, get_family("binomial"), res.theta, res.beta)
    assert fast["nagq"] == slow["nagq"]
    assert fast["loglik_agq"] == pytest.approx(slow["loglik_agq"], abs=1e-6)
    assert fast["difference"] == pytest.approx(slow["difference"], abs=1e-6)
    assert fast["worst_groups"] == slow["worst_groups"]

"""FitResult / exception → StratumResult (:mod:`service.convert`), on real fits."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fitting
from fitting.errors import DataError
from service.convert import (
    FAILED,
    NOT_CONVERGED,
    SUCCEEDED,
    jsonable,
    to_stratum_result,
)
from storage.records import table_rows
from storage.rows import (
    COEFFICIENT_COLUMNS,
    FIT_COLUMNS,
    RANEF_COLUMNS,
    VARIANCE_COLUMNS,
    prepare_results,
)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def cbpp():
    return pd.read_parquet(FIXTURES / "cbpp.parquet")


@pytest.fixture(scope="module")
def sleepstudy():
    return pd.read_parquet(FIXTURES / "sleepstudy.parquet")


@pytest.fixture(scope="module")
def glmm(cbpp):
    return fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp,
                       family="binomial")


def _strict_json(value) -> str:
    return json.dumps(value, allow_nan=False)


def test_converged_fit(glmm):
    r = to_stratum_result("herdset=a", glmm, store_random_effects=True)
    assert r.status == SUCCEEDED and r.key == "herdset=a"
    assert set(r.fit) <= set(FIT_COLUMNS)
    assert r.fit["nobs"] == glmm.nobs and r.fit["converged"] is True
    assert r.fit["loglik"] == pytest.approx(glmm.loglik, rel=0, abs=0)
    assert r.fit["ngroups"] == {"herd": 15}
    assert r.fit["optinfo"] == glmm.optinfo.to_dict()  # the record, verbatim
    assert r.fit["evaluations"] == glmm.optinfo.evaluations
    assert r.fit["hessian_pd"] == glmm.diagnostics.hessian_pd
    assert r.fit["family"] == "binomial" and r.fit["link"] == "logit"
    _strict_json(r.fit)
    # child tables in the columnar form: one plain list per column
    assert set(r.coefficients) == set(COEFFICIENT_COLUMNS)
    assert all(type(v) is list for t in (r.coefficients, r.variance, r.ranef) for v in t.values())
    assert r.coefficients["term"] == list(glmm.fixed["term"])
    assert r.coefficients["estimate"] == list(glmm.fixed["estimate"])
    assert all(type(v) is float for v in r.coefficients["estimate"])
    assert r.variance["grp"] == list(glmm.varcorr["group"])
    assert set(r.variance) <= set(VARIANCE_COLUMNS)
    ranef = table_rows(r.ranef)
    assert len(ranef) == 15 and all(set(v) == set(RANEF_COLUMNS) for v in ranef)
    assert [v["mode"] for v in ranef] == list(glmm.ranef["mode"])
    _strict_json([r.coefficients, r.variance, r.ranef])
    (p,) = prepare_results([r])  # the storage contract accepts it
    assert [row[0] for row in p.coefficients] == list(glmm.fixed["term"])
    assert len(p.ranef) == 15 and len(p.variance) == len(glmm.varcorr)


def test_random_effects_can_be_left_out(glmm):
    r = to_stratum_result("k", glmm, store_random_effects=False)
    assert r.ranef == [] and r.coefficients


def test_gaussian_residual_row_and_term2_none(sleepstudy):
    fit = fitting.fit("Reaction ~ Days + (Days | Subject)", sleepstudy)
    r = to_stratum_result("", fit, store_random_effects=True)
    assert r.status == SUCCEEDED
    grps = r.variance["grp"]
    assert "Residual" in grps and "Subject" in grps
    cov = [v for v in table_rows(r.variance) if v["term2"] is not None]
    assert len(cov) == 1 and cov[0]["correlation"] is not None
    assert r.fit["sigma"] == pytest.approx(fit.sigma)
    prepare_results([r])


def test_not_converged_is_stored_flagged(cbpp):
    fit = fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", cbpp,
                      family="binomial", control={"maxiter": 1})
    assert not fit.diagnostics.converged
    r = to_stratum_result("k", fit, store_random_effects=True)
    assert r.status == NOT_CONVERGED
    assert r.fit["converged"] is False and r.coefficients
    prepare_results([r])


def test_nan_becomes_none(glmm):
    fixed = glmm.fixed.copy()
    fixed.loc[0, "std_error"] = np.nan
    fixed.loc[1, "p_value"] = np.inf
    broken = dataclasses.replace(glmm, fixed=fixed, aic=float("nan"))
    r = to_stratum_result("k", broken, store_random_effects=False)
    assert r.coefficients["std_error"][0] is None
    assert r.coefficients["p_value"][1] is None
    assert r.fit["aic"] is None
    _strict_json(r.coefficients)
    (p,) = prepare_results([r])
    assert p.coefficients[0][2] is None and p.coefficients[1][4] is None


def test_huge_finite_floats_are_kept_and_non_finite_dropped(glmm):
    # the finiteness check sums a column: a sum that overflows must not drop finite values
    fixed = glmm.fixed.copy()
    fixed["estimate"] = [1e308, 1e308, -1e308, 5e-324][: len(fixed)]
    fixed["conf_high"] = [1e308, np.nan, np.inf, -np.inf][: len(fixed)]
    r = to_stratum_result("k", dataclasses.replace(glmm, fixed=fixed))
    assert r.coefficients["estimate"] == fixed["estimate"].tolist()
    assert r.coefficients["conf_high"] == [1e308, None, None, None][: len(fixed)]
    _strict_json(r.coefficients)


@pytest.mark.parametrize("index", ["str", object])
def test_column_names_of_any_index_dtype(glmm, index):
    fixed = glmm.fixed.copy()
    fixed.columns = pd.Index(list(fixed.columns), dtype=index)
    r = to_stratum_result("k", dataclasses.replace(glmm, fixed=fixed))
    assert r.coefficients == to_stratum_result("k", glmm).coefficients
    assert r.coefficients["term"] == glmm.fixed["term"].tolist()


@pytest.mark.parametrize("dtype", ["str", "string[pyarrow]", "string[python]", object])
def test_text_columns_missing_as_none_whatever_the_string_dtype(glmm, dtype):
    # pandas 3 makes text columns Arrow-backed strings (converted through Arrow), older
    # pandas or a caller's frame may hold object or Python-backed strings: same lists
    ranef = glmm.ranef.copy()
    levels = ranef["level"].astype(object).tolist()
    levels[1] = None
    ranef["level"] = pd.Series(levels, dtype=dtype)
    r = to_stratum_result("k", dataclasses.replace(glmm, ranef=ranef))
    assert r.ranef["level"] == levels
    assert all(type(v) is str for i, v in enumerate(r.ranef["level"]) if i != 1)
    _strict_json(r.ranef)


def test_jsonable():
    value = {"a": float("nan"), "b": [np.inf, np.float64(1.5), np.int64(2)], 3: np.bool_(True),
             "c": (1, None), "d": np.array([1.0, np.nan]), "e": pd.NA}
    out = jsonable(value)
    assert out == {"a": None, "b": [None, 1.5, 2], "3": True, "c": [1, None],
                   "d": [1.0, None], "e": None}
    _strict_json(out)
    assert math.isnan(float("nan")) and jsonable(float("-inf")) is None


def test_fitting_error_is_failed_without_traceback(cbpp):
    one_herd = cbpp[cbpp["herd"].astype(str) == "1"]
    with pytest.raises(DataError) as info:
        fitting.fit("cbind(incidence, size - incidence) ~ period + (1 | herd)", one_herd,
                    family="binomial")
    r = to_stratum_result("herd=1", info.value, store_random_effects=True)
    assert r.status == FAILED and r.fit is None and r.coefficients == []
    assert r.error_class == "DataError"
    assert r.error_message == str(info.value) and "herd" in r.error_message
    assert "Traceback" not in r.error_message
    prepare_results([r])


def _raise_bug():
    return {}["missing"]


def test_unexpected_error_keeps_traceback_tail():
    try:
        _raise_bug()
    except KeyError as exc:
        r = to_stratum_result("k", exc, store_random_effects=True)
    assert r.status == FAILED and r.error_class == "KeyError"
    assert "_raise_bug" in r.error_message and "Traceback" in r.error_message
    assert len(r.error_message.splitlines()) <= 13


def test_malformed_result_fails_the_stratum(glmm):
    broken = dataclasses.replace(glmm, fixed=None, diagnostics=None)
    r = to_stratum_result("k", broken, store_random_effects=True)
    assert r.status == FAILED and r.error_class == "AttributeError"

"""Validation of result records into driver-ready rows (:mod:`storage.rows`), no database.

Child tables come as rows (a list of dicts) or as columns (a dict of lists or 1-d
arrays); both forms must give the same rows, and a malformed table of either form must be
refused naming the stratum, the table, the row and the column.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from storage import InvalidRecordError, StratumResult
from storage.engine import json_dumps
from storage.records import table_rows
from storage.rows import COEFFICIENT_COLUMNS, RANEF_COLUMNS, VARIANCE_COLUMNS, prepare_results

KEY = "region=north"
FIT = {"nobs": 180, "loglik": -875.97, "converged": True, "optinfo": {"final": [0.9, 0.2]}}
COEF_ROWS = [
    {"term": "(Intercept)", "estimate": 251.4, "std_error": 6.63, "statistic": 37.9,
     "p_value": 0.0, "conf_low": 238.4, "conf_high": 264.4},
    {"term": "Days", "estimate": 10.47, "std_error": float("nan"), "statistic": 6.97,
     "p_value": 3e-12, "conf_low": -math.inf, "conf_high": 13.4},
]
VAR_ROWS = [
    {"grp": "Subject", "term1": "(Intercept)", "term2": None, "variance": 565.5, "sd": 23.78,
     "correlation": None},
    {"grp": "Subject", "term1": "(Intercept)", "term2": "Days", "variance": 11.06, "sd": None,
     "correlation": 0.081},
]
RANEF_ROWS = [{"grp": "Subject", "level": str(lvl), "term": "(Intercept)",
               "mode": 0.5 * lvl, "cond_sd": 1.0 + lvl} for lvl in range(4)]
# Expected driver rows: NaN, inf and None all NULL, column order of the tables.
WANT_COEFS = [("(Intercept)", 251.4, 6.63, 37.9, 0.0, 238.4, 264.4),
              ("Days", 10.47, None, 6.97, 3e-12, None, 13.4)]
WANT_VAR = [("Subject", "(Intercept)", None, 565.5, 23.78, None),
            ("Subject", "(Intercept)", "Days", 11.06, None, 0.081)]
WANT_RANEF = [("Subject", str(i), "(Intercept)", 0.5 * i, 1.0 + i) for i in range(4)]


def _columns(rows, names, arrays=False):
    out = {c: [r.get(c) for r in rows] for c in names}
    if arrays:  # float columns as float64 arrays (None -> NaN), text as lists
        out = {c: (np.array([np.nan if v is None else v for v in vals], dtype=float)
                   if not isinstance(vals[0] if vals[0] is not None else vals[-1], str)
                   else vals) for c, vals in out.items()}
    return out


def _result(coefficients, variance, ranef, fit=FIT) -> StratumResult:
    return StratumResult(KEY, "succeeded", fit=dict(fit), coefficients=coefficients,
                         variance=variance, ranef=ranef)


@pytest.mark.parametrize("form", ["rows", "lists", "arrays"])
def test_both_forms_give_the_same_rows(form):
    if form == "rows":
        tables = (COEF_ROWS, VAR_ROWS, RANEF_ROWS)
    else:
        arrays = form == "arrays"
        tables = (_columns(COEF_ROWS, COEFFICIENT_COLUMNS, arrays),
                  _columns(VAR_ROWS, VARIANCE_COLUMNS, arrays),
                  _columns(RANEF_ROWS, RANEF_COLUMNS, arrays))
    (p,) = prepare_results([_result(*tables)])
    assert p.coefficients == WANT_COEFS
    assert p.variance == WANT_VAR
    assert p.ranef == WANT_RANEF
    assert all(type(v) is float for row in p.ranef for v in row[3:])  # no NumPy scalars
    assert p.fit[0] == 180 and p.fit[2] == -875.97
    assert p.fit[12] == '{"final":[0.9,0.2]}'  # optinfo as JSON text


def test_columns_may_be_left_out_and_tables_empty():
    coefs = {"term": ["a", "b"], "estimate": np.array([1.0, 2.0])}
    (p,) = prepare_results([_result(coefs, [], {})])
    assert p.coefficients == [("a", 1.0, None, None, None, None, None),
                              ("b", 2.0, None, None, None, None, None)]
    assert p.variance == [] and p.ranef == []
    failed = StratumResult(KEY, "failed", coefficients={"term": []}, error_class="E",
                           error_message="boom")
    (p,) = prepare_results([failed])  # empty columns are no estimates
    assert p.fit is None and p.coefficients == []


def test_numpy_and_odd_values_are_converted_per_value():
    coefs = {"term": np.array(["a", "b"]), "estimate": [np.float64(1.5), "2.5"],
             "std_error": [None, np.nan], "p_value": np.array([1, 0], dtype=np.int64)}
    (p,) = prepare_results([_result(coefs, [], [])])
    assert p.coefficients == [("a", 1.5, None, None, 1.0, None, None),
                              ("b", 2.5, None, None, 0.0, None, None)]
    assert [type(v) for v in p.coefficients[0][:2]] == [str, float]


def test_store_random_effects_false_skips_ranef():
    bad_ranef = {"grp": ["g"], "level": ["1"], "term": [None]}  # would be refused
    (p,) = prepare_results([_result(COEF_ROWS, [], bad_ranef)], store_random_effects=False)
    assert p.ranef == [] and len(p.coefficients) == 2


INVALID_COLUMNS = [
    ({"term": ["a"], "estimat": [1.0]}, r"coefficients: unknown column\(s\) \['estimat'\]"),
    ({"term": ["a", "b"], "estimate": [1.0]},
     r"coefficients: column 'estimate' has 1 values, column 'term' has 2"),
    ({"term": ["a", "b"], "estimate": [1.0, "high"]},
     r"coefficients\[1\]: column 'estimate': could not convert"),
    ({"term": ["a", "b"], "estimate": [1.0, [2.0]]}, r"coefficients\[1\]: column 'estimate'"),
    ({"term": ["a", None, "c"], "estimate": [1.0, 2.0, 3.0]},
     r"coefficients\[1\]: missing required column\(s\) \['term'\]"),
    ({"estimate": [1.0]}, r"coefficients\[0\]: missing required column\(s\) \['term'\]"),
    ({"term": "ab"}, r"coefficients: column 'term': expected a list or 1-d array"),
    ({"term": ["a"], "estimate": 1.0}, r"coefficients: column 'estimate': expected a list"),
    ({"term": ["a"], "estimate": np.ones((1, 1))},
     r"coefficients: column 'estimate': expected a 1-d array, got 2 dimensions"),
    ("term", r"coefficients: expected a list of dicts or a dict of columns, got str"),
    ([{"term": "a"}, ("b", 1.0)], r"coefficients\[1\]: expected a dict, got tuple"),
    ([{"term": "a"}, {"term": "b", "AIC": 1.0}],
     r"coefficients\[1\]: unknown column\(s\) \['AIC'\]"),
]


@pytest.mark.parametrize("coefficients, match", INVALID_COLUMNS)
def test_malformed_tables_are_refused_naming_the_culprit(coefficients, match):
    with pytest.raises(InvalidRecordError, match=match) as info:
        prepare_results([_result(coefficients, [], [])])
    assert str(info.value).startswith(f"stratum {KEY!r} coefficients")


def test_malformed_ranef_column_is_refused():
    ranef = _columns(RANEF_ROWS, RANEF_COLUMNS)
    ranef["cond_sd"] = [1.0, 2.0, {"x": 1}, 4.0]
    with pytest.raises(InvalidRecordError, match=r"ranef\[2\]: column 'cond_sd'"):
        prepare_results([_result(COEF_ROWS, VAR_ROWS, ranef)])


def test_table_rows_of_both_forms():
    assert table_rows(COEF_ROWS) == COEF_ROWS
    cols = _columns(RANEF_ROWS, RANEF_COLUMNS, arrays=True)
    assert table_rows(cols) == RANEF_ROWS
    assert all(type(r["mode"]) is float for r in table_rows(cols))
    assert table_rows({"term": ["a"], "estimate": None}) == [{"term": "a"}]


def test_json_dumps_fast_path_matches_the_safe_walk():
    plain = {"optimizer": "newton", "final": (0.5, 1), "extra": {"k": [True, None, "x"]}, 3: 1}
    assert json_dumps(plain) == '{"optimizer":"newton","final":[0.5,1],' \
                                '"extra":{"k":[true,null,"x"]},"3":1}'
    odd = {"a": float("nan"), "b": np.float64(2.5), "c": np.int64(3), "d": np.array([1.0, np.inf]),
           "e": (1, np.bool_(True))}
    assert json_dumps(odd) == '{"a":null,"b":2.5,"c":3,"d":[1.0,null],"e":[1,true]}'
    with pytest.raises(TypeError):
        json_dumps({"f": object()})

"""Every validation rule of fitting.frame raises a FittingError naming the culprit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fitting.errors import DataError, FittingError, FormulaError
from fitting.frame import build_design

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def contraception():
    return pd.read_parquet(FIXTURES / "Contraception.parquet")


@pytest.fixture
def df():
    rng = np.random.default_rng(3)
    n = 30
    return pd.DataFrame({
        "y": rng.normal(size=n),
        "x": rng.normal(size=n),
        "cnt": rng.poisson(2, size=n).astype(float),
        "s": rng.integers(0, 5, size=n),
        "fl": rng.integers(0, 5, size=n),
        "g": np.repeat(list("abcdef"), 5),
        "f": np.tile(list("pq"), 15),
        "obs": np.arange(n),
        "bin": np.tile([0, 1, 1], 10),
    })


# ------------------------------------------------------------------ columns
def test_unknown_column_suggests_close_match(contraception):
    with pytest.raises(FormulaError, match=r"unknown column 'agee' in formula; did you mean 'age'\?"):
        build_design("use ~ agee + (1 | district)", contraception, "binomial")


def test_unknown_column_without_close_match_lists_columns(contraception):
    with pytest.raises(FormulaError, match="unknown column 'zzz' in formula; available columns: use, district"):
        build_design("use ~ zzz", contraception, "binomial")


def test_unknown_grouping_and_weights_columns(contraception):
    with pytest.raises(FormulaError, match="unknown column 'distrct'.*did you mean 'district'"):
        build_design("use ~ age + (1 | distrct)", contraception, "binomial")
    with pytest.raises(DataError, match="unknown column 'wt' in weights"):
        build_design("use ~ age", contraception, "binomial", weights="wt")


def test_data_of_wrong_type():
    with pytest.raises(DataError, match="pandas DataFrame or a pyarrow Table"):
        build_design("y ~ x", [[1, 2]])


def test_empty_data(df):
    with pytest.raises(DataError, match="data has no rows"):
        build_design("y ~ x", df.iloc[:0])


# ------------------------------------------------------------------ missing values
def test_missing_values_are_reported_with_rows(contraception):
    data = contraception.copy()
    data.loc[[4, 17, 90], "age"] = np.nan
    with pytest.raises(DataError) as info:
        build_design("use ~ age + I(age^2) + (1 | district)", data, "binomial")
    assert "column 'age' has 3 missing/non-finite values (rows 4, 17, 90)" in str(info.value)
    assert "I(age^2)" not in str(info.value)  # the derived term is not blamed again


def test_missing_values_show_at_most_five_rows(df):
    df.loc[[1, 2, 3, 5, 8, 13], "x"] = np.inf
    with pytest.raises(DataError, match=r"column 'x' has 6 missing/non-finite values \(rows 1, 2, 3, 5, 8, \.\.\.\)"):
        build_design("y ~ x", df)


def test_missing_grouping_and_string_values(df, contraception):
    df.loc[7, "g"] = None
    with pytest.raises(DataError, match=r"column 'g' has 1 missing/non-finite values \(rows 7\)"):
        build_design("y ~ x + (1 | g)", df)
    data = contraception.copy()
    data.loc[2, "district"] = np.nan
    with pytest.raises(DataError, match=r"column 'district' has 1 missing"):
        build_design("use ~ age + (1 | district)", data, "binomial")


def test_missing_in_weights_and_offset(df):
    weights = np.ones(30)
    weights[4] = np.nan
    with pytest.raises(DataError, match=r"weights has 1 missing/non-finite values \(rows 4\)"):
        build_design("y ~ x", df, weights=weights)
    df["off"] = 0.0
    df.loc[9, "off"] = np.nan
    with pytest.raises(DataError, match=r"column 'off' \(offset\) has 1 missing"):
        build_design("y ~ x", df, offset="off")


def test_non_finite_derived_term_is_named(df):
    df["cnt"] = 1.0
    df.loc[[0, 3], "cnt"] = 0.0
    with pytest.raises(DataError, match=r"'log\(cnt\)' has 2 missing/non-finite values \(rows 0, 3\)"):
        build_design("y ~ log(cnt)", df)


def test_omit_cannot_leave_nothing(df):
    df["x"] = np.nan
    with pytest.raises(DataError, match="no rows left after removing 30 rows"):
        build_design("y ~ x", df, na_action="omit")


def test_invalid_na_action(df):
    with pytest.raises(DataError, match="na_action must be one of"):
        build_design("y ~ x", df, na_action="drop")


# ------------------------------------------------------------------ responses
def test_binomial_proportion_outside_unit_interval(df):
    with pytest.raises(DataError, match=r"response 'cnt' for family 'binomial'.*rows are outside \[0, 1\]"):
        build_design("cnt ~ x", df, "binomial")


def test_cbind_negative_counts(df):
    df.loc[[2, 6], "s"] = -1
    with pytest.raises(DataError, match=r"response 'cbind\(s, fl\)' has negative counts in 2 rows \(rows 2, 6\)"):
        build_design("cbind(s, fl) ~ x", df, "binomial")


def test_cbind_non_integer_counts(df):
    df["s"] = df["s"] + 0.5
    with pytest.raises(DataError, match=r"response 'cbind\(s, fl\)' has non-integer counts in 30 rows"):
        build_design("cbind(s, fl) ~ x", df, "binomial")


def test_cbind_zero_trials(df):
    df.loc[5, ["s", "fl"]] = 0
    with pytest.raises(DataError, match=r"zero trials.*\(rows 5\)"):
        build_design("cbind(s, fl) ~ x", df, "binomial")


def test_binomial_factor_response_needs_two_levels(df):
    with pytest.raises(DataError, match=r"response 'g' has 6 levels .* needs exactly 2"):
        build_design("g ~ x", df, "binomial")


def test_binomial_proportion_needs_positive_weights(df):
    df["p"] = 0.5
    df["w"] = 2.0
    df.loc[3, "w"] = 0.0
    with pytest.raises(DataError, match=r"weights \(numbers of trials\) .* response 'p' must be positive; 1 rows"):
        build_design("p ~ x", df, "binomial", weights="w")


def test_poisson_negative_and_non_integer_counts(df):
    bad = df.assign(cnt=df["cnt"] - 10)
    with pytest.raises(DataError, match=r"response 'cnt' for family 'poisson' must be non-negative counts; \d+ rows are negative"):
        build_design("cnt ~ x", bad, "poisson")
    with pytest.raises(DataError, match=r"response 'y' for family 'poisson' must be integer counts; 30 rows"):
        build_design("y ~ x", df.assign(y=df["y"].abs()), "poisson")


def test_string_response_for_gaussian_and_poisson(df):
    with pytest.raises(DataError, match="response 'g' is a factor/string column; family 'gaussian'"):
        build_design("g ~ x", df)
    with pytest.raises(DataError, match="response 'g' is a factor/string column; family 'poisson'"):
        build_design("g ~ x", df, "poisson")


def test_cbind_needs_binomial(df):
    with pytest.raises(DataError, match=r"response 'cbind\(s, fl\)' uses cbind\(\), which needs family 'binomial'"):
        build_design("cbind(s, fl) ~ x", df, "poisson")


def test_negative_weights(df):
    with pytest.raises(DataError, match=r"weights must be non-negative; 1 rows are negative \(rows 0\)"):
        build_design("y ~ x", df, weights=np.r_[-1.0, np.ones(29)])


def test_weights_of_wrong_length(df):
    with pytest.raises(DataError, match="weights has length 3 but the data has 30 rows"):
        build_design("y ~ x", df, weights=[1, 2, 3])


def test_non_numeric_column_in_arithmetic(df):
    with pytest.raises(DataError, match=r"column 'g' is not numeric .* cannot be used in 'log\(g\)'"):
        build_design("y ~ log(g)", df)


def test_scale_of_constant_column(df):
    df["c"] = 1.0
    with pytest.raises(DataError, match=r"cannot compute 'scale\(c\)'.*constant"):
        build_design("y ~ scale(c)", df)


# ------------------------------------------------------------------ factors and groups
def test_fixed_factor_with_one_level(df):
    with pytest.raises(DataError, match=r"factor 'f' has only 1 level \('p'\).*2 or more levels"):
        build_design("y ~ x + f", df[df["f"] == "p"])


def test_grouping_factor_with_one_level(df):
    with pytest.raises(DataError, match="grouping factor 'herd' has only 1 level; a random effect needs at least 2"):
        build_design("y ~ x + (1 | herd)", df.assign(herd="h1"))


def test_observation_level_effect_rejected_for_gaussian(df):
    with pytest.raises(DataError, match=r"grouping factor 'obs' has 30 levels for 30 observations.*gaussian"):
        build_design("y ~ x + (1 | obs)", df)


def test_too_many_random_effects_for_gaussian(df):
    # 6 groups x 2 effects = 12 < 30 is fine; 15 groups x 2 = 30 >= 30 is not
    build_design("y ~ x + (x | g)", df)
    df["g15"] = np.repeat(np.arange(15), 2)
    with pytest.raises(DataError, match=r"random-effects term \(x \| g15\) has 30 random effects for 30"):
        build_design("y ~ x + (x | g15)", df)


def test_observation_level_effect_rejected_for_bernoulli(df):
    with pytest.raises(DataError, match=r"grouping factor 'obs'.*0/1 \(Bernoulli\) binomial"):
        build_design("bin ~ x + (1 | obs)", df, "binomial")


def test_observation_level_effect_allowed_for_poisson_and_trials(df):
    assert build_design("cnt ~ x + (1 | obs)", df, "poisson").re_terms[0].n_levels == 30
    df["fl"] = df["fl"] + 1  # at least one trial per row
    assert build_design("cbind(s, fl) ~ x + (1 | obs)", df, "binomial").re_terms[0].n_levels == 30


# ------------------------------------------------------------------ property: only FittingError
_ALPHABET = "yx~+-*/^:|()` ,.01gIlogscfb"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=_ALPHABET, max_size=30))
def test_junk_formulas_on_data_raise_only_fitting_errors(text):
    data = pd.DataFrame({"y": [0.0, 1.0, 1.0, 0.0], "x": [1.0, 2.0, 3.0, 5.0], "g": list("aabb"),
                         "f": list("abab"), "b": [1.0, 2.0, 2.0, 3.0]})
    try:
        build_design(text, data)
    except FittingError:
        pass

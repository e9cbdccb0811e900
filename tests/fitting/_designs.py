"""Hand-built Designs of the reference data sets (independent of fitting.frame).

Used to test the numerics on their own; ``test_reference.py`` also goes through
``fitting.fit(formula, data)`` once the formula/frame stage is available.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fitting.design import Design, ReTerm

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def load(name: str) -> pd.DataFrame:
    return pd.read_parquet(FIXTURES / f"{name}.parquet")


def expected() -> dict:
    return json.loads((FIXTURES / "lme4_expected.json").read_text())["fits"]


def ranef_csv(key: str) -> pd.DataFrame:
    return pd.read_csv(FIXTURES / "ranef" / f"{key}.csv", dtype={"grp": str})


def _factor(s: pd.Series):
    c = pd.Categorical(s).remove_unused_categories()
    return np.asarray(c.codes, dtype=np.int64), tuple(str(x) for x in c.categories)


def _dummies(s: pd.Series, name: str):
    c = pd.Categorical(s).remove_unused_categories()
    cols, names = [], []
    for lev in c.categories[1:]:
        cols.append((np.asarray(c) == lev).astype(float))
        names.append(f"{name}{lev}")
    return cols, names


def re_term(df, group, Z=None, names=("(Intercept)",)):
    codes, levels = _factor(df[group])
    if Z is None:
        Z = np.ones((len(df), 1))
    return ReTerm(group=group, levels=levels, codes=codes, term_names=tuple(names), Z=np.asarray(Z, float))


def cbpp() -> Design:
    df = load("cbpp")
    d, dn = _dummies(df["period"], "period")
    X = np.column_stack([np.ones(len(df))] + d)
    size = df["size"].to_numpy(float)
    return Design(response="cbind(incidence, size - incidence)", y=df["incidence"].to_numpy(float) / size,
                  weights=size, offset=np.zeros(len(df)), X=X, x_names=("(Intercept)", *dn),
                  re_terms=(re_term(df, "herd"),))


def grouseticks() -> Design:
    df = load("grouseticks")
    d, dn = _dummies(df["YEAR"], "YEAR")
    h = df["HEIGHT"].to_numpy(float)
    sh = (h - h.mean()) / h.std(ddof=1)
    X = np.column_stack([np.ones(len(df))] + d + [sh])
    n = len(df)
    return Design(response="TICKS", y=df["TICKS"].to_numpy(float), weights=np.ones(n), offset=np.zeros(n),
                  X=X, x_names=("(Intercept)", *dn, "scale(HEIGHT)"),
                  re_terms=(re_term(df, "BROOD"), re_term(df, "INDEX"), re_term(df, "LOCATION")))


def contraception(slope: bool = False) -> Design:
    df = load("Contraception")
    n = len(df)
    age = df["age"].to_numpy(float)
    du, dun = _dummies(df["urban"], "urban")
    dl, dln = _dummies(df["livch"], "livch")
    X = np.column_stack([np.ones(n), age, age ** 2] + du + dl)
    if slope:
        term = re_term(df, "district", Z=np.column_stack([np.ones(n), du[0]]), names=("(Intercept)", "urbanY"))
    else:
        term = re_term(df, "district")
    return Design(response="use", y=df["use"].to_numpy(float), weights=np.ones(n), offset=np.zeros(n),
                  X=X, x_names=("(Intercept)", "age", "I(age^2)", *dun, *dln), re_terms=(term,))


def sleepstudy() -> Design:
    df = load("sleepstudy")
    n = len(df)
    days = df["Days"].to_numpy(float)
    X = np.column_stack([np.ones(n), days])
    term = re_term(df, "Subject", Z=X, names=("(Intercept)", "Days"))
    return Design(response="Reaction", y=df["Reaction"].to_numpy(float), weights=np.ones(n), offset=np.zeros(n),
                  X=X, x_names=("(Intercept)", "Days"), re_terms=(term,))


DESIGNS = {
    "cbpp_glmer_laplace": (cbpp, "binomial"),
    "grouseticks_glmer_laplace": (grouseticks, "poisson"),
    "contraception_glmer_laplace": (contraception, "binomial"),
    "contraception_slope_glmer_laplace": (lambda: contraception(True), "binomial"),
    "sleepstudy_lmer_ml": (sleepstudy, "gaussian"),
    "sleepstudy_lmer_reml": (sleepstudy, "gaussian"),
}

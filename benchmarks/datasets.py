"""Deterministic benchmark datasets (numpy ``default_rng`` with fixed seeds).

Every generator returns a pandas DataFrame (or writes Parquet, for the service scale
data) and is a pure function of its arguments: the same call gives the same bytes.

=====  ===========================================================  ==========
name   model                                                        issue
=====  ===========================================================  ==========
(a)    ``ri``: random-intercept logistic, 8,700 rows, 400 groups,     #2
       ``y ~ x1 + x2 + treat + (1 | g)`` (``treat`` binary 0/1)
(b)    ``crossed``: crossed binomial, 7,500 rows, 316 x 24 levels,    #2
       ``y ~ x1 + x2 + (1 | a) + (1 | b)``
(c)    ``contraception``: real data (tests/fixtures), 1,934 rows,     #2
       ``use ~ age + I(age^2) + urban + livch + (urban | district)``
(d)    ``batched``: 200 strata x 40 groups x 25-75 rows per group     #4
       (~2,000 rows per stratum), ``y ~ x1 + x2 + (1 | g)``
(e)    ``service``: hive-partitioned Parquet, N strata x ~2,000 rows  #5
=====  ===========================================================  ==========

Grouping factors are pandas ``category`` columns whose categories are in a fixed order
(the order R gets too, see ``peers.py``). Numeric covariates are float64; binary
outcomes and the binary covariate are int64 0/1.

Run ``python benchmarks/datasets.py`` to print a one-line summary of each.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"

SEED_RI = 20_240_201
SEED_CROSSED = 20_240_202
SEED_BATCHED = 20_240_204
SEED_SERVICE = 20_240_205


@dataclass(frozen=True)
class Model:
    """One benchmark model: data plus the lme4 formula (R syntax) and family."""

    key: str
    label: str
    data: pd.DataFrame
    formula: str
    family: str = "binomial"
    # Formula with every random-effect term removed (the no-RE "GLM yardstick").
    fixed_formula: str = ""
    # Peers that parse no `^` inside I(): the same model with I(x**2) (Python syntax).
    formula_pow: str = ""


def _expit(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _factor(codes: np.ndarray, prefix: str, n_levels: int) -> pd.Categorical:
    width = len(str(n_levels))
    cats = [f"{prefix}{i + 1:0{width}d}" for i in range(n_levels)]
    return pd.Categorical.from_codes(codes.astype(np.int64), categories=cats)


def _group_sizes(rng: np.random.Generator, n_rows: int, n_groups: int, min_size: int) -> np.ndarray:
    """Unequal group sizes summing exactly to ``n_rows``, each ``>= min_size``."""
    extra = rng.multinomial(n_rows - n_groups * min_size, rng.dirichlet(np.full(n_groups, 4.0)))
    return min_size + extra


# ---------------------------------------------------------------------------------------
# (a) random-intercept logistic
# ---------------------------------------------------------------------------------------
def random_intercept(
    n_rows: int = 8_700, n_groups: int = 400, sd_g: float = 0.8, seed: int = SEED_RI
) -> pd.DataFrame:
    """``y ~ x1 + x2 + treat + (1 | g)``: 8,700 rows in 400 unequal groups (5..~60 rows).

    True values: beta = (-0.5, 0.6, -0.4, 0.8), sd(g) = 0.8.
    """
    rng = np.random.default_rng(seed)
    sizes = _group_sizes(rng, n_rows, n_groups, min_size=5)
    g = np.repeat(np.arange(n_groups), sizes)
    x1 = rng.normal(size=n_rows)
    x2 = rng.normal(size=n_rows) + 0.3 * rng.normal(size=n_groups)[g]  # some between-group variation
    treat = (rng.random(n_rows) < 0.45).astype(np.int64)
    b = rng.normal(scale=sd_g, size=n_groups)
    eta = -0.5 + 0.6 * x1 - 0.4 * x2 + 0.8 * treat + b[g]
    y = (rng.random(n_rows) < _expit(eta)).astype(np.int64)
    return pd.DataFrame({"y": y, "x1": x1, "x2": x2, "treat": treat, "g": _factor(g, "g", n_groups)})


# ---------------------------------------------------------------------------------------
# (b) crossed binomial
# ---------------------------------------------------------------------------------------
def crossed(
    n_rows: int = 7_500,
    n_a: int = 316,
    n_b: int = 24,
    sd_a: float = 0.7,
    sd_b: float = 0.5,
    seed: int = SEED_CROSSED,
) -> pd.DataFrame:
    """``y ~ x1 + x2 + (1 | a) + (1 | b)``: 7,500 rows, 316 x 24 fully crossed-ish levels.

    Each row draws its ``a`` level (every level present, sizes unequal) and an independent
    ``b`` level, so the design is (partially) crossed, not nested. True values:
    beta = (-0.3, 0.5, -0.7), sd(a) = 0.7, sd(b) = 0.5.
    """
    rng = np.random.default_rng(seed)
    sizes = _group_sizes(rng, n_rows, n_a, min_size=8)
    a = rng.permutation(np.repeat(np.arange(n_a), sizes))
    b = rng.integers(0, n_b, size=n_rows)
    b[:n_b] = np.arange(n_b)  # every b level present
    x1 = rng.normal(size=n_rows)
    x2 = rng.uniform(-1.0, 1.0, size=n_rows)
    ua = rng.normal(scale=sd_a, size=n_a)
    ub = rng.normal(scale=sd_b, size=n_b)
    eta = -0.3 + 0.5 * x1 - 0.7 * x2 + ua[a] + ub[b]
    y = (rng.random(n_rows) < _expit(eta)).astype(np.int64)
    return pd.DataFrame(
        {"y": y, "x1": x1, "x2": x2, "a": _factor(a, "a", n_a), "b": _factor(b, "b", n_b)}
    )


# ---------------------------------------------------------------------------------------
# (c) Contraception (real data)
# ---------------------------------------------------------------------------------------
def contraception() -> pd.DataFrame:
    """mlmRev's Contraception (1,934 rows, 60 districts), from tests/fixtures.

    ``use`` is int 0/1; ``district``, ``urban`` (N/Y), ``livch`` (0/1/2/3+) categorical.
    """
    df = pd.read_parquet(FIXTURES / "Contraception.parquet")
    return df.reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# (d) batched strata
# ---------------------------------------------------------------------------------------
def _one_stratum(rng: np.random.Generator, n_groups: int, rows_lo: int, rows_hi: int):
    sizes = rng.integers(rows_lo, rows_hi + 1, size=n_groups)
    n = int(sizes.sum())
    g = np.repeat(np.arange(n_groups), sizes)
    x1 = rng.normal(size=n)
    x2 = rng.normal(size=n)
    beta0 = rng.normal(-0.4, 0.3)
    beta1 = rng.normal(0.5, 0.2)
    beta2 = rng.normal(-0.3, 0.2)
    sd = rng.uniform(0.3, 1.0)
    eta = beta0 + beta1 * x1 + beta2 * x2 + rng.normal(scale=sd, size=n_groups)[g]
    y = (rng.random(n) < _expit(eta)).astype(np.int64)
    return g, x1, x2, y


def batched(
    n_strata: int = 200,
    n_groups: int = 40,
    rows_lo: int = 25,
    rows_hi: int = 75,
    seed: int = SEED_BATCHED,
) -> pd.DataFrame:
    """Many small independent strata: ``y ~ x1 + x2 + (1 | g)`` within each ``stratum``.

    200 strata, each with 40 groups of 25..75 rows (about 2,000 rows per stratum, about
    400,000 rows in all). Per-stratum truths vary a little (beta and sd(g) ~ U(0.3, 1)).
    Columns: ``stratum`` (category s001..), ``g`` (category g01..g40; the same labels
    reused in every stratum, as groups are nested in strata), ``x1``, ``x2``, ``y``.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for s in range(n_strata):
        g, x1, x2, y = _one_stratum(rng, n_groups, rows_lo, rows_hi)
        parts.append((np.full(len(y), s), g, x1, x2, y))
    s, g, x1, x2, y = (np.concatenate(c) for c in zip(*parts))
    return pd.DataFrame(
        {
            "stratum": _factor(s, "s", n_strata),
            "g": _factor(g, "g", n_groups),
            "x1": x1,
            "x2": x2,
            "y": y,
        }
    )


# ---------------------------------------------------------------------------------------
# (e) service-scale hive-partitioned Parquet
# ---------------------------------------------------------------------------------------
SERVICE_FORMULA = "y ~ x1 + x2 + (1 | g)"
SERVICE_STRATA_COLUMN = "stratum"


def write_service_dataset(
    path: str | os.PathLike,
    n_strata: int,
    rows_per_stratum: int = 2_000,
    n_groups: int = 40,
    seed: int = SEED_SERVICE,
) -> dict:
    """Write a hive-partitioned Parquet dataset, one partition folder per stratum.

    Prefers the service's own ``service.demo.write_demo_dataset`` (the layout the
    service is tested on: ``path/region=rNNN/part-0.parquet``, model ``remission ~ age +
    married + il6 + (1 | doctor)``), called with 40 doctors per region, 25..75 patients
    each (~2,000 rows per stratum) and no deliberately broken strata. Without it, writes
    this module's own layout: ``path/stratum=sNNNN/part-0.parquet``, ~``rows_per_stratum`` rows each (40 groups of
    ``rows_per_stratum/40 +- 50%`` rows), columns ``g, x1, x2, y``. Returns a dict
    describing what was written: ``{"writer", "path", "n_strata", "formula",
    "strata_columns", "family", "n_rows"}``.
    """
    path = Path(path)
    try:  # the service's own demo writer, when it exists
        from service import demo  # type: ignore

        writer = getattr(demo, "write_demo_dataset")
    except (ImportError, AttributeError):
        writer = None
    if writer is not None:
        # ~rows_per_stratum rows: n_groups doctors x U{lo..hi} patients, no broken strata
        per_group = rows_per_stratum / n_groups
        lo, hi = max(2, int(round(per_group * 0.5))), int(round(per_group * 1.5))
        writer(path, n_strata=n_strata, n_groups=(n_groups, n_groups), rows_per_group=(lo, hi),
               seed=seed, broken_strata=0)
        meta = {}
        marker = path / "_demo.json"
        if marker.exists():
            import json

            meta = json.loads(marker.read_text())
        return {
            "writer": "service.demo.write_demo_dataset",
            "path": str(path),
            "n_strata": n_strata,
            "n_rows": meta.get("rows"),
            "formula": "remission ~ age + married + il6 + (1 | doctor)",
            "strata_columns": ["region"],
            "family": "binomial",
        }

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    per_group = rows_per_stratum / n_groups
    lo, hi = max(2, int(per_group * 0.5)), int(per_group * 1.5)
    width = len(str(n_strata))
    n_rows = 0
    path.mkdir(parents=True, exist_ok=True)
    for s in range(n_strata):
        g, x1, x2, y = _one_stratum(rng, n_groups, lo, hi)
        d = path / f"stratum=s{s + 1:0{width}d}"
        d.mkdir(exist_ok=True)
        table = pa.table(
            {
                "g": pa.array([f"g{i + 1:02d}" for i in g]),
                "x1": pa.array(x1),
                "x2": pa.array(x2),
                "y": pa.array(y),
            }
        )
        pq.write_table(table, d / "part-0.parquet")
        n_rows += len(y)
    return {
        "writer": "benchmarks.datasets.write_service_dataset",
        "path": str(path),
        "n_strata": n_strata,
        "n_rows": n_rows,
        "formula": SERVICE_FORMULA,
        "strata_columns": [SERVICE_STRATA_COLUMN],
        "family": "binomial",
    }


# ---------------------------------------------------------------------------------------
# The three single-fit models of issue #2
# ---------------------------------------------------------------------------------------
def fit_models() -> list[Model]:
    """Models (a), (b), (c) with their formulas (R syntax), fixed-only and ``**`` variants."""
    return [
        Model(
            key="ri",
            label="(a) random intercept, 8.7k rows x 400 groups",
            data=random_intercept(),
            formula="y ~ x1 + x2 + treat + (1 | g)",
            fixed_formula="y ~ x1 + x2 + treat",
            formula_pow="y ~ x1 + x2 + treat + (1 | g)",
        ),
        Model(
            key="crossed",
            label="(b) crossed, 7.5k rows, 316 x 24 levels",
            data=crossed(),
            formula="y ~ x1 + x2 + (1 | a) + (1 | b)",
            fixed_formula="y ~ x1 + x2",
            formula_pow="y ~ x1 + x2 + (1 | a) + (1 | b)",
        ),
        Model(
            key="contraception",
            label="(c) Contraception (urban | district), 1.9k rows x 60",
            data=contraception(),
            formula="use ~ age + I(age^2) + urban + livch + (urban | district)",
            fixed_formula="use ~ age + I(age^2) + urban + livch",
            formula_pow="use ~ age + I(age**2) + urban + livch + (urban | district)",
        ),
    ]


def _summary(name: str, df: pd.DataFrame, cols: list[str]) -> str:
    parts = [f"{c}: {df[c].nunique()} levels" for c in cols]
    y = df.columns[0] if name != "batched" else "y"
    return f"{name:14s} {len(df):7d} rows; " + ", ".join(parts) + f"; mean({y})={df[y].mean():.3f}"


if __name__ == "__main__":
    print(_summary("ri", random_intercept(), ["g"]))
    print(_summary("crossed", crossed(), ["a", "b"]))
    print(_summary("contraception", contraception(), ["district"]))
    d = batched()
    print(_summary("batched", d, ["stratum", "g"]))
    per = d.groupby("stratum", observed=True).size()
    print(f"{'':14s} rows per stratum: min {per.min()}, median {int(per.median())}, max {per.max()}")

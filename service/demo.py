"""Example data: a hive-partitioned Parquet dataset simulated from a binomial GLMM.

:func:`write_demo_dataset` writes ``path/region=<r>/part-0.parquet``, one folder per
region (the stratum), each file holding patients treated by doctors:

============  =========  =====================================================
column        type       meaning
============  =========  =====================================================
product       string     second strata column (``A``, ``B``, ``C``), per patient
doctor        string     grouping factor (``d00``, ``d01``, ... within a region)
age           float64    years, ~ N(50, 10) clipped to [18, 95]
married       int64      0/1, P(1) = 0.55
il6           float64    interleukin-6, ~ Gamma(2, 2)
remission     int64      0/1 from ``remission ~ age + married + il6 + (1 | doctor)``
los           int64      length of stay, Poisson with a doctor effect
region        string     (the folder name: hive partition column)
============  =========  =====================================================

True coefficients vary a little between regions and the random-intercept standard
deviation is drawn from U(0.6, 1.0). ``broken_strata`` regions are deliberately bad: all
their patients have the same doctor (one grouping level), so their fit fails while
every other stratum succeeds. Their names are in ``path/_demo.json`` (a ``_`` file, so
never read as data) and returned by :func:`demo_layout`.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DEMO_SPEC",
    "DEMO_POISSON_SPEC",
    "DemoLayout",
    "demo_layout",
    "write_demo_dataset",
    "write_demo_spec",
]

#: Job spec for the demo dataset (``{dataset}`` is filled in by :func:`write_demo_spec`).
DEMO_SPEC = """\
# stratafit demo: one binomial GLMM per region
name = "demo-remission-by-region"
dataset = {dataset}
formula = "remission ~ age + married + il6 + (1 | doctor)"
family = "binomial"
link = "logit"
strata = ["region"]
method = "laplace"
store_random_effects = true
"""

#: Poisson variant: length of stay per region.
DEMO_POISSON_SPEC = """\
# stratafit demo: one Poisson GLMM per region
name = "demo-los-by-region"
dataset = {dataset}
formula = "los ~ age + il6 + (1 | doctor)"
family = "poisson"
strata = ["region"]
store_random_effects = true
"""

_PRODUCTS = np.array(["A", "B", "C"])
_MARKER = "_demo.json"


@dataclass(frozen=True)
class DemoLayout:
    """Which regions the demo has and which are broken.

    Attributes
    ----------
    regions : tuple of str
    broken : tuple of str
        Regions whose patients all share one doctor.
    """

    regions: tuple[str, ...]
    broken: tuple[str, ...]


def _region_names(n: int) -> list[str]:
    width = max(3, len(str(max(n - 1, 0))))
    return [f"r{i:0{width}d}" for i in range(n)]


def demo_layout(n_strata: int = 200, *, seed: int = 0, broken_strata: int = 1) -> DemoLayout:
    """Regions and broken regions :func:`write_demo_dataset` produces for these arguments.

    Parameters
    ----------
    n_strata, seed, broken_strata
        As for :func:`write_demo_dataset`.

    Returns
    -------
    DemoLayout
    """
    names = _region_names(n_strata)
    broken = _broken_indices(np.random.default_rng([seed, 1]), n_strata, broken_strata)
    return DemoLayout(tuple(names), tuple(names[i] for i in broken))


def _broken_indices(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    k = min(max(int(k), 0), n)
    return np.sort(rng.choice(n, size=k, replace=False)) if k else np.array([], dtype=int)


def _range(name: str, value: tuple[int, int]) -> tuple[int, int]:
    lo, hi = (int(v) for v in value)
    if lo < 1 or hi < lo:
        raise ValueError(f"{name} must be (low, high) with 1 <= low <= high, got {value!r}")
    return lo, hi


def write_demo_dataset(
    path: str | os.PathLike,
    *,
    n_strata: int = 200,
    n_groups: tuple[int, int] = (20, 40),
    rows_per_group: tuple[int, int] = (10, 40),
    seed: int = 0,
    broken_strata: int = 1,
) -> str:
    """Simulate and write the demo dataset (deterministic for a given ``seed``).

    Parameters
    ----------
    path : str or path-like
        Output folder; created if needed. A folder from an earlier demo is replaced; any
        other non-empty folder is refused.
    n_strata : int, default 200
        Regions (one ``region=<r>`` folder each).
    n_groups : (int, int), default (20, 40)
        Inclusive range of doctors per region.
    rows_per_group : (int, int), default (10, 40)
        Inclusive range of patients per doctor.
    seed : int, default 0
    broken_strata : int, default 1
        Regions whose patients all share one doctor (the fit must fail there).

    Returns
    -------
    str
        ``path``.

    Raises
    ------
    FileExistsError
        ``path`` is a non-empty folder that was not written by this function.
    """
    if n_strata < 1:
        raise ValueError(f"n_strata must be >= 1, got {n_strata}")
    g_lo, g_hi = _range("n_groups", n_groups)
    r_lo, r_hi = _range("rows_per_group", rows_per_group)
    path = os.fspath(path)
    _prepare(path)

    layout = demo_layout(n_strata, seed=seed, broken_strata=broken_strata)
    rng = np.random.default_rng([seed, 0])

    # per stratum: true parameters
    beta0 = 1.0 + rng.normal(0.0, 0.3, n_strata)
    beta_age = -0.03 + rng.normal(0.0, 0.005, n_strata)
    beta_married = 0.3 + rng.normal(0.0, 0.1, n_strata)
    beta_il6 = -0.05 + rng.normal(0.0, 0.02, n_strata)
    sd_doctor = rng.uniform(0.6, 1.0, n_strata)

    # per doctor
    n_doc = rng.integers(g_lo, g_hi + 1, n_strata)
    doc_stratum = np.repeat(np.arange(n_strata), n_doc)
    doc_first = np.concatenate([[0], np.cumsum(n_doc)[:-1]])
    doc_local = np.arange(doc_stratum.size) - doc_first[doc_stratum]
    broken_mask = np.zeros(n_strata, dtype=bool)
    broken_mask[[layout.regions.index(r) for r in layout.broken]] = True
    doc_local[broken_mask[doc_stratum]] = 0
    u = rng.normal(0.0, 1.0, doc_stratum.size) * sd_doctor[doc_stratum]
    v = rng.normal(0.0, 0.3, doc_stratum.size)

    # per patient
    n_rows = rng.integers(r_lo, r_hi + 1, doc_stratum.size)
    row_doc = np.repeat(np.arange(doc_stratum.size), n_rows)
    s = doc_stratum[row_doc]
    n = row_doc.size
    age = np.clip(rng.normal(50.0, 10.0, n), 18.0, 95.0).round(1)
    married = (rng.random(n) < 0.55).astype(np.int64)
    il6 = rng.gamma(2.0, 2.0, n).round(3)
    eta = beta0[s] + beta_age[s] * age + beta_married[s] * married + beta_il6[s] * il6 + u[row_doc]
    remission = (rng.random(n) < 1.0 / (1.0 + np.exp(-eta))).astype(np.int64)
    los = rng.poisson(np.exp(1.0 + 0.01 * (age - 50.0) + 0.05 * il6 + v[row_doc])).astype(np.int64)
    product = _PRODUCTS[rng.choice(3, size=n, p=[0.5, 0.3, 0.2])]
    width = max(2, len(str(g_hi - 1)))
    labels = np.char.add("d", np.char.zfill(np.arange(g_hi).astype(str), width))
    doctor = labels[doc_local[row_doc]]

    table = pa.table({
        "product": pa.array(product, type=pa.string()),
        "doctor": pa.array(doctor, type=pa.string()),
        "age": age,
        "married": married,
        "il6": il6,
        "remission": remission,
        "los": los,
    })
    bounds = np.concatenate([[0], np.cumsum(np.bincount(s, minlength=n_strata))])
    for i, region in enumerate(layout.regions):
        folder = os.path.join(path, f"region={region}")
        os.makedirs(folder, exist_ok=True)
        part = table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
        pq.write_table(part, os.path.join(folder, "part-0.parquet"))
    with open(os.path.join(path, _MARKER), "w", encoding="utf-8") as fh:
        json.dump({
            "n_strata": n_strata, "n_groups": [g_lo, g_hi], "rows_per_group": [r_lo, r_hi],
            "seed": seed, "rows": int(n), "regions": list(layout.regions),
            "broken": list(layout.broken),
        }, fh, indent=1)
    return path


def _prepare(path: str) -> None:
    if not os.path.exists(path):
        os.makedirs(path)
        return
    if not os.path.isdir(path):
        raise FileExistsError(f"demo dataset path {path} exists and is not a folder")
    entries = os.listdir(path)
    if not entries:
        return
    if _MARKER not in entries:
        raise FileExistsError(
            f"demo dataset path {path} is a non-empty folder not written by write_demo_dataset"
        )
    for name in entries:
        full = os.path.join(path, name)
        if name.startswith("region=") and os.path.isdir(full):
            shutil.rmtree(full)
    os.remove(os.path.join(path, _MARKER))


def write_demo_spec(path: str | os.PathLike, dataset_path: str | os.PathLike, *,
                    kind: str = "binomial") -> str:
    """Write a TOML job spec for the demo dataset.

    Parameters
    ----------
    path : str or path-like
        Spec file to write; if it is an existing folder, ``demo.toml`` inside it.
    dataset_path : str or path-like
        The demo dataset folder; written relative to the spec's folder.
    kind : {"binomial", "poisson"}
        Remission (binomial) or length of stay (Poisson).

    Returns
    -------
    str
        Path of the spec file.
    """
    templates = {"binomial": DEMO_SPEC, "poisson": DEMO_POISSON_SPEC}
    if kind not in templates:
        raise ValueError(f"unknown demo kind {kind!r} (valid: {', '.join(templates)})")
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "demo.toml")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    dataset = os.path.relpath(os.path.abspath(os.fspath(dataset_path)), folder)
    text = templates[kind].format(dataset=json.dumps(dataset.replace(os.sep, "/")))
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    return path

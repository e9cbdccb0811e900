"""Strata ledger and results: resume, idempotent re-recording, NULL for NaN, read_table."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import sqlalchemy as sa

from storage import InvalidRecordError, StaleAttemptError, StorageError, Store, StratumPlan
from storage import StratumResult
from storage.models import Coefficient, Fit, RandomEffect, VarianceComponent

KEYS = ["region=north/year=2021", "region=north/year=2022", "region=south/year=2021",
        "region=south/year=2022", "region=west/year=2021"]


def _plans(keys=KEYS) -> list[StratumPlan]:
    return [
        StratumPlan(k, dict(part.split("=") for part in k.split("/")), 100 + i)
        for i, k in enumerate(keys)
    ]


def _result(key: str, shift: float = 0.0, status: str = "succeeded") -> StratumResult:
    """A Gaussian random-slope fit: 2 coefficients, 4 variance rows, 3 groups x 2 modes."""
    return StratumResult(
        key=key,
        status=status,
        fit={
            "nobs": 180, "ngroups": {"Subject": 3}, "loglik": -875.97 + shift,
            "aic": 1763.94, "bic": 1783.1, "deviance": 1751.94, "converged": status == "succeeded",
            "singular": False, "max_grad": 1e-6, "evaluations": 57, "elapsed": 0.05,
            "warnings": [] if status == "succeeded" else ["max|grad| 0.3 > tol"],
            "optinfo": {"optimizer": "L-BFGS-B", "final": [0.93, 0.02, 0.23],
                        "final_gradient": [1e-7, float("nan"), 2e-7]},
            "formula": "Reaction ~ Days + (Days | Subject)", "family": "gaussian",
            "link": "identity", "method": "ML", "reml": False, "sigma": 25.6,
        },
        coefficients=[
            {"term": "(Intercept)", "estimate": 251.4 + shift, "std_error": 6.63,
             "statistic": 37.9, "p_value": 0.0, "conf_low": 238.4, "conf_high": 264.4},
            {"term": "Days", "estimate": 10.47, "std_error": 1.50, "statistic": 6.97,
             "p_value": 3e-12, "conf_low": 7.5, "conf_high": 13.4},
        ],
        variance=[
            {"grp": "Subject", "term1": "(Intercept)", "term2": None, "variance": 565.5,
             "sd": 23.78, "correlation": None},
            {"grp": "Subject", "term1": "Days", "term2": None, "variance": 32.68, "sd": 5.72,
             "correlation": None},
            {"grp": "Subject", "term1": "(Intercept)", "term2": "Days", "variance": 11.06,
             "sd": None, "correlation": 0.081},
            {"grp": "Residual", "term1": None, "term2": None, "variance": 654.9, "sd": 25.59,
             "correlation": None},
        ],
        ranef=[
            {"grp": "Subject", "level": lvl, "term": term, "mode": 1.0 + shift, "cond_sd": 12.0}
            for lvl in ("308", "309", "310")
            for term in ("(Intercept)", "Days")
        ],
    )


@pytest.fixture
def running(store):
    job, _ = store.submit_job(name="j", spec={}, spec_hash="h")
    job = store.claim_job("w")
    store.register_strata(job.id, job.attempt, _plans())
    return job


def _count(store: Store, model, **where) -> int:
    engine = sa.create_engine(store.url)
    try:
        with engine.connect() as conn:
            query = sa.select(sa.func.count()).select_from(model)
            for col, value in where.items():
                query = query.where(getattr(model, col) == value)
            return conn.execute(query).scalar_one()
    finally:
        engine.dispose()


def test_register_is_idempotent(store, running):
    assert store.get_job(running.id).n_strata == 5
    store.record_results(running.id, running.attempt, [_result(KEYS[0])])
    # Re-registering (e.g. on resume) with one new stratum adds it, keeps existing rows.
    store.register_strata(running.id, running.attempt, _plans(KEYS + ["region=east/year=2021"]))
    assert store.get_job(running.id).n_strata == 6
    progress = store.progress(running.id)
    assert progress == {"pending": 5, "succeeded": 1, "not_converged": 0, "failed": 0,
                        "total": 6}


def test_register_many_strata_in_chunks(store):
    store.submit_job(name="big", spec={}, spec_hash="h")
    job = store.claim_job("w")
    keys = [f"k={i:05d}" for i in range(2500)]
    store.register_strata(job.id, job.attempt, [StratumPlan(k, {"k": i}, i) for i, k in
                                                enumerate(keys)])
    assert store.get_job(job.id).n_strata == 2500
    pending = store.pending_strata(job.id)
    assert [p.key for p in pending] == keys
    assert pending[7] == StratumPlan("k=00007", {"k": 7}, 7)


def test_resume_returns_unrecorded_strata(store, running):
    assert [p.key for p in store.pending_strata(running.id)] == KEYS
    done = [KEYS[3], KEYS[0], KEYS[4]]
    assert store.record_results(running.id, running.attempt, [_result(k) for k in done]) == 3
    pending = store.pending_strata(running.id)
    assert [p.key for p in pending] == [KEYS[1], KEYS[2]]
    assert pending[0].values == {"region": "north", "year": "2022"}
    assert pending[0].nrows == 101


def test_rerecording_a_stratum_replaces_its_rows(store, running):
    key = KEYS[1]
    store.record_results(running.id, running.attempt, [_result(key)])
    store.record_results(running.id, running.attempt, [_result(key, shift=1.0)])
    # The same key twice in one batch keeps the last.
    store.record_results(running.id, running.attempt, [_result(key, 5.0), _result(key, 2.0)])
    assert _count(store, Fit, job_id=running.id) == 1
    engine = sa.create_engine(store.url)
    with engine.connect() as conn:
        fit_id = conn.execute(sa.select(Fit.id)).scalar_one()
    engine.dispose()
    assert _count(store, Coefficient) == 2 == _count(store, Coefficient, fit_id=fit_id)
    assert _count(store, VarianceComponent) == 4
    assert _count(store, RandomEffect) == 6
    coefs = store.read_table(running.id, "coefficients")
    assert coefs["estimate"].tolist() == pytest.approx([253.4, 10.47])
    strata = store.read_table(running.id, "strata").set_index("stratum")
    assert strata.loc[key, "attempts"] == 3 and strata.loc[key, "status"] == "succeeded"


def test_failed_result_replaces_an_earlier_fit(store, running):
    key = KEYS[0]
    store.record_results(running.id, running.attempt, [_result(key)])
    failed = StratumResult(key, "failed", error_class="DataError",
                           error_message="column 'y' has 3 levels; binomial needs 2")
    store.record_results(running.id, running.attempt, [failed])
    assert _count(store, Fit) == 0 and _count(store, Coefficient) == 0
    assert _count(store, RandomEffect) == 0
    row = store.read_table(running.id, "strata").set_index("stratum").loc[key]
    assert (row["status"], row["error_class"]) == ("failed", "DataError")
    assert "3 levels" in row["error_message"]


def test_nan_and_inf_are_stored_as_null(store, running):
    r = _result(KEYS[0])
    fit = {**r.fit, "loglik": float("nan"), "aic": float("inf"), "bic": np.float64("-inf"),
           "max_grad": np.nan, "nobs": np.int64(180), "converged": np.bool_(True)}
    coefs = [{**r.coefficients[0], "std_error": float("nan"), "p_value": np.float64("nan")}]
    res = StratumResult(r.key, "succeeded", fit=fit, coefficients=coefs,
                        variance=r.variance, ranef=r.ranef)
    store.record_results(running.id, running.attempt, [res])
    engine = sa.create_engine(store.url)
    with engine.connect() as conn:
        f = conn.execute(sa.select(Fit.loglik, Fit.aic, Fit.bic, Fit.max_grad, Fit.nobs,
                                   Fit.converged, Fit.optinfo, Fit.deviance)).one()
        c = conn.execute(sa.select(Coefficient.std_error, Coefficient.p_value,
                                   Coefficient.estimate)).one()
        v = conn.execute(sa.select(VarianceComponent.correlation)).scalars().all()
    engine.dispose()
    assert (f.loglik, f.aic, f.bic, f.max_grad) == (None, None, None, None)
    assert (f.nobs, f.converged, f.deviance) == (180, True, 1751.94)
    assert f.optinfo["final_gradient"] == [1e-7, None, 2e-7]  # JSON NaN -> null
    assert (c.std_error, c.p_value, c.estimate) == (None, None, 251.4)
    assert v == [None, None, 0.081, None]
    fits = store.read_table(running.id, "fits")
    assert math.isnan(fits.loc[0, "loglik"]) and fits["loglik"].dtype == "float64"
    created = fits.loc[0, "created_at"]
    assert created.tzinfo is not None
    assert abs((pd.Timestamp.now(tz="UTC") - created).total_seconds()) < 600
    assert fits.loc[0, "attempt"] == running.attempt


def _columnar(r: StratumResult, key: str) -> StratumResult:
    """``r`` for stratum ``key`` with its child tables as columns (floats as arrays)."""

    def cols(rows, names, floats):
        return {c: (np.array([np.nan if x[c] is None else x[c] for x in rows]) if c in floats
                    else [x[c] for x in rows]) for c in names}

    return StratumResult(
        key, r.status, fit=r.fit,
        coefficients=cols(r.coefficients, r.coefficients[0], {"estimate", "std_error"}),
        variance=cols(r.variance, r.variance[0], {"variance", "sd", "correlation"}),
        ranef=cols(r.ranef, r.ranef[0], {"mode", "cond_sd"}),
    )


def test_columnar_results_store_the_same_rows(store, running):
    store.record_results(running.id, running.attempt,
                         [_result(KEYS[0]), _columnar(_result(KEYS[1]), KEYS[1])])
    for table in ("fits", "coefficients", "variance", "ranef"):
        frame = store.read_table(running.id, table).drop(columns=["created_at"],
                                                         errors="ignore")
        by_key = {k: g.drop(columns="stratum").reset_index(drop=True)
                  for k, g in frame.groupby("stratum")}
        assert set(by_key) == {KEYS[0], KEYS[1]}, table
        pd.testing.assert_frame_equal(by_key[KEYS[0]], by_key[KEYS[1]])
    var = store.read_table(running.id, "variance")
    assert var["correlation"].isna().sum() == 6  # None and NaN both stored as NULL
    assert _count(store, RandomEffect) == 12


def test_read_table_shapes_and_order(store, running):
    results = [_result(KEYS[4]), _result(KEYS[0]),
               _result(KEYS[2], status="not_converged"),
               StratumResult(KEYS[1], "failed", error_class="FormulaError", error_message="x")]
    store.record_results(running.id, running.attempt, results)
    fitted = [KEYS[0], KEYS[2], KEYS[4]]
    fits = store.read_table(running.id, "fits")
    assert fits.shape == (3, 23)
    assert fits.columns[0] == "stratum" and fits["stratum"].tolist() == fitted
    assert {"id", "job_id", "stratum_id"}.isdisjoint(fits.columns)
    assert fits["converged"].tolist() == [True, False, True]
    assert fits.loc[0, "ngroups"] == {"Subject": 3}
    assert fits.loc[1, "warnings"] == ["max|grad| 0.3 > tol"]
    coefs = store.read_table(running.id, "coefficients")
    assert list(coefs.columns) == ["stratum", "term", "estimate", "std_error", "statistic",
                                   "p_value", "conf_low", "conf_high"]
    assert coefs.shape == (6, 8)
    assert coefs["stratum"].tolist() == [k for k in fitted for _ in range(2)]
    assert coefs["term"].tolist() == ["(Intercept)", "Days"] * 3  # natural order kept
    var = store.read_table(running.id, "variance")
    assert list(var.columns) == ["stratum", "grp", "term1", "term2", "variance", "sd",
                                 "correlation"]
    assert var.shape == (12, 7) and var["grp"].tolist()[:4] == ["Subject"] * 3 + ["Residual"]
    ranef = store.read_table(running.id, "ranef")
    assert list(ranef.columns) == ["stratum", "grp", "level", "term", "mode", "cond_sd"]
    assert ranef.shape == (18, 6)
    strata = store.read_table(running.id, "strata")
    assert list(strata.columns) == ["stratum", "values", "nrows", "status", "attempts",
                                    "error_class", "error_message", "updated_at"]
    assert strata["stratum"].tolist() == KEYS
    assert strata["status"].tolist() == ["succeeded", "failed", "not_converged", "pending",
                                         "succeeded"]
    assert strata.loc[0, "values"] == {"region": "north", "year": "2021"}
    with pytest.raises(ValueError, match="valid: fits, coefficients, variance, ranef, strata"):
        store.read_table(running.id, "random_effects")


def test_read_table_empty_job(store, running):
    for name, ncol in [("fits", 23), ("coefficients", 8), ("variance", 7), ("ranef", 6)]:
        frame = store.read_table(running.id, name)
        assert frame.shape == (0, ncol) and isinstance(frame, pd.DataFrame)


def test_random_effects_can_be_skipped(store, running):
    store.record_results(running.id, running.attempt, [_result(KEYS[0])],
                         store_random_effects=False)
    assert store.read_table(running.id, "ranef").empty
    assert len(store.read_table(running.id, "coefficients")) == 2


def test_mark_strata_error_keeps_strata_pending(store, running):
    store.record_results(running.id, running.attempt, [_result(KEYS[0])])
    n = store.mark_strata_error(running.id, running.attempt, KEYS[:2], "KilledWorker", "boom")
    assert n == 1  # KEYS[0] already has a result: untouched
    strata = store.read_table(running.id, "strata").set_index("stratum")
    assert strata.loc[KEYS[1], "status"] == "pending"
    assert strata.loc[KEYS[1], "attempts"] == 1
    assert strata.loc[KEYS[1], "error_class"] == "KilledWorker"
    assert strata.loc[KEYS[0], "attempts"] == 1
    assert [p.key for p in store.pending_strata(running.id)] == KEYS[1:]


INVALID = [
    (StratumResult(KEYS[0], "done"), "unknown stratum status 'done'"),
    (StratumResult(KEYS[0], "pending"), "must be one of failed, not_converged, succeeded"),
    (StratumResult(KEYS[0], "succeeded"), "needs a 'fit' dict"),
    (StratumResult(KEYS[0], "failed", fit={"nobs": 1}), "carries no estimates"),
    (StratumResult(KEYS[0], "succeeded", fit={"nobs": 1, "AIC": 3.0}),
     r"unknown column\(s\) \['AIC'\]"),
    (StratumResult(KEYS[0], "succeeded", fit={}, coefficients=[{"estimate": 1.0}]),
     r"coefficients\[0\]: missing required column\(s\) \['term'\]"),
    (StratumResult(KEYS[0], "succeeded", fit={"optinfo": {"f": object()}}), "'optinfo'"),
    (StratumResult(KEYS[0], "succeeded", fit={"loglik": "high"}), r"fit: column 'loglik'"),
    (StratumResult(KEYS[0], "succeeded", fit={"nobs": 1.5}), r"fit: column 'nobs'.*integer"),
    (StratumResult(KEYS[0], "succeeded", fit={},
                   variance=[{"grp": "g", "sd": 1.0}, {"grp": "g", "sd": [1.0]}]),
     r"variance\[1\]: column 'sd'"),
    (StratumResult("region=nowhere", "failed"), "unregistered strata"),
]


def test_invalid_results_write_nothing(store, running):
    good = _result(KEYS[1])
    for result, match in INVALID:
        with pytest.raises(InvalidRecordError, match=match):
            store.record_results(running.id, running.attempt, [good, result])
    assert _count(store, Fit) == 0
    assert store.progress(running.id)["pending"] == 5


def test_record_results_is_fenced_before_writing(store, running):
    with pytest.raises(StaleAttemptError):
        store.record_results(running.id, running.attempt + 1, [_result(KEYS[0])])
    assert _count(store, Fit) == 0


# ---------------------------------------------------------------- driver-level inserts
# (COPY on PostgreSQL, executemany on SQLite: the same rows must come back)

AWKWARD = ["tab\there", "new\nline", "cr\rreturn", "back\\slash", "\\N", "\\\\N", "",
           "quote ' and \"", "Zürich ∑ 😀", "end\\"]


def test_awkward_text_and_extreme_numbers_round_trip(store, running):
    r = _result(KEYS[0])
    fit = {**r.fit, "formula": "y ~ x\t+ (1 | g)\n", "link": "\\N", "method": "",
           "warnings": ["line 1\nline 2", "back\\slash \\N", "tab\t"],
           "optinfo": {"message": "a\\b\n\"c\"",
                       "values": [0.1 + 0.2, 5e-324, 1.7976931348623157e308]},
           "loglik": 0.1 + 0.2, "aic": 5e-324, "bic": -1.7976931348623157e308, "nobs": 2**31 - 1,
           "converged": False, "singular": True}
    coefs = [{**r.coefficients[0], "term": t, "estimate": 1.0 / 3.0 + i}
             for i, t in enumerate(AWKWARD)]
    ranef = [{"grp": g, "level": lvl, "term": "(Intercept)", "mode": -0.0,
              "cond_sd": 2.2250738585072014e-308}
             for g in ("g\tx", "\\N") for lvl in AWKWARD]
    res = StratumResult(r.key, "not_converged", fit=fit, coefficients=coefs,
                        variance=r.variance, ranef=ranef)
    store.record_results(running.id, running.attempt, [res])
    fits = store.read_table(running.id, "fits")
    row = fits.iloc[0]
    assert (row["formula"], row["link"], row["method"]) == (fit["formula"], "\\N", "")
    assert row["warnings"] == fit["warnings"] and row["optinfo"] == fit["optinfo"]
    assert (row["loglik"], row["aic"], row["bic"]) == (0.1 + 0.2, 5e-324, -1.7976931348623157e308)
    assert (row["nobs"], bool(row["converged"]), bool(row["singular"])) == (2**31 - 1, False, True)
    co = store.read_table(running.id, "coefficients")
    assert co["term"].tolist() == AWKWARD
    assert co["estimate"].tolist() == [1.0 / 3.0 + i for i in range(len(AWKWARD))]
    re = store.read_table(running.id, "ranef")
    assert sorted(zip(re["grp"], re["level"])) == sorted((g, lvl) for g in ("g\tx", "\\N")
                                                         for lvl in AWKWARD)
    assert set(re["cond_sd"]) == {2.2250738585072014e-308} and re["mode"].eq(0.0).all()


@pytest.mark.postgres
def test_copy_error_raises_like_executemany(pg_url):
    from storage.results import insert_rows

    store = Store(pg_url)
    store.upgrade()
    engine = sa.create_engine(pg_url)
    try:
        with pytest.raises(sa.exc.IntegrityError, match="foreign key"):
            with engine.begin() as conn:  # no fit 999999: the row breaks the foreign key
                insert_rows(conn, RandomEffect.__table__,
                            ("fit_id", "grp", "level", "term", "mode", "cond_sd"),
                            [(999999, "g", "l", "(Intercept)", 1.0, 1.0)])
        with engine.connect() as conn:  # the pool's connection is still usable
            assert conn.execute(sa.select(sa.func.count()).select_from(RandomEffect)).scalar() == 0
    finally:
        engine.dispose()
        store.dispose()


@pytest.mark.postgres
def test_connection_lost_during_copy_is_retried_without_duplicates(pg_url, monkeypatch):
    import time

    import psycopg

    import storage.results as results

    store = Store(pg_url)
    store.upgrade()
    try:
        job, _ = store.submit_job(name="j", spec={}, spec_hash="h")
        job = store.claim_job("w")
        store.register_strata(job.id, job.attempt, _plans())
        real = results._copy_rows
        killed = []

        def kill_then_copy(conn, table, columns, rows):
            if not killed:  # the server drops this session before the first COPY
                pid = conn.connection.driver_connection.info.backend_pid
                admin_url = pg_url.replace("postgresql+psycopg", "postgresql")
                with psycopg.connect(admin_url, autocommit=True) as admin:
                    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
                    while admin.execute("SELECT 1 FROM pg_stat_activity WHERE pid = %s",
                                        (pid,)).fetchone():
                        time.sleep(0.01)
                killed.append(pid)
            return real(conn, table, columns, rows)

        monkeypatch.setattr(results, "_copy_rows", kill_then_copy)
        batch = [_result(k) for k in KEYS]
        with pytest.raises(StorageError) as err:
            store.record_results(job.id, job.attempt, batch)
        cause = err.value.__cause__
        assert isinstance(cause, sa.exc.OperationalError) and cause.connection_invalidated
        assert killed and _count(store, Fit) == 0  # rolled back with the session
        assert store.record_results(job.id, job.attempt, batch) == len(KEYS)  # the retry
        assert _count(store, Fit) == len(KEYS) and _count(store, RandomEffect) == 6 * len(KEYS)
        assert store.progress(job.id)["pending"] == 0
    finally:
        store.dispose()

"""The ``stratafit`` command line: exit codes, status, cancel, results export."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from service.api import open_store, submit
from service.cli import (
    EXIT_CANCELLED,
    EXIT_CLUSTER,
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_OK,
    EXIT_STORAGE,
    EXIT_USAGE,
    EXIT_WITH_ERRORS,
    build_parser,
    exit_code_for_error,
    exit_code_for_status,
    main,
)
from service.progress import ProgressPrinter, format_progress
from tests.service.service_helpers import (  # noqa: F401  (fixtures)
    demo_job,
    local_cluster,
    write_job,
)


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'cli.db'}"


@pytest.fixture(scope="module")
def finished(demo_job, local_cluster, tmp_path_factory):
    """The demo job run once through the CLI on the module's cluster."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'done.db'}"
    code = main(["run", str(demo_job["spec"]), "--store", url,
                 "--scheduler", local_cluster.scheduler_address, "--no-progress"])
    (job,) = open_store(url).list_jobs()
    return {"url": url, "code": code, "job": job, **demo_job}


# ----------------------------------------------------------------- exit codes


def test_exit_code_table_is_in_help(capsys):
    assert main(["--help"]) == EXIT_OK
    out = capsys.readouterr().out
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "5 ", "6 ", "130"):
        assert f"  {code}" in out
    assert "exit codes" in build_parser().format_help()
    assert main(["run", "--help"]) == EXIT_OK
    assert "exit codes" in capsys.readouterr().out


def test_status_exit_codes():
    assert exit_code_for_status("succeeded") == EXIT_OK
    assert exit_code_for_status("succeeded_with_errors") == EXIT_WITH_ERRORS
    assert exit_code_for_status("failed") == EXIT_FAILED
    assert exit_code_for_status("cancelled") == EXIT_CANCELLED


def test_error_exit_codes():
    from service.cluster import ClusterUnavailable
    from service.runner import StorageUnavailable
    from service.spec import SpecError
    from storage.errors import JobNotFound, StorageError

    assert exit_code_for_error(SpecError("family", "bad"))[0] == EXIT_USAGE
    assert exit_code_for_error(JobNotFound(4))[0] == EXIT_USAGE
    assert exit_code_for_error(StorageError("down"))[0] == EXIT_STORAGE
    assert exit_code_for_error(StorageUnavailable("down"))[0] == EXIT_STORAGE
    assert exit_code_for_error(ClusterUnavailable("gone"))[0] == EXIT_CLUSTER
    assert exit_code_for_error(RuntimeError("bug"))[0] == EXIT_INTERNAL


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["results", "1", "--format", "xml"],
        ["results", "one"],
        ["run", "spec.toml", "--workers", "0"],
        ["worker", "--poll", "-1"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == EXIT_USAGE


def test_parquet_needs_out(url, capsys):
    assert main(["results", "1", "--format", "parquet", "--store", url]) == EXIT_USAGE
    assert "--out" in capsys.readouterr().err


def test_missing_spec_file_exits_2(url, tmp_path, capsys):
    assert main(["submit", str(tmp_path / "nope.toml"), "--store", url]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "nope.toml" in err and "Traceback" not in err


def test_storage_unavailable_exits_5(capsys):
    assert main(["status", "--store", "postgresql://nobody@127.0.0.1:1/none"]) == EXIT_STORAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("stratafit: storage unavailable") and len(err.splitlines()) == 1


@pytest.mark.postgres
def test_unmigrated_postgres_says_db_upgrade(pg_url, capsys):
    assert main(["status", "--store", pg_url]) == EXIT_STORAGE
    assert "stratafit db upgrade" in capsys.readouterr().err
    assert main(["db", "upgrade", "--store", pg_url]) == EXIT_OK
    assert main(["status", "--store", pg_url]) == EXIT_OK
    assert "no jobs" in capsys.readouterr().out


def test_invalid_store_url_exits_2(capsys):
    assert main(["status", "--store", "nosuchdb://x"]) == EXIT_USAGE


def test_cluster_unavailable_exits_6_and_requeues(tmp_path, url, monkeypatch, capsys):
    job = write_job(tmp_path, n_strata=2, broken=0)
    monkeypatch.setenv("STRATAFIT_SCHEDULER_TIMEOUT", "1")
    code = main(["run", str(job["spec"]), "--store", url, "--scheduler", "tcp://127.0.0.1:1"])
    assert code == EXIT_CLUSTER
    assert "cannot connect to Dask scheduler" in capsys.readouterr().err
    (rec,) = open_store(url).list_jobs()
    assert rec.status == "queued" and "cluster unavailable" in rec.message


def test_worker_once_on_empty_queue(url, capsys):
    assert main(["worker", "--once", "--store", url, "--scheduler", "tcp://127.0.0.1:1"]) == 0
    assert "queue empty" in capsys.readouterr().out


# ----------------------------------------------------------------- status / cancel


def test_status_and_cancel(tmp_path, url, capsys):
    job = write_job(tmp_path, n_strata=2, broken=0)
    assert main(["status", "--store", url]) == EXIT_OK
    assert "no jobs" in capsys.readouterr().out
    assert main(["submit", str(job["spec"]), "--store", url,
                 "--idempotency-key", "k1"]) == EXIT_OK
    assert "queued" in capsys.readouterr().out
    assert main(["submit", str(job["spec"]), "--store", url,
                 "--idempotency-key", "k1"]) == EXIT_OK
    assert "already submitted" in capsys.readouterr().out
    assert len(open_store(url).list_jobs()) == 1
    assert main(["status", "--store", url]) == EXIT_OK
    out = capsys.readouterr().out
    assert "demo-remission-by-region" in out and "queued" in out
    assert main(["status", "1", "--store", url]) == EXIT_OK
    assert "status     queued" in capsys.readouterr().out
    assert main(["status", "7", "--store", url]) == EXIT_USAGE
    assert "job 7 not found" in capsys.readouterr().err
    assert main(["cancel", "1", "--store", url]) == EXIT_OK
    assert open_store(url).get_job(1).status == "cancelled"
    assert main(["cancel", "1", "--store", url]) == EXIT_USAGE  # already cancelled
    assert main(["cancel", "9", "--store", url]) == EXIT_USAGE


# ----------------------------------------------------------------- results


def test_run_exit_code_and_status(finished, capsys):
    assert finished["code"] == EXIT_WITH_ERRORS
    job = finished["job"]
    assert main(["status", str(job.id), "--store", finished["url"]]) == EXIT_OK
    out = capsys.readouterr().out
    assert "succeeded_with_errors" in out
    assert f"{len(finished['regions']) - 1} succeeded" in out and "1 failed" in out


def test_rerun_with_same_key_returns_the_finished_job(finished, local_cluster, capsys):
    store = open_store(finished["url"])
    rec = submit(finished["spec"], store=store, idempotency_key="again")
    store.cancel_job(rec.id)  # a cancelled job is returned as it is, not rerun
    code = main(["run", str(finished["spec"]), "--store", finished["url"],
                 "--idempotency-key", "again", "--scheduler",
                 local_cluster.scheduler_address, "--no-progress"])
    assert code == EXIT_CANCELLED
    assert store.progress(rec.id)["total"] == 0


@pytest.mark.parametrize("table", ["fits", "coefficients", "variance", "ranef", "strata"])
def test_results_csv_roundtrip(finished, tmp_path, table):
    out = tmp_path / f"{table}.csv"
    assert main(["results", str(finished["job"].id), "--table", table, "--format", "csv",
                 "--out", str(out), "--store", finished["url"]]) == EXIT_OK
    frame = pd.read_csv(out)
    stored = open_store(finished["url"]).read_table(finished["job"].id, table)
    assert len(frame) == len(stored) > 0
    assert list(frame.columns) == list(stored.columns)
    assert (frame["stratum"].to_numpy() == stored["stratum"].to_numpy()).all()
    if table == "coefficients":
        assert frame["estimate"].to_numpy() == pytest.approx(stored["estimate"].to_numpy(),
                                                             rel=1e-12)


def test_results_parquet(finished, tmp_path):
    out = tmp_path / "fits.parquet"
    assert main(["results", str(finished["job"].id), "--format", "parquet",
                 "--out", str(out), "--store", finished["url"]]) == EXIT_OK
    frame = pd.read_parquet(out)
    stored = open_store(finished["url"]).read_table(finished["job"].id, "fits")
    assert len(frame) == len(stored) == len(finished["regions"]) - 1
    assert frame["loglik"].to_numpy() == pytest.approx(stored["loglik"].to_numpy())
    # JSON columns are exported as JSON text
    assert isinstance(json.loads(frame["optinfo"].iloc[0]), dict)


def test_results_table_to_stdout(finished, capsys):
    assert main(["results", str(finished["job"].id), "--table", "coefficients",
                 "--store", finished["url"]]) == EXIT_OK
    out = capsys.readouterr().out
    assert "(Intercept)" in out and "estimate" in out


def _entry(*argv: str) -> subprocess.CompletedProcess:
    """The console script's entry point (``service.cli:entry``, prompt exit) in a process."""
    code = "import sys; from service.cli import entry; sys.argv[0] = 'stratafit'; entry()"
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          timeout=120)


def test_console_entry_exits_promptly_with_complete_output(finished, tmp_path):
    """``entry`` ends the process with ``os._exit`` once the command is done: the exit code,
    a written file and both standard streams must be complete all the same."""
    job = str(finished["job"].id)
    out = tmp_path / "coef.csv"
    done = _entry("results", job, "--table", "coefficients", "--format", "csv", "--out", str(out),
                  "--store", finished["url"])
    assert done.returncode == EXIT_OK, done.stderr
    stored = open_store(finished["url"]).read_table(finished["job"].id, "coefficients")
    assert len(pd.read_csv(out)) == len(stored) > 0
    shown = _entry("results", job, "--table", "ranef", "--format", "csv", "--store", finished["url"])
    assert shown.returncode == EXIT_OK
    ranef = open_store(finished["url"]).read_table(finished["job"].id, "ranef")
    assert len(shown.stdout.strip().splitlines()) == len(ranef) + 1  # header and every row
    status = _entry("status", job, "--store", finished["url"])
    assert status.returncode == EXIT_OK and "succeeded_with_errors" in status.stdout
    missing = _entry("status", "999", "--store", finished["url"])
    assert missing.returncode == EXIT_USAGE and "job 999 not found" in missing.stderr


def test_results_unknown_job(url, capsys):
    assert main(["results", "42", "--store", url]) == EXIT_USAGE


# ----------------------------------------------------------------- progress line


def test_progress_line_format():
    assert format_progress(120, 1, 200, 35.2) == "strata 120/200 done, 1 failed, 35.2/s, ETA 2s"
    assert format_progress(0, 0, 10, 0.0).endswith("ETA ?")


def test_progress_printer_tty_and_plain():
    import io

    buf = io.StringIO()
    p = ProgressPrinter(buf, tty=True)
    p(1, 0, 4, 1.0)
    p(4, 1, 4, 2.0)
    p.close()
    assert buf.getvalue().startswith("\rstrata 1/4") and buf.getvalue().endswith("\n")
    assert "\rstrata 4/4 done, 1 failed" in buf.getvalue()
    buf = io.StringIO()
    p = ProgressPrinter(buf, tty=False, log_every=3600)
    p(1, 0, 4, 1.0)
    p(2, 0, 4, 1.0)  # within log_every: skipped
    p(4, 0, 4, 1.0)
    p(4, 0, 4, 0.9)  # the final line only once
    assert buf.getvalue().splitlines() == [
        "strata 1/4 done, 0 failed, 1.0/s, ETA 3s",
        "strata 4/4 done, 0 failed, 1.0/s, ETA 0s",
    ]


@pytest.mark.distributed
def test_demo_exits_0_when_only_the_planted_stratum_fails(tmp_path, capsys):
    # the quick start's first command: the demo plants one broken stratum (one doctor), which
    # fails alone; that is the demo working, so the command succeeds (exit 0), and says why
    code = main(["demo", "--dir", str(tmp_path / "demo"), "--strata", "12", "--workers", "1",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == EXIT_OK
    assert "succeeded_with_errors - 11 of 12 strata fitted (1 failed)" in out
    assert "failed stratum region=" in out and "only 1 level" in out
    assert "the demo plants 1 broken stratum" in out


@pytest.mark.distributed
def test_run_with_a_started_cluster(demo_job, local_cluster, url):
    # the CLI starts connecting before it imports the rest of the service and hands the
    # start to run(), which uses it and closes it at the end
    from service.api import run
    from service.cluster import ClusterStarter

    starter = ClusterStarter(local_cluster.scheduler_address, None)
    job = run(str(demo_job["spec"]), store=url, progress=False, echo=None, starter=starter)
    assert job.status in ("succeeded", "succeeded_with_errors")
    assert starter.future.done() and starter._cm is None  # connected, then closed by run
    both = ClusterStarter(local_cluster.scheduler_address, None)
    with pytest.raises(ValueError, match="client or a starter"):
        run(str(demo_job["spec"]), store=url, client=object(), starter=both)
    assert both._cm is None  # closed although run refused

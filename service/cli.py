"""``stratafit``: the command line of the service.

Commands
--------
``run SPEC``                 submit a job and run it now (local cluster unless ``--scheduler``)
``submit SPEC``              validate and queue a job (for ``stratafit worker``)
``worker``                   consume the queue (``--once``: one job, or exit 0 if empty)
``status [JOB]``             list jobs, or one job with its strata counts
``cancel JOB``               cancel a queued or running job
``results JOB``              print or export a result table (csv, parquet)
``demo``                     write a demo dataset + spec and run it end to end
``db upgrade``               create or migrate the database schema

``--store`` defaults to ``$STRATAFIT_STORE``, else ``sqlite:///stratafit.db``. A SQLite
store is migrated automatically; run ``stratafit db upgrade`` once for PostgreSQL.
Errors print one line on stderr (``--debug`` adds the traceback).

Exit codes
----------
===  ==============================================================================
0    success (job ``succeeded``; ``worker --once`` with an empty queue; ``demo`` whose only
     failure is the stratum it plants; other commands)
1    job finished ``succeeded_with_errors`` (some strata failed or did not converge)
2    usage or spec error (bad spec, bad arguments, unknown job)
3    job ``failed``
4    job ``cancelled``
5    storage/database unavailable
6    Dask cluster unavailable
70   internal error (a bug: rerun with ``--debug`` and report the traceback)
130  interrupted (Ctrl-C or SIGTERM; a running job is requeued)
===  ==============================================================================
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Sequence
from typing import Any

__all__ = [
    "main",
    "build_parser",
    "exit_code_for_status",
    "exit_code_for_error",
    "EXIT_OK",
    "EXIT_WITH_ERRORS",
    "EXIT_USAGE",
    "EXIT_FAILED",
    "EXIT_CANCELLED",
    "EXIT_STORAGE",
    "EXIT_CLUSTER",
    "EXIT_INTERNAL",
    "EXIT_INTERRUPTED",
]

EXIT_OK = 0
EXIT_WITH_ERRORS = 1
EXIT_USAGE = 2
EXIT_FAILED = 3
EXIT_CANCELLED = 4
EXIT_STORAGE = 5
EXIT_CLUSTER = 6
EXIT_INTERNAL = 70
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = """\
exit codes:
  0    success (job succeeded; worker --once with an empty queue; demo whose only
       failure is the stratum it plants)
  1    job finished succeeded_with_errors
  2    usage or spec error (bad spec, bad arguments, unknown job)
  3    job failed
  4    job cancelled
  5    storage/database unavailable
  6    Dask cluster unavailable
  70   internal error (rerun with --debug)
  130  interrupted (Ctrl-C / SIGTERM; a running job is requeued)

--store defaults to $STRATAFIT_STORE, else sqlite:///stratafit.db;
--scheduler defaults to $DASK_SCHEDULER_ADDRESS, else a local cluster."""

_STATUS_EXIT = {
    "succeeded": EXIT_OK,
    "succeeded_with_errors": EXIT_WITH_ERRORS,
    "failed": EXIT_FAILED,
    "cancelled": EXIT_CANCELLED,
    "queued": EXIT_OK,
    "running": EXIT_OK,
}

DEMO_DIR = "stratafit-demo"


class UsageError(Exception):
    """Bad command-line usage detected after parsing (exit code 2)."""


def exit_code_for_status(status: str) -> int:
    """Exit code for a job's final status (``queued``/``running``: 0, handled elsewhere)."""
    return _STATUS_EXIT.get(str(status), EXIT_INTERNAL)


def _names(exc: BaseException) -> set[str]:
    return {c.__name__ for c in type(exc).__mro__}


def exit_code_for_error(exc: BaseException) -> tuple[int, str]:
    """Map an exception to ``(exit code, one-line message)``.

    Parameters
    ----------
    exc : BaseException

    Returns
    -------
    (int, str)
    """
    names = _names(exc)
    module = type(exc).__module__ or ""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED, "interrupted"
    if "SpecError" in names:
        return EXIT_USAGE, str(exc)
    if isinstance(exc, UsageError):
        return EXIT_USAGE, str(exc)
    if "JobNotFound" in names:
        return EXIT_USAGE, str(exc)
    if "InvalidTransition" in names:
        return EXIT_USAGE, str(exc)
    if "ClusterUnavailable" in names:
        return EXIT_CLUSTER, str(exc)
    if module.startswith("sqlalchemy") and names & {"ArgumentError", "NoSuchModuleError"}:
        return EXIT_USAGE, f"invalid store URL: {exc}"
    if "InvalidRecordError" in names:
        return EXIT_INTERNAL, f"internal error: {exc}"
    if names & {"StorageUnavailable", "StorageError"} or module.startswith(("sqlalchemy", "psycopg")):
        text = _first_line(exc)
        hint = ""
        if "no such table" in text or ("relation" in text and "does not exist" in text):
            hint = " (schema missing: run `stratafit db upgrade --store URL`)"
        return EXIT_STORAGE, f"storage unavailable: {text}{hint}"
    return EXIT_INTERNAL, f"internal error: {type(exc).__name__}: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _err(message: str) -> None:
    print(f"stratafit: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ parser


def _add_store(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", metavar="URL", default=None,
                   help="database URL (default $STRATAFIT_STORE or sqlite:///stratafit.db)")


def _add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", metavar="ADDR", default=None,
                   help="Dask scheduler address or scheduler file (default "
                        "$DASK_SCHEDULER_ADDRESS, else a local cluster)")
    p.add_argument("--workers", metavar="N", type=_positive_int, default=None,
                   help="workers of the local cluster (default: one per core)")


def _add_runner(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lease-seconds", metavar="S", type=_positive_float, default=60.0,
                   help="job lease; renewed every S/3 seconds (default 60)")
    p.add_argument("--write-batch", metavar="N", type=_positive_int, default=200,
                   help="results written per database transaction (default 200)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``stratafit`` argument parser (exit codes in the epilog)."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="stratafit",
        description="Fit one GLMM per stratum of a Parquet dataset on a Dask cluster; "
                    "results go to SQL.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="submit a job and run it now", epilog=EXIT_CODES_HELP,
                       formatter_class=fmt)
    p.add_argument("spec", metavar="SPEC", help="job spec (TOML)")
    _add_store(p)
    _add_cluster(p)
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.add_argument("--idempotency-key", metavar="K", default=None,
                   help="reuse (resume) the job submitted with this key")
    _add_runner(p)
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("submit", help="validate and queue a job", epilog=EXIT_CODES_HELP,
                       formatter_class=fmt)
    p.add_argument("spec", metavar="SPEC", help="job spec (TOML)")
    _add_store(p)
    p.add_argument("--idempotency-key", metavar="K", default=None,
                   help="submitting the same key again returns the first job")
    p.set_defaults(func=_cmd_submit)

    p = sub.add_parser("worker", help="consume the job queue", epilog=EXIT_CODES_HELP,
                       formatter_class=fmt)
    _add_store(p)
    _add_cluster(p)
    p.add_argument("--once", action="store_true",
                   help="run at most one job, exit 0 if the queue is empty")
    p.add_argument("--poll", metavar="S", type=_positive_float, default=2.0,
                   help="seconds between claims while the queue is empty (default 2)")
    p.add_argument("--progress", action="store_true", help="progress line on stderr")
    _add_runner(p)
    p.set_defaults(func=_cmd_worker)

    p = sub.add_parser("status", help="list jobs, or show one job", formatter_class=fmt,
                       epilog=EXIT_CODES_HELP)
    p.add_argument("job", metavar="JOB", nargs="?", type=int, default=None)
    _add_store(p)
    p.add_argument("--limit", type=_positive_int, default=20, help="jobs listed (default 20)")
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("cancel", help="cancel a queued or running job", formatter_class=fmt,
                       epilog=EXIT_CODES_HELP)
    p.add_argument("job", metavar="JOB", type=int)
    _add_store(p)
    p.set_defaults(func=_cmd_cancel)

    p = sub.add_parser("results", help="print or export a result table", formatter_class=fmt,
                       epilog=EXIT_CODES_HELP)
    p.add_argument("job", metavar="JOB", type=int)
    _add_store(p)
    p.add_argument("--table", default="fits",
                   choices=("fits", "coefficients", "variance", "ranef", "strata"))
    p.add_argument("--format", default="table", choices=("table", "csv", "parquet"))
    p.add_argument("--out", metavar="FILE", default=None,
                   help="write to FILE (required for parquet)")
    p.set_defaults(func=_cmd_results)

    p = sub.add_parser("demo", help="run a demo job end to end", formatter_class=fmt,
                       epilog=EXIT_CODES_HELP)
    p.add_argument("--dir", default=DEMO_DIR, help=f"where to write (default ./{DEMO_DIR})")
    p.add_argument("--strata", type=_positive_int, default=200, help="strata (default 200)")
    _add_store(p)
    p.add_argument("--workers", metavar="N", type=_positive_int, default=None,
                   help="workers of the local cluster (default: one per core)")
    p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("db", help="database administration")
    dbsub = p.add_subparsers(dest="db_command", metavar="ACTION", required=True)
    q = dbsub.add_parser("upgrade", help="create or migrate the schema to the latest version")
    _add_store(q)
    q.set_defaults(func=_cmd_db_upgrade)
    return parser


# ------------------------------------------------------------------ helpers


def _summary(job: Any) -> str:
    msg = f" - {job.message}" if job.message else ""
    return f"job {job.id} ({job.name}): {job.status}{msg}"


def _job_exit(job: Any) -> int:
    if job.status in ("queued", "running"):
        _err(f"job {job.id} is {job.status} (held by another consumer); not run here")
    return exit_code_for_status(job.status)


def _runner_options(args: argparse.Namespace) -> dict[str, Any]:
    return {"lease_seconds": args.lease_seconds, "write_batch": args.write_batch}


def _jsonish_columns(frame: Any) -> Any:
    """Dict/list cells (ngroups, optinfo, values, warnings) → JSON text, for CSV/Parquet."""
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == object and frame[col].map(
            lambda v: isinstance(v, (dict, list, tuple))
        ).any():
            frame[col] = frame[col].map(
                lambda v: json.dumps(v, default=str) if isinstance(v, (dict, list, tuple)) else v
            )
    return frame


# ------------------------------------------------------------------ commands


def _start_cluster(scheduler: str | None, n_workers: int | None):
    """Start connecting before the rest of the service is imported (see ``run``'s ``starter``).

    The workers boot (imports, fitter preload: ~1-2 s) while this process imports storage,
    pandas and the runner and validates the spec.
    """
    from service.cluster import ClusterStarter, stderr_echo

    return ClusterStarter(scheduler, n_workers, echo=stderr_echo)


def _cmd_run(args: argparse.Namespace) -> int:
    from service.spec import load_spec

    spec = load_spec(args.spec)  # a malformed spec fails here, before any cluster starts
    starter = _start_cluster(args.scheduler, args.workers)
    try:
        from service.api import run
    except BaseException:
        starter.close()
        raise
    job = run(
        spec,
        store=args.store,
        progress=not args.no_progress,
        idempotency_key=args.idempotency_key,
        interrupt=_interrupt_event(),
        starter=starter,
        **_runner_options(args),
    )
    print(_summary(job))
    return _job_exit(job)


def _cmd_submit(args: argparse.Namespace) -> int:
    from service.api import submit_ex

    job, created = submit_ex(args.spec, store=args.store, idempotency_key=args.idempotency_key)
    if created:
        print(f"job {job.id} ({job.name}) queued")
    else:
        print(f"job {job.id} ({job.name}) already submitted with key "
              f"{args.idempotency_key!r}: {job.status}")
    return EXIT_OK


def _cmd_worker(args: argparse.Namespace) -> int:
    from service.api import work

    jobs = work(
        args.store,
        args.scheduler,
        once=args.once,
        poll=args.poll,
        n_workers=args.workers,
        progress=args.progress,
        stop=_interrupt_event(),
        **_runner_options(args),
    )
    if args.once:
        if not jobs:
            print("queue empty")
            return EXIT_OK
        print(_summary(jobs[-1]))
        return exit_code_for_status(jobs[-1].status)
    return EXIT_OK


def _fmt_time(value: Any) -> str:
    if value is None:
        return "-"
    try:
        return value.strftime("%Y-%m-%d %H:%M:%S")
    except AttributeError:
        return str(value)


def _cmd_status(args: argparse.Namespace) -> int:
    import pandas as pd

    from service.api import open_store

    store = open_store(args.store)
    if args.job is None:
        jobs = store.list_jobs(limit=args.limit)
        if not jobs:
            print("no jobs")
            return EXIT_OK
        frame = pd.DataFrame(
            [
                {
                    "id": j.id,
                    "name": j.name,
                    "status": j.status,
                    "attempt": j.attempt,
                    "strata": "-" if j.n_strata is None else j.n_strata,
                    "created": _fmt_time(j.created_at),
                    "finished": _fmt_time(j.finished_at),
                    "message": (j.message or "")[:60],
                }
                for j in jobs
            ]
        )
        print(frame.to_string(index=False))
        return EXIT_OK
    job = store.get_job(args.job)
    counts = store.progress(job.id)
    lines = [
        f"job        {job.id}",
        f"name       {job.name}",
        f"status     {job.status}",
        f"attempt    {job.attempt}",
        f"owner      {job.lease_owner or '-'}",
        f"created    {_fmt_time(job.created_at)}",
        f"started    {_fmt_time(job.started_at)}",
        f"finished   {_fmt_time(job.finished_at)}",
        f"message    {job.message or '-'}",
        "strata     " + ", ".join(
            f"{n} {name}" for name, n in counts.items() if name != "total"
        ) + f" (total {counts.get('total', 0)})",
    ]
    print("\n".join(lines))
    return EXIT_OK


def _cmd_cancel(args: argparse.Namespace) -> int:
    from service.api import open_store

    job = open_store(args.store).cancel_job(args.job)
    print(f"job {job.id} ({job.name}) cancelled")
    return EXIT_OK


def _cmd_results(args: argparse.Namespace) -> int:
    import pandas as pd

    from service.api import results

    if args.format == "parquet" and not args.out:
        raise UsageError("--format parquet needs --out FILE")
    frame = results(args.job, args.table, store=args.store)
    if args.format == "table":
        with pd.option_context("display.max_rows", None, "display.max_columns", None,
                               "display.width", 200):
            text = frame.to_string(index=False) if len(frame) else f"(no {args.table} rows)"
        if args.out:
            with open(args.out, "w", encoding="utf-8") as fh:
                fh.write(text + "\n")
        else:
            print(text)
    elif args.format == "csv":
        out = _jsonish_columns(frame)
        if args.out:
            out.to_csv(args.out, index=False)
        else:
            out.to_csv(sys.stdout, index=False)
    else:
        _jsonish_columns(frame).to_parquet(args.out, index=False)
    if args.out:
        print(f"wrote {len(frame)} rows of {args.table} to {args.out}", file=sys.stderr)
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    root = os.path.abspath(args.dir)
    os.makedirs(root, exist_ok=True)
    data = os.path.join(root, "data")
    spec_path = os.path.join(root, "spec.toml")
    starter = _start_cluster(None, args.workers)  # the workers boot while the data is written
    try:
        import pandas as pd

        from service.api import results, run
        from service.demo import demo_layout, write_demo_dataset, write_demo_spec

        write_demo_dataset(data, n_strata=args.strata)
        write_demo_spec(spec_path, data)
    except BaseException:
        starter.close()
        raise
    db_path = os.path.join(root, "stratafit.db")
    store = args.store or f"sqlite:///{db_path}"
    print(f"demo dataset: {data}\ndemo spec:    {spec_path}\nstore:        {store}",
          file=sys.stderr)
    job = run(spec_path, store=store, progress=not args.no_progress,
              interrupt=_interrupt_event(), starter=starter)
    print(_summary(job))
    coefs = results(job.id, "coefficients", store=store)
    if len(coefs):
        wide = coefs.pivot_table(index="stratum", columns="term", values="estimate",
                                 sort=False)
        with pd.option_context("display.width", 200, "display.max_columns", None):
            print(f"\nfixed-effect estimates, first strata (of {wide.shape[0]}):")
            print(wide.head(8).round(4).to_string())
    strata = results(job.id, "strata", store=store)
    failed = strata[strata["status"] == "failed"]
    for row in failed.head(5).itertuples(index=False):
        print(f"failed stratum {row.stratum}: {row.error_class}: "
              f"{(row.error_message or '').splitlines()[0] if row.error_message else ''}")
    planted = {f"region={r}" for r in demo_layout(args.strata).broken}
    as_planted = (job.status == "succeeded_with_errors" and set(failed["stratum"]) == planted
                  and bool((strata["status"][~strata["stratum"].isin(planted)] == "succeeded").all()))
    if as_planted:
        print(f"(the demo plants {len(planted)} broken stratum{'' if len(planted) == 1 else 'a'}, "
              "one doctor only: it fails alone, the others are fitted)")
    query = (
        "SELECT s.key AS stratum, c.term, c.estimate, c.std_error FROM coefficients c "
        "JOIN fits f ON c.fit_id = f.id JOIN strata s ON f.stratum_id = s.id "
        f"WHERE f.job_id = {job.id} ORDER BY s.key, c.id LIMIT 10;"
    )
    print("\nquery the results yourself:")
    if store.startswith("sqlite:///"):
        print(f'  sqlite3 {store[len("sqlite:///"):]} "{query}"')
    else:
        print(f"  {query}")
    print(f"  stratafit results {job.id} --table coefficients --store {store}")
    # the planted failure is the demo working as designed; anything else keeps its code
    return EXIT_OK if as_planted else exit_code_for_status(job.status)


def _cmd_db_upgrade(args: argparse.Namespace) -> int:
    from service.api import open_store

    store = open_store(args.store, upgrade=True)
    print(f"database schema up to date ({getattr(store, 'url', args.store)})")
    return EXIT_OK


# ------------------------------------------------------------------ entry point


def _configure_logging(debug: bool) -> None:
    """Warnings only (distributed logs INFO by default); everything with ``--debug``."""
    import distributed  # noqa: F401  (its import configures its loggers: override after)

    level = logging.DEBUG if debug else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("distributed").setLevel(logging.INFO if debug else logging.WARNING)


class _Interrupt:
    """SIGTERM/SIGINT handler: the first signal asks the runner to stop at a safe point
    (requeue the job); a second one raises ``KeyboardInterrupt`` at once.

    Raising from the handler straight away is unreliable: Python swallows exceptions
    raised while a ``__del__`` or a callback runs, which is where a busy Dask client
    often is.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.previous: dict[int, Any] = {}

    def __call__(self, signum: int, frame: Any) -> None:  # pragma: no cover - signal path
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()


_INTERRUPT: _Interrupt | None = None


def _interrupt_event() -> threading.Event | None:
    return _INTERRUPT.event if _INTERRUPT is not None else None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``stratafit`` command line.

    Parameters
    ----------
    argv : sequence of str, optional
        Arguments without the program name (default ``sys.argv[1:]``).

    Returns
    -------
    int
        Exit code (see the module docstring).
    """
    parser = build_parser()
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    _configure_logging(args.debug)
    global _INTERRUPT
    interrupt = _Interrupt()
    if args.command in ("run", "worker", "demo"):
        interrupt.install()
    _INTERRUPT = interrupt
    try:
        code = int(args.func(args))
        if interrupt.event.is_set():
            _err("interrupted")
            return EXIT_INTERRUPTED
        return code
    except KeyboardInterrupt:
        _err("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `stratafit results ... | head`: the reader left, not an error
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return EXIT_OK
    except Exception as exc:
        code, message = exit_code_for_error(exc)
        _err(message)
        if args.debug:
            traceback.print_exc(file=sys.stderr)
        return code
    finally:
        interrupt.restore()
        _INTERRUPT = None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def entry() -> None:
    """Console-script entry point (``stratafit``): :func:`main`, then :func:`exit_promptly`."""
    exit_promptly(main())


def exit_promptly(code: int) -> None:
    """End the process with ``code`` without the interpreter's teardown.

    When a command is done its results are committed, its files closed and its cluster
    shut down; the interpreter's own teardown of the loaded libraries (dask, distributed,
    pandas, pyarrow, scipy) would still take 0.2-0.3 s here, a tenth of a small job's wall
    time. So a garbage collection and the exit handlers run (what a normal exit runs:
    logging.shutdown, thread and process joins...), the standard streams are flushed,
    then the process ends with ``os._exit``.
    """
    import atexit
    import gc

    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if run_exit_handlers is None:  # not CPython: the usual exit
        sys.exit(code)
    try:
        gc.collect()  # finalizers of unreachable objects (__del__, weakref.finalize)
        run_exit_handlers()
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
    except BrokenPipeError:  # the reader of stdout left (`stratafit results | head`)
        pass
    except Exception:  # pragma: no cover - a failing exit handler: keep the usual exit
        sys.exit(code)
    os._exit(code)

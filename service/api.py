"""Python API of the service: submit jobs, run them now, consume the queue, read results.

>>> from service import submit, run, results                       # doctest: +SKIP
>>> job = run("nightly.toml", store="sqlite:///stratafit.db")      # doctest: +SKIP
>>> job.status                                                     # doctest: +SKIP
'succeeded_with_errors'
>>> results(job.id, "coefficients").head()                        # doctest: +SKIP

``store`` arguments accept a :class:`storage.store.Store`, a URL, or ``None``
(``$STRATAFIT_STORE``, else ``sqlite:///stratafit.db``). A SQLite store is created and
migrated on first use; a PostgreSQL store must be migrated once with
``stratafit db upgrade`` (see ``deploy/``).
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from service.cluster import ClusterStarter, ClusterUnavailable, announce, connect, stderr_echo
from service.progress import ProgressPrinter
from service.runner import Runner
from service.spec import JobSpec, load_spec, validate_spec
from storage.records import JobRecord

if TYPE_CHECKING:  # pandas is imported by results() only
    import pandas as pd

__all__ = [
    "submit",
    "submit_ex",
    "run",
    "results",
    "work",
    "open_store",
    "default_owner",
    "TABLES",
    "ACTIVE_STATUSES",
]

#: Tables :func:`results` can read.
TABLES = ("fits", "coefficients", "variance", "ranef", "strata")
#: Job statuses in which a job is not finished.
ACTIVE_STATUSES = frozenset({"queued", "running"})

_log = logging.getLogger(__name__)

Echo = Callable[[str], None]




def default_owner() -> str:
    """Lease owner name of this process: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


def open_store(store: Any = None, *, upgrade: bool | None = None) -> Any:
    """Return a :class:`storage.store.Store` for ``store`` (instance, URL or ``None``).

    Parameters
    ----------
    store : Store, str or None
        An existing store (returned as is), a URL, or ``None`` for the default URL.
    upgrade : bool, optional
        Run the migrations. Default: only for SQLite URLs (a local file the service
        owns); PostgreSQL is migrated explicitly with ``stratafit db upgrade``.

    Returns
    -------
    Store
    """
    if store is not None and not isinstance(store, (str, os.PathLike)):
        return store
    from storage.engine import resolve_url
    from storage.store import Store

    url = os.fspath(store) if store is not None else None
    st = Store(url)
    if upgrade is None:
        upgrade = resolve_url(url).get_backend_name() == "sqlite"
    if upgrade:
        st.upgrade()
    return st


def _spec(spec: Any) -> JobSpec:
    if isinstance(spec, JobSpec):
        return spec
    if isinstance(spec, Mapping):
        return load_spec(dict(spec))
    return load_spec(spec)


def submit_ex(
    spec: Any, *, store: Any = None, idempotency_key: str | None = None
) -> tuple[JobRecord, bool]:
    """Like :func:`submit`, also telling whether a new job was created.

    Returns
    -------
    (JobRecord, bool)
        The job, and ``False`` when ``idempotency_key`` matched an existing job.
    """
    js = _spec(spec)
    validate_spec(js)
    st = open_store(store)
    return st.submit_job(
        name=js.name, spec=js.to_dict(), spec_hash=js.spec_hash, idempotency_key=idempotency_key
    )


def submit(spec: Any, *, store: Any = None, idempotency_key: str | None = None) -> JobRecord:
    """Validate a job spec against its dataset and queue it.

    Parameters
    ----------
    spec : str, path, mapping or JobSpec
        TOML file, parsed mapping or loaded spec.
    store : Store, str or None
        See the module docstring.
    idempotency_key : str, optional
        Submitting again with the same key returns the existing job.

    Returns
    -------
    JobRecord
        The queued (or existing) job.

    Raises
    ------
    service.spec.SpecError
        Invalid spec; nothing is queued.
    """
    return submit_ex(spec, store=store, idempotency_key=idempotency_key)[0]


def _progress_sink(progress: Any) -> tuple[Callable | None, Callable[[], None]]:
    if progress is True:
        printer = ProgressPrinter()
        return printer, printer.close
    if callable(progress):
        return progress, lambda: None
    return None, lambda: None


def _run_claimed(job: JobRecord, st: Any, client: Any, owner: str, progress: Any,
                 runner_options: Mapping[str, Any], validated_spec: Any = None,
                 dataset: Any = None) -> JobRecord:
    sink, close = _progress_sink(progress)
    try:
        runner = Runner(st, client, owner, progress=sink, **dict(runner_options))
        return runner.run_job(job, validated_spec=validated_spec, dataset=dataset)
    finally:
        close()


def run(
    spec: Any,
    *,
    store: Any = None,
    scheduler: str | None = None,
    n_workers: int | None = None,
    progress: Any = True,
    idempotency_key: str | None = None,
    client: Any = None,
    echo: Echo | None = stderr_echo,
    interrupt: threading.Event | None = None,
    starter: ClusterStarter | None = None,
    **runner_options: Any,
) -> JobRecord:
    """Submit a job, claim it and run it now on a Dask cluster.

    Parameters
    ----------
    spec : str, path, mapping or JobSpec
    store : Store, str or None
    scheduler : str, optional
        Scheduler address or file; default ``$DASK_SCHEDULER_ADDRESS`` or a local cluster.
    n_workers : int, optional
        Workers of the local cluster (default: one per core).
    progress : bool or callable, default True
        ``True`` draws a progress line on stderr; a callable receives
        ``(done, failed, total, rate)``.
    idempotency_key : str, optional
        With an existing key, the existing job is resumed if it has pending work and
        no live consumer; a finished job is returned as it is.
    client : distributed.Client, optional
        Use this client instead of connecting.
    echo : callable, optional
        Receives human-readable messages (dashboard address); ``None`` silences them.
    interrupt : threading.Event, optional
        Set it to stop: the job is requeued and ``KeyboardInterrupt`` raised.
    starter : service.cluster.ClusterStarter, optional
        A cluster start already under way (the CLI starts one before importing the rest
        of the service, so that the workers boot while it does); ``run`` uses it instead
        of starting one and closes it at the end. Not with ``client``.
    **runner_options
        Passed to :class:`~service.runner.Runner` (``lease_seconds``, ``write_batch``...).

    Returns
    -------
    JobRecord
        The job as stored afterwards (finished, cancelled, or held by another consumer).

    Raises
    ------
    service.spec.SpecError
        Invalid spec (nothing queued).
    service.cluster.ClusterUnavailable
        No cluster (the job is requeued).
    """
    try:
        js = _spec(spec)  # parse errors surface before any cluster starts (here)
        if starter is not None and client is not None:
            raise ValueError("run() takes a client or a starter, not both")
    except BaseException:
        if starter is not None:
            starter.close()
        raise
    if interrupt is not None:
        runner_options["interrupt"] = interrupt
    lease = float(runner_options.get("lease_seconds", 60.0))
    # Start the cluster in the background while this thread validates the spec against
    # the dataset, queues, claims and plans the job; the runner waits for the client
    # only when it submits the first task. Whatever fails, close() stops the cluster.
    if starter is None and client is None:
        starter = ClusterStarter(scheduler, n_workers, echo)
    try:
        report = validate_spec(js)  # its dataset handle keeps the footers' row counts
        st = open_store(store)
        job = st.submit_job(name=js.name, spec=js.to_dict(), spec_hash=js.spec_hash,
                            idempotency_key=idempotency_key)[0]
        owner = default_owner()
        claimed = st.claim_job(owner, lease_seconds=lease, job_id=job.id)
        if claimed is None:  # finished already, or another live consumer holds it
            return st.get_job(job.id)
        if starter is None:
            return _run_claimed(claimed, st, client, owner, progress, runner_options, js,
                                report.dataset)
        try:
            return _run_claimed(claimed, st, starter.future, owner, progress, runner_options,
                                js, report.dataset)
        except ClusterUnavailable as exc:
            st.requeue_job(claimed.id, claimed.attempt, f"cluster unavailable: {exc}")
            raise
    finally:
        if starter is not None:
            starter.close()


def results(job_id: int, table: str = "fits", *, store: Any = None) -> pd.DataFrame:
    """One result table of a job.

    Parameters
    ----------
    job_id : int
    table : {"fits", "coefficients", "variance", "ranef", "strata"}
    store : Store, str or None

    Returns
    -------
    pandas.DataFrame
        One row per fit / coefficient / variance component / random effect / stratum,
        with the stratum key.
    """
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; valid: {', '.join(TABLES)}")
    return open_store(store).read_table(int(job_id), table)


def work(
    store: Any = None,
    scheduler: str | None = None,
    once: bool = False,
    poll: float = 2.0,
    *,
    n_workers: int | None = None,
    progress: Any = False,
    lease_seconds: float = 60.0,
    stop: threading.Event | None = None,
    echo: Echo | None = stderr_echo,
    **runner_options: Any,
) -> list[JobRecord]:
    """Consume the queue: claim a job, run it, repeat.

    The cluster is connected when the first job is claimed (a ``--once`` run on an
    empty queue never touches it) and kept for later jobs.

    Parameters
    ----------
    store : Store, str or None
    scheduler : str, optional
    once : bool, default False
        Run at most one job, then return (an empty queue returns at once).
    poll : float, default 2.0
        Seconds between claims while the queue is empty.
    n_workers : int, optional
        Workers of a local cluster.
    progress : bool or callable, default False
    lease_seconds : float, default 60
    stop : threading.Event, optional
        Set it to stop: an idle loop returns; a running job is requeued and
        ``KeyboardInterrupt`` raised (see :class:`~service.runner.Runner`).
    echo : callable, optional
        Receives human-readable messages.
    **runner_options
        Passed to :class:`~service.runner.Runner`.

    Returns
    -------
    list of JobRecord
        The jobs processed, as stored afterwards.
    """
    st = open_store(store)
    owner = default_owner()
    stop = stop or threading.Event()
    done: list[JobRecord] = []
    with _LazyClient(scheduler, n_workers, echo) as lazy:
        while not stop.is_set():
            job = st.claim_job(owner, lease_seconds=lease_seconds)
            if job is None:
                if once:
                    break
                stop.wait(poll)
                continue
            if echo:
                echo(f"claimed job {job.id} ({job.name}), attempt {job.attempt}")
            try:
                client = lazy.get()
            except ClusterUnavailable as exc:
                st.requeue_job(job.id, job.attempt, f"cluster unavailable: {exc}")
                raise
            record = _run_claimed(
                job, st, client, owner, progress,
                {"lease_seconds": lease_seconds, "interrupt": stop, **runner_options},
            )
            if echo:
                echo(f"job {record.id}: {record.status}" + (f" ({record.message})" if record.message else ""))
            done.append(record)
            if once:
                break
    return done


class _LazyClient:
    """Connects on first :meth:`get`, closes on exit."""

    def __init__(self, scheduler: str | None, n_workers: int | None, echo: Echo | None):
        self.scheduler, self.n_workers, self.echo = scheduler, n_workers, echo
        self._cm = None
        self._client = None

    def get(self) -> Any:
        if self._client is None:
            self._cm = connect(self.scheduler, self.n_workers)
            self._client = self._cm.__enter__()
            local = not (self.scheduler or os.environ.get("DASK_SCHEDULER_ADDRESS"))
            announce(self._client, self.echo, local)
        return self._client

    def __enter__(self) -> "_LazyClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._cm is not None:
            self._cm.__exit__(*exc)

"""Connect to a Dask cluster: a remote scheduler, or a LocalCluster started here.

Workers fit one stratum per thread, so BLAS must not start its own thread pools on top of
Dask's: every worker process gets ``OMP_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` and
``MKL_NUM_THREADS`` set to 1 in its environment (LocalCluster), and the
:class:`BlasThreadsPlugin` worker plugin limits the already loaded BLAS libraries with
:mod:`threadpoolctl` on any cluster, including remote ones started by someone else.
"""
from __future__ import annotations

import concurrent.futures as _cf
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Iterator, Sequence

import dask
import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from service.tasks import WORKER_MODULES

__all__ = [
    "connect",
    "ClusterStarter",
    "announce",
    "stderr_echo",
    "dashboard_link",
    "bokeh_available",
    "BlasThreadsPlugin",
    "PreloadPlugin",
    "PRELOAD_MODULES",
    "ClusterUnavailable",
    "BLAS_ENV",
    "SCHEDULER_ENV",
    "TIMEOUT_ENV",
    "PROFILE_ENV",
    "worker_config",
    "worker_environ",
    "DASK_TRIM_DEFAULT",
    "ALLOCATOR_ENV",
    "start_method",
]

#: Environment given to worker processes started by :func:`connect`.
BLAS_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

#: Environment variable naming the scheduler when ``scheduler`` is not given.
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
#: Environment variable: seconds to wait for a remote scheduler (default 10).
TIMEOUT_ENV = "STRATAFIT_SCHEDULER_TIMEOUT"
#: Environment variable: ``1`` keeps Dask's sampling profiler on in local workers.
PROFILE_ENV = "STRATAFIT_WORKER_PROFILE"

_log = logging.getLogger(__name__)


class ClusterUnavailable(RuntimeError):
    """The scheduler cannot be reached, or a local cluster cannot be started."""


class BlasThreadsPlugin(WorkerPlugin):
    """Limit BLAS/OpenMP thread pools to one thread in every worker process.

    Parameters
    ----------
    limit : int, default 1
        Threads allowed per BLAS/OpenMP pool.
    """

    name = "stratafit-blas-threads"

    def __init__(self, limit: int = 1):
        self.limit = int(limit)

    def setup(self, worker: distributed.Worker) -> None:
        """Set the environment for subprocesses and limit the loaded pools."""
        for var in BLAS_ENV:
            os.environ[var] = str(self.limit)
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - threadpoolctl is a dependency
            return
        threadpool_limits(limits=self.limit)


#: Modules every worker imports when it joins (``PreloadPlugin``): what ``run_task`` needs
#: (:data:`service.tasks.WORKER_MODULES`).
PRELOAD_MODULES = WORKER_MODULES


class PreloadPlugin(WorkerPlugin):
    """Import the task code and the fitter in every worker process when it joins.

    Registered by :func:`connect` (on remote clusters too, and for workers joining
    later), so the first tasks do not pay about a second of imports each. A module
    that fails to import is logged, not raised: the task would report it.

    Parameters
    ----------
    modules : sequence of str, default :data:`PRELOAD_MODULES`
    """

    name = "stratafit-preload"

    def __init__(self, modules: tuple[str, ...] = PRELOAD_MODULES):
        self.modules = tuple(modules)

    def setup(self, worker: distributed.Worker) -> None:
        """Import :attr:`modules` (in the worker process)."""
        for module in self.modules:
            try:
                importlib.import_module(module)
            except Exception as exc:  # pragma: no cover - a broken install on a worker
                _log.warning("worker could not preload %s: %s", module, exc)


def _dashboard_address() -> str:
    """Dashboard bind address of a local cluster: ``$STRATAFIT_DASHBOARD`` or any free port."""
    return os.environ.get("STRATAFIT_DASHBOARD", ":0")


def dashboard_link(client: distributed.Client) -> str | None:
    """The dashboard URL of ``client``'s scheduler, or ``None`` when it serves none.

    The status pages need ``bokeh`` on the scheduler; without it the URL still answers
    (metrics, health) and the CLI says so when it prints the link.
    """
    try:
        services = client.scheduler_info().get("services", {})
        return client.dashboard_link if "dashboard" in services else None
    except Exception:  # the link is informational only
        return None


def bokeh_available() -> bool:
    """Whether this process could serve the dashboard status pages (``bokeh`` installed)."""
    return importlib.util.find_spec("bokeh") is not None


def worker_config() -> dict:
    """Dask settings of the local cluster's processes (workers and scheduler).

    The fitting thread of a worker shares the GIL with the worker's event loop, so
    everything the loop does per millisecond is paid per stratum. Measured on the
    issue #5 benchmark (binomial strata of ~2,000 rows, 8 per task), two defaults cost
    about 2 ms of worker CPU per stratum (of ~10):

    * the sampling profiler (``distributed.worker.profile``: a stack walk of every
      thread every 10 ms, on the event loop) — off; ``STRATAFIT_WORKER_PROFILE=1``
      keeps it for the dashboard's profile page;
    * the event-loop tick (``distributed.admin.tick.interval``, 20 ms), which only
      measures how long the loop was blocked — every 200 ms instead.

    Two more periodic callbacks run on every event loop (the coordinator's holds the
    scheduler and the nannies) whether or not there is work: the memory monitor
    (``distributed.worker.memory.monitor-interval``, 100 ms: the RSS that spilling,
    pausing and the nanny's memory limit act on) and the system monitor
    (``distributed.admin.system-monitor.interval``, 500 ms: CPU, memory and network
    counters for the dashboard's graphs). At 500 ms and 2 s they cost, on an idle
    2-worker cluster, 11-12.5 instead of 19-23 ms of coordinator CPU per second and
    2.5-6.3 instead of 6-10 ms per worker (8 s idle, 4 runs each). A stratum's task
    holds ~20,000 rows, so a half-second view of its memory is enough for the limits.

    A value the user configured (anything other than Dask's default) is kept.
    """
    config: dict = {}
    defaults = {"distributed.admin.tick.interval": ("20ms", "200ms"),
                "distributed.worker.memory.monitor-interval": ("100ms", "500ms"),
                "distributed.admin.system-monitor.interval": ("500ms", "2s")}
    for key, (default, ours) in defaults.items():
        if str(dask.config.get(key, default)) == default:
            config[key] = ours
    if os.environ.get(PROFILE_ENV, "0") in ("", "0"):
        config["distributed.worker.profile.enabled"] = False
    return config


#: Dask's default ``MALLOC_TRIM_THRESHOLD_`` for worker processes (``pre-spawn-environ``).
DASK_TRIM_DEFAULT = 65536

#: glibc allocator settings of local workers replacing Dask's trim threshold (bytes).
ALLOCATOR_ENV = {"MALLOC_TRIM_THRESHOLD_": str(64 * 2**20), "MALLOC_MMAP_THRESHOLD_": str(16 * 2**20)}


def worker_environ() -> dict:
    """Environment set before the local cluster's worker processes start.

    Dask's ``distributed.nanny.pre-spawn-environ`` plus :data:`BLAS_ENV`, with Dask's
    default ``MALLOC_TRIM_THRESHOLD_=65536`` replaced by :data:`ALLOCATOR_ENV` (a
    trim threshold configured by the user is kept as it is).

    Why: a task runs on a worker thread, whose glibc arena hands memory back to the OS
    as soon as more than the trim threshold is free at its top, and any ``MALLOC_*``
    variable turns off glibc's dynamic mmap threshold, so NumPy's working arrays
    (~200 kB per Newton step of the batched fitter) are page-faulted in and zeroed
    again at every step. Measured on the issue #5 strata (read a task's slice +
    ``fit_many``, one process, glibc 2.36, on a non-main thread like a Dask worker's):
    ~610-630 minor faults and 1.8-2.3 ms of system time per stratum with the Dask
    default, 1-7 faults and 0.2-0.3 ms with :data:`ALLOCATOR_ENV`. Memory stays
    bounded: at most 64 MB kept free per arena, blocks above 16 MB are mapped and
    returned directly, and a worker holds one task's slice (~20,000 rows) at a time.
    """
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}) or {})
    if str(environ.get("MALLOC_TRIM_THRESHOLD_", DASK_TRIM_DEFAULT)) == str(DASK_TRIM_DEFAULT):
        environ.pop("MALLOC_TRIM_THRESHOLD_", None)
        environ.update(ALLOCATOR_ENV)
    environ.update(BLAS_ENV)
    return environ


def start_method() -> str:
    """How the local cluster starts its worker processes: ``forkserver`` where available
    instead of Dask's default ``spawn`` (a start method configured by the user is kept).

    With ``spawn`` every worker is a fresh interpreter that imports numpy, pandas, pyarrow
    and distributed itself, on the cores the coordinator is using for its own imports and
    the spec's validation. A fork server imports them once (Dask preloads them there)
    and forks the workers from it. The pre-spawn environment (:func:`worker_environ`:
    BLAS threads, allocator) is in place when the server starts, so every worker still
    starts with it. Measured: ``stratafit run`` of the 200-strata benchmark job with 2
    workers, three alternating pairs, 4.47 / 4.12 / 3.71 s with ``spawn`` and
    3.47 / 3.38 / 3.64 s with ``forkserver``.
    """
    import multiprocessing

    method = str(dask.config.get("distributed.worker.multiprocessing-method", "spawn"))
    if method == "spawn" and "forkserver" in multiprocessing.get_all_start_methods():
        return "forkserver"
    return method


def preload_fork_server(modules: Sequence[str] = PRELOAD_MODULES) -> list[str]:
    """Add ``modules`` to what the fork server imports before it forks a worker.

    Call with ``forkserver`` configured as the start method, before the server starts
    (its first worker). Dask sets the server's list once per process (``distributed``,
    numpy, pandas...); the worker code and the fitter (:data:`PRELOAD_MODULES`: scipy,
    pyarrow.dataset, the fitting modules) are appended, so each forked worker has them
    already instead of importing them itself (~0.35-0.45 s wall, 0.45-0.55 s CPU per
    worker, measured after Dask's list). A module the server cannot import is skipped
    there (multiprocessing ignores an ImportError) and imported by the worker's
    :class:`PreloadPlugin` as before. A server already running keeps its list.

    Returns
    -------
    list of str
        The fork server's preload list as now set.
    """
    import multiprocessing.forkserver as mpfs

    from distributed.utils import get_mp_context

    get_mp_context()  # Dask's own list first (set once per process, at the first call)
    server = getattr(mpfs, "_forkserver", None)
    current = list(getattr(server, "_preload_modules", None) or ["distributed"])
    wanted = current + [m for m in modules if m not in current]
    mpfs.set_forkserver_preload(wanted)
    return wanted


def _local_cluster(n_workers: int | None) -> distributed.LocalCluster:
    n = int(n_workers or os.cpu_count() or 1)
    if n < 1:
        raise ClusterUnavailable(f"--workers must be >= 1, got {n}")
    environ = worker_environ()
    method = start_method()
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ, **worker_config(),
                          "distributed.worker.multiprocessing-method": method}):
        if method == "forkserver":
            preload_fork_server()
        return distributed.LocalCluster(
            n_workers=n,
            threads_per_worker=1,
            processes=True,
            dashboard_address=_dashboard_address(),
            env=dict(BLAS_ENV),
        )


def _spawn_hint(exc: BaseException) -> str:
    """A hint for the usual cause of local workers that do not start: a script that starts
    the cluster at import time. Worker processes (forked from a fork server, or spawned)
    re-import ``__main__``, where the unguarded call starts a cluster again and fails."""
    if "failed to start" not in str(exc):
        return ""
    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if not script:
        return ""
    return (f" (if {os.path.basename(script)!r} starts the job at import time, put the call under "
            "`if __name__ == \"__main__\":`: local workers are new processes that import the main "
            "module again)")


@contextlib.contextmanager
def connect(
    scheduler: str | None = None,
    n_workers: int | None = None,
    *,
    timeout: float | None = None,
) -> Iterator[distributed.Client]:
    """Yield a :class:`distributed.Client` and close everything started here on exit.

    Parameters
    ----------
    scheduler : str, optional
        Scheduler address (``tcp://host:8786``) or a scheduler file (``*.json``).
        Defaults to ``$DASK_SCHEDULER_ADDRESS``; when neither is set a
        :class:`~distributed.LocalCluster` is started (one single-threaded worker
        process per core, or ``n_workers``).
    n_workers : int, optional
        Workers of the local cluster (ignored with a remote scheduler).
    timeout : float, optional
        Seconds to wait for a remote scheduler; default ``$STRATAFIT_SCHEDULER_TIMEOUT``
        or 10.

    Yields
    ------
    distributed.Client
        With :class:`PreloadPlugin` and :class:`BlasThreadsPlugin` registered (the
        workers have imported the fitter when this yields). ``dashboard_link(client)`` gives
        the dashboard address to print.

    Raises
    ------
    ClusterUnavailable
        The scheduler cannot be reached or the local cluster cannot start.
    """
    address = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if timeout is None:
        timeout = float(os.environ.get(TIMEOUT_ENV, "10"))
    cluster = None
    try:
        if address:
            if address.endswith(".json"):
                client = distributed.Client(scheduler_file=address, timeout=timeout)
            else:
                client = distributed.Client(address, timeout=timeout)
        else:
            cluster = _local_cluster(n_workers)
            client = distributed.Client(cluster)
    except ClusterUnavailable:
        raise
    except (OSError, TimeoutError, ValueError, RuntimeError) as exc:
        if cluster is not None:
            cluster.close()
        where = address or "local cluster"
        hint = "" if address else _spawn_hint(exc)
        raise ClusterUnavailable(f"cannot connect to Dask scheduler {where}: {exc}{hint}") from exc
    try:
        # preload first (loads numpy/scipy's BLAS), then limit the loaded pools
        for plugin in (PreloadPlugin(), BlasThreadsPlugin()):
            try:
                client.register_plugin(plugin, name=plugin.name)
            except Exception as exc:  # pragma: no cover - older clusters
                _log.warning("could not register worker plugin %s: %s", plugin.name, exc)
        yield client
    finally:
        with contextlib.suppress(Exception):
            client.close()
        if cluster is not None:
            with contextlib.suppress(Exception):
                cluster.close()


def stderr_echo(message: str) -> None:
    """The default ``echo`` of the service's messages: a line on stderr."""
    print(message, file=sys.stderr, flush=True)


def announce(client: distributed.Client, echo, local: bool) -> None:
    """Tell ``echo`` (a callable taking a message, or None) the dashboard address."""
    if echo is None:
        return
    link = dashboard_link(client)
    if link:
        note = "" if bokeh_available() or not local else " (install bokeh for the status pages)"
        echo(f"Dask dashboard: {link}{note}")


class ClusterStarter:
    """Connects (starts a LocalCluster) in a background thread.

    ``future`` resolves to the client, or raises what :func:`connect` raised
    (``ClusterUnavailable``). :meth:`close` waits for the start to end and then closes
    whatever was started, whether or not anyone used it. Needs only this module's
    imports (dask, distributed), so a caller can start it before importing the rest of
    the service: the workers' own start-up (imports, fitter preload) then overlaps the
    caller's.

    Parameters
    ----------
    scheduler : str or None
        As for :func:`connect`.
    n_workers : int or None
        As for :func:`connect`.
    echo : callable or None
        Receives the dashboard address once connected.
    """

    def __init__(self, scheduler: str | None, n_workers: int | None, echo=None):
        self.scheduler, self.n_workers, self.echo = scheduler, n_workers, echo
        self.future: _cf.Future = _cf.Future()
        self._cm = None
        self._thread = threading.Thread(target=self._start, name="stratafit-connect", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        if not self.future.set_running_or_notify_cancel():
            return
        try:
            cm = connect(self.scheduler, self.n_workers)
            client = cm.__enter__()
        except BaseException as exc:
            self.future.set_exception(exc)
            return
        self._cm = cm
        self.future.set_result(client)
        try:
            local = not (self.scheduler or os.environ.get(SCHEDULER_ENV))
            announce(client, self.echo, local)
        except Exception as exc:  # informational only
            _log.debug("announcing the dashboard failed: %s", exc)

    def close(self) -> None:
        """Wait for the start to end, then close what it started."""
        self._thread.join()
        if self._cm is not None:
            cm, self._cm = self._cm, None
            cm.__exit__(None, None, None)

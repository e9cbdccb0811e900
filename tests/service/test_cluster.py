"""service.cluster: errors of a local cluster that cannot start; how its workers start."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import types

from service import cluster

SCRIPT = textwrap.dedent("""
    from service.cluster import ClusterUnavailable, connect

    try:
        with connect(None, 1, timeout=60):
            print("connected")
    except ClusterUnavailable as e:
        if __name__ != "__main__":  # a spawned worker importing this script again: let it die
            raise
        print("ERR:", e)
""")


def test_unguarded_script_gets_a_hint(tmp_path):
    """A script that starts the local cluster at import time (no ``__main__`` guard): the
    spawned worker imports it again and dies; the error names the script and the fix."""
    script = tmp_path / "nightly_fits.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert "ERR: cannot connect to Dask scheduler local cluster" in out.stdout, out.stdout + out.stderr
    assert "'nightly_fits.py'" in out.stdout and 'if __name__ == "__main__":' in out.stdout


def test_hint_only_for_a_worker_start_failure(monkeypatch):
    fake = types.ModuleType("__main__")
    fake.__file__ = "/jobs/run.py"
    monkeypatch.setitem(sys.modules, "__main__", fake)
    assert "'run.py'" in cluster._spawn_hint(RuntimeError("Nanny failed to start."))
    assert cluster._spawn_hint(OSError("address already in use")) == ""
    del fake.__file__  # an interactive session has no script to name
    assert cluster._spawn_hint(RuntimeError("Nanny failed to start.")) == ""


def test_start_method_prefers_a_fork_server(monkeypatch):
    import multiprocessing

    import dask

    with dask.config.set({"distributed.worker.multiprocessing-method": "spawn"}):  # Dask's default
        expected = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
        assert cluster.start_method() == expected
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}):  # the user's choice
        assert cluster.start_method() == "fork"


def test_worker_config_slows_the_idle_callbacks_but_keeps_the_users_values(monkeypatch):
    import dask

    monkeypatch.delenv(cluster.PROFILE_ENV, raising=False)
    assert cluster.worker_config() == {"distributed.admin.tick.interval": "200ms",
                                       "distributed.worker.memory.monitor-interval": "500ms",
                                       "distributed.admin.system-monitor.interval": "2s",
                                       "distributed.worker.profile.enabled": False}
    mine = {"distributed.admin.tick.interval": "50ms",
            "distributed.worker.memory.monitor-interval": "1s",
            "distributed.admin.system-monitor.interval": "250ms"}
    with dask.config.set(mine):
        assert cluster.worker_config() == {"distributed.worker.profile.enabled": False}
    monkeypatch.setenv(cluster.PROFILE_ENV, "1")
    assert "distributed.worker.profile.enabled" not in cluster.worker_config()


PROBE = textwrap.dedent("""
    import json, os, sys

    from service.cluster import connect

    def probe():
        import multiprocessing, os, threadpoolctl
        import dask
        return {"method": multiprocessing.get_start_method(allow_none=True),
                "config": {k: dask.config.get(k) for k in ("distributed.admin.tick.interval",
                                                           "distributed.worker.memory.monitor-interval",
                                                           "distributed.admin.system-monitor.interval",
                                                           "distributed.worker.profile.enabled")},
                "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                       "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")},
                "blas_threads": sorted({i["num_threads"] for i in threadpoolctl.threadpool_info()})}

    if __name__ == "__main__":
        with connect(None, 2) as client:
            import multiprocessing.forkserver as mpfs
            server = getattr(mpfs, "_forkserver", None)
            print(json.dumps({"workers": list(client.run(probe).values()),
                              "preload": list(getattr(server, "_preload_modules", None) or [])}))
""")


def test_local_workers_start_with_the_pre_spawn_environment(tmp_path):
    """Forked from a fork server or spawned, every local worker has one BLAS thread, the
    allocator settings of ``worker_environ`` (set before the server or worker starts) and
    the Dask settings of ``worker_config``; a fork server preloads the worker modules."""
    import json

    import os

    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    # a value already in the environment wins over Dask's pre-spawn settings (Dask's rule),
    # and an earlier in-process cluster of this test session leaves Dask's defaults there
    env = {k: v for k, v in os.environ.items()
           if k not in cluster.BLAS_ENV and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout.strip().splitlines()[-1])
    workers = answer["workers"]
    assert len(workers) == 2
    if cluster.start_method() == "forkserver":  # the server imports the fitter once for all workers
        assert "distributed" in answer["preload"]
        assert set(cluster.PRELOAD_MODULES) <= set(answer["preload"])
    wanted = {**cluster.BLAS_ENV, **cluster.ALLOCATOR_ENV}
    for w in workers:
        assert w["method"] == cluster.start_method()
        assert w["env"] == {k: wanted[k] for k in w["env"]}
        assert w["blas_threads"] == [1]
        assert w["config"] == {"distributed.admin.tick.interval": "200ms",
                               "distributed.worker.memory.monitor-interval": "500ms",
                               "distributed.admin.system-monitor.interval": "2s",
                               "distributed.worker.profile.enabled": False}

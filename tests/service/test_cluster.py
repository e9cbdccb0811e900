"""service.cluster: errors of a local cluster that cannot start."""
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

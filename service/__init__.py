"""stratafit service: job specs, planning, Dask execution and the ``stratafit`` CLI.

The public Python API (imported lazily, so ``import service.spec`` stays light)::

    from service import submit, run, results, work
"""
from __future__ import annotations

from typing import Any

__all__ = ["submit", "run", "results", "work"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from service import api

        return getattr(api, name)
    raise AttributeError(f"module 'service' has no attribute {name!r}")

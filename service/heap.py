"""Keep Python's cyclic garbage collector off the long-lived heap of a busy process.

Every few hundred allocations CPython's collector runs, and from time to time it walks
every tracked object of the process. The coordinator holds ~140,000 of them (Dask's
client and scheduler, SQLAlchemy, pandas, the fitter) and a worker ~130,000, none of
which become garbage while a job runs; meanwhile each stratum's results allocate
thousands of small objects, so the walks come often. Measured on the service
benchmark (2,000 strata, 2 workers, SQLite): the coordinator spent 0.40 s in the
collector over the job (~0.2 ms per stratum), each worker ~0.17 ms per stratum.
:func:`gc.freeze` moves the objects that exist at that moment to a permanent generation
the collector no longer walks; objects created later are collected as before.

* The coordinator freezes its heap for the run of one job attempt
  (:func:`frozen_heap`) and unfreezes it afterwards, so garbage of the frozen part is
  collected after the job.
* A worker freezes its heap once, when its first task starts (:func:`freeze_once`),
  after the task code and the fitter are imported; what the tasks allocate is
  collected as usual.

``STRATAFIT_GC_FREEZE=0`` turns both off (read when this module is imported).
"""
from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["FREEZE", "freeze_once", "frozen_heap"]

#: Freeze long-lived heaps (``STRATAFIT_GC_FREEZE=0`` to turn off).
FREEZE = os.environ.get("STRATAFIT_GC_FREEZE", "1") != "0"

_frozen_once = False


def freeze_once() -> bool:
    """Freeze this process's heap the first time it is called; later calls do nothing.

    Returns
    -------
    bool
        Whether this call froze it.
    """
    global _frozen_once
    if _frozen_once or not FREEZE:
        return False
    _frozen_once = True
    gc.freeze()
    return True


@contextmanager
def frozen_heap() -> Iterator[bool]:
    """Freeze the heap for the ``with`` block; unfreeze it at the end.

    Does nothing when turned off or when the heap is already frozen (by the caller's
    own :func:`gc.freeze`, which is then left as it is).

    Yields
    ------
    bool
        Whether the block froze the heap.
    """
    mine = FREEZE and gc.get_freeze_count() == 0
    if mine:
        gc.freeze()
    try:
        yield mine
    finally:
        if mine:
            gc.unfreeze()

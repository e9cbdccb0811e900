"""service.heap: the collector skips the frozen heap, and every freeze is undone or once."""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap

from service.heap import frozen_heap

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _child(code: str, **env: str) -> dict:
    """Run ``code`` in a fresh interpreter (freezing is process-wide) and load its JSON."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": REPO, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_frozen_heap_freezes_for_the_block_only():
    if gc.get_freeze_count():  # an earlier in-process run_task froze this process
        gc.unfreeze()
    before = [object() for _ in range(10)]
    with frozen_heap() as mine:
        assert mine
        assert gc.get_freeze_count() >= len(before)
    assert gc.get_freeze_count() == 0


def test_a_heap_frozen_by_the_caller_is_left_frozen():
    gc.freeze()
    try:
        n = gc.get_freeze_count()
        with frozen_heap() as mine:
            assert not mine
        assert gc.get_freeze_count() == n
    finally:
        gc.unfreeze()


def test_freeze_once_freezes_once_and_garbage_made_later_is_collected():
    got = _child("""
        import gc, json, weakref
        from service.heap import freeze_once
        first = freeze_once()
        frozen = gc.get_freeze_count()
        class Node: pass
        a, b = Node(), Node()
        a.other, b.other = b, a           # a cycle created after the freeze
        ref = weakref.ref(a)
        del a, b
        gc.collect()
        print(json.dumps({"first": first, "again": freeze_once(), "frozen": frozen,
                          "same": gc.get_freeze_count() == frozen, "collected": ref() is None}))
    """)
    assert got == {"first": True, "again": False, "frozen": got["frozen"], "same": True,
                   "collected": True}
    assert got["frozen"] > 1000  # the interpreter's and service.heap's own objects


def test_turned_off_by_the_environment():
    got = _child("""
        import gc, json
        from service.heap import freeze_once, frozen_heap
        with frozen_heap() as mine:
            inside = gc.get_freeze_count()
        print(json.dumps({"once": freeze_once(), "mine": mine, "inside": inside}))
    """, STRATAFIT_GC_FREEZE="0")
    assert got == {"once": False, "mine": False, "inside": 0}

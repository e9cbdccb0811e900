"""Shared benchmark plumbing: single-threaded BLAS, timing, tables, JSON output.

Import this module FIRST in every benchmark script (before numpy, pandas, scipy or any
peer): it pins every thread pool we know of to one thread, so that "per fit" and "per
core" mean what they say on every machine.
"""
from __future__ import annotations

import os

THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS",  # glmm and mixedlm (Rust/rayon kernels)
)
for _v in THREAD_VARS:
    os.environ[_v] = "1"

import datetime as _dt  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"

for _p in (str(REPO), str(BENCH_DIR)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def time_calls(fn: Callable[[], Any], reps: int, warmup: int = 1
               ) -> tuple[list[float], list[float], Any]:
    """Call ``fn`` ``warmup`` times untimed, then ``reps`` times timed.

    A ``gc.collect()`` runs before each timed call and is not timed (as R's
    ``system.time(gcFirst = TRUE)``). Returns (wall seconds per call from
    ``perf_counter``, CPU seconds per call of this process from ``process_time``, last
    return value). On a busy machine CPU time is the steadier of the two; wall time is
    what the ratios use unless a script is asked for ``--clock cpu``.
    """
    out = None
    for _ in range(warmup):
        out = fn()
    wall, cpu = [], []
    for _ in range(reps):
        gc.collect()
        c0 = time.process_time()
        t0 = time.perf_counter()
        out = fn()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return wall, cpu, out


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def machine_info() -> dict:
    info = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "thread_env": {v: os.environ.get(v) for v in THREAD_VARS},
    }
    try:
        info["loadavg_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "num_threads", "version")}
            for p in threadpool_info()
        ]
    except Exception:  # pragma: no cover - informational only
        pass
    return info


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def write_json(name: str, payload: dict) -> Path:
    """Write ``payload`` to ``benchmarks/out/<name>-<UTC timestamp>.json`` and ``<name>-latest.json``."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    text = json.dumps(_jsonable(payload), indent=2, sort_keys=False)
    path = OUT_DIR / f"{name}-{stamp}.json"
    path.write_text(text)
    (OUT_DIR / f"{name}-latest.json").write_text(text)
    return path


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return _jsonable(x.to_dict())
    if hasattr(x, "item") and callable(x.item):  # numpy scalar
        try:
            x = x.item()
        except (ValueError, TypeError):
            return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


# ---------------------------------------------------------------------------------------
# formatting
# ---------------------------------------------------------------------------------------
def fmt_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    return f"{ms:.2f}"


def fmt_ratio(r: float | None) -> str:
    if r is None:
        return "-"
    return f"{r:.1f}x" if r >= 10 else f"{r:.2f}x"


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den <= 0:
        return None
    return num / den


def check(r: float | None, target: float, higher_is_better: bool = True) -> str:
    if r is None:
        return "n/a"
    ok = r >= target if higher_is_better else r <= target
    return "PASS" if ok else "FAIL"


def table(headers: list[str], rows: list[list[Any]], align: str | None = None) -> str:
    """Plain-text table; ``align`` is one char per column ('l' or 'r'), default l then r."""
    cells = [[("" if c is None else str(c)) for c in r] for r in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(vals):
        return "  ".join(
            (v.ljust(w) if a == "l" else v.rjust(w)) for v, w, a in zip(vals, widths, align)
        ).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in cells])


def header(title: str, info: dict) -> str:
    load = info.get("loadavg_1_5_15")
    return (
        f"== {title} ==\n"
        f"{info['date_utc']}  {info.get('cpu_model')}  cores={info['cpu_count']}  "
        f"python {info['python']}  threads pinned to 1"
        + (f"  loadavg={load}" if load else "")
    )

"""Time ``fitting.fit`` on the reference models against lme4's own timings.

Usage: ``python benchmarks/fit_timing.py [--repeat N]``. Prints, per model: CPU ms per
fit (``time.process_time``, minimum and median over N runs: wall time is unreliable on a
shared machine; BLAS is limited to one thread inside ``fit``), objective evaluations (start + optimiser + final
Hessian), the time of the design stage alone, of a plain GLM on the same data, and
lme4's median time from the reference JSON.
"""
from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

import fitting
from fitting.frame import build_design

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
KEYS = ["cbpp_glmer_laplace", "contraception_glmer_laplace", "contraception_slope_glmer_laplace",
        "grouseticks_glmer_laplace", "sleepstudy_lmer_ml", "sleepstudy_lmer_reml"]


def _time(f, repeat):
    ts = []
    for _ in range(repeat):
        t = time.process_time()
        f()
        ts.append(time.process_time() - t)
    return 1000 * min(ts), 1000 * float(np.median(ts))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    fits = json.loads((ROOT / "lme4_expected.json").read_text())["fits"]
    print(f"{'model':36s} {'min ms':>7s} {'med ms':>7s} {'evals':>12s} {'design':>7s} {'GLM ms':>7s} "
          f"{'lme4 ms':>8s} {'speedup':>8s} {'xGLM':>6s}")
    for key in KEYS:
        ex = fits[key]
        df = pd.read_parquet(ROOT / f"{ex['dataset']}.parquet")
        kw = dict(family=ex["family"], link=ex["link"], reml=bool(ex.get("REML", False)))
        fitting.fit(ex["formula"], df, **kw)  # warm-up
        mn, md = _time(lambda: fitting.fit(ex["formula"], df, **kw), args.repeat)
        r = fitting.fit(ex["formula"], df, **kw)
        o = r.optinfo
        ev = f"{o.extra['start_evaluations']}+{o.evaluations}+{o.extra['final_evaluations']}"
        dmin, _ = _time(lambda: build_design(ex["formula"], df, ex["family"]), args.repeat)
        fixed_formula = re.sub(r"\s*\+\s*\([^()]*\|[^()]*\)", "", ex["formula"])
        gmin, _ = _time(lambda: fitting.fit(fixed_formula, df, **{**kw, "reml": False}), args.repeat)
        lme4 = 1000 * ex["timing"]["median_elapsed_s"]
        print(f"{key:36s} {mn:7.1f} {md:7.1f} {ev:>12s} {dmin:7.1f} {gmin:7.1f} {lme4:8.0f} "
              f"{lme4 / mn:7.1f}x {mn / gmin:5.1f}x")


if __name__ == "__main__":
    main()

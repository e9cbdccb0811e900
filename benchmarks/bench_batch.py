"""Issue #4: batched fitting throughput over many small strata.

Dataset (d) (``datasets.batched``): 200 strata x 40 groups x 25..75 rows per group
(~2,000 rows per stratum), ``y ~ x1 + x2 + (1 | g)`` binomial in every stratum.

Engines, each single-threaded in one process (so fits/s = fits/s per core):

* ``fitting.fit_many(formula, data, by=["stratum"], family="binomial")`` when it exists
  (else reported "fit_many not available");
* a Python loop of ``fitting.fit`` over the strata;
* a Python loop of PyPI ``glmm.fit`` (the fastest Python peer);
* lme4 ``glmer`` in an R loop (``lapply`` over ``split()``), timed inside R;
* optionally glmmTMB in an R loop (``--glmmtmb``).

Each does one untimed warm-up fit (first stratum), then ``--reps`` timed passes over all
strata; the median pass time gives fits/s. Ratios (targets):

  fit_many / glmm loop   >= 2
  fit_many / lme4 loop   >= 50

Agreement: per-stratum log-likelihood differences against the ``fitting.fit`` loop.

    python benchmarks/bench_batch.py [--quick] [--reps N] [--strata N] [--glmmtmb]
        [--skip loop,glmm,lme4] [--clock wall|cpu]
"""
from __future__ import annotations

import _common  # noqa: F401  (must come first: pins thread pools)

import argparse
import sys
import warnings

import numpy as np

from _common import (check, fmt_ratio, header, machine_info, median, ratio, table,
                     time_calls, write_json)

import datasets
import peers

FORMULA = "y ~ x1 + x2 + (1 | g)"
BY = "stratum"


def _loglik_list(out, strata: list[str]) -> list[float | None] | None:
    """Best-effort per-stratum log-likelihoods from whatever fit_many returns."""
    try:
        import pandas as pd

        if isinstance(out, pd.DataFrame):
            col = next((c for c in ("loglik", "logLik", "log_likelihood") if c in out.columns), None)
            if col is None:
                return None
            key = BY if BY in out.columns else None
            if key is not None:
                m = dict(zip(out[key].astype(str), out[col]))
                return [peers._finite(m.get(s)) for s in strata]
            return [peers._finite(v) for v in out[col]]
        if isinstance(out, dict):
            vals = [out.get(s, out.get((s,))) for s in strata]
        else:
            vals = list(out)
        lls = []
        for v in vals:
            if v is None or isinstance(v, Exception):
                lls.append(None)
            else:
                ll = getattr(v, "loglik", None)
                if ll is None and hasattr(v, "result"):
                    ll = getattr(v.result, "loglik", None)
                lls.append(peers._finite(ll))
        return lls
    except Exception:
        return None


def time_fit_many(df, reps: int, strata: list[str]) -> peers.PeerResult:
    ok, why = peers.ours_available()
    if not ok:
        return peers.unavailable("fit_many", why)
    import fitting

    fm = getattr(fitting, "fit_many", None)
    if fm is None:
        return peers.unavailable("fit_many", "fit_many not available (fitting.fit_many missing)")
    first = df[df[BY] == strata[0]]
    try:
        fm(FORMULA, first, by=[BY], family="binomial")  # warm-up
        wall, cpu, out = time_calls(lambda: fm(FORMULA, df, by=[BY], family="binomial"), reps, warmup=0)
    except Exception as e:
        return peers.unavailable("fit_many", f"fit_many raised {type(e).__name__}: {e}")
    fits = list(out.values()) if isinstance(out, dict) else []
    conv = sum(1 for f in fits if not isinstance(f, Exception)
               and bool(getattr(getattr(f, "diagnostics", None), "converged", False)))
    return peers.PeerResult("fit_many", True, median_s=median(wall), times_s=wall,
                            cpu_median_s=median(cpu), cpu_times_s=cpu,
                            converged=bool(fits) and conv == len(strata),
                            extra={"n_strata": len(strata), "n_converged": conv if fits else "?",
                                   "loglik_by_stratum": _loglik_list(out, strata),
                                   "return_type": type(out).__name__})


def agreement(a: list | None, b: list | None) -> dict:
    if not a or not b or len(a) != len(b):
        return {"n_compared": 0}
    d = [abs(x - y) for x, y in zip(a, b) if x is not None and y is not None]
    if not d:
        return {"n_compared": 0}
    return {"n_compared": len(d), "max_abs_dLL": max(d), "median_abs_dLL": float(np.median(d)),
            "n_abs_dLL_gt_1e-3": sum(1 for x in d if x > 1e-3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="first 20 strata, 1 rep")
    ap.add_argument("--reps", type=int, default=None, help="timed passes over all strata (default 3, quick 1)")
    ap.add_argument("--r-reps", type=int, default=1, help="timed passes for the R loops (default 1)")
    ap.add_argument("--strata", type=int, default=None, help="use the first N strata (default 200, quick 20)")
    ap.add_argument("--glmmtmb", action="store_true", help="also time a glmmTMB loop in R")
    ap.add_argument("--skip", default="", help="comma list of: fit_many,loop,glmm,lme4")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    args = ap.parse_args(argv)
    args.reps = args.reps or (1 if args.quick else 3)
    args.strata = args.strata or (20 if args.quick else 200)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}

    info = machine_info()
    print(header("bench_batch (issue #4): fits per second per core over strata", info))
    df = datasets.batched()
    strata = [str(s) for s in df[BY].cat.categories[: args.strata]]
    df = df[df[BY].isin(strata)].copy()
    df[BY] = df[BY].cat.remove_unused_categories()
    n = len(strata)
    print(f"dataset (d): {n} strata, {len(df)} rows, {FORMULA} by {BY}; "
          f"reps {args.reps} (Python), {args.r_reps} (R), after a 1-fit warm-up; {args.clock} clock")

    res: dict[str, peers.PeerResult] = {}

    def note(key, r):
        res[key] = r
        msg = (f"{n / r.clock(args.clock):.2f} fits/s" if r.ok and r.clock(args.clock)
               else f"n/a: {r.reason}")
        print(f"  {key:10s} {msg}", file=sys.stderr, flush=True)

    if "fit_many" not in skip:
        note("fit_many", time_fit_many(df, args.reps, strata))
        if not res["fit_many"].ok:
            print(f"fit_many: {res['fit_many'].reason}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if "loop" not in skip:
            note("loop", peers.loop_ours(df, FORMULA, BY, reps=args.reps))
        if "glmm" not in skip:
            note("glmm", peers.loop_glmm(df, FORMULA, BY, reps=args.reps))
    if "lme4" not in skip:
        if peers.rscript() is None:
            print("lme4: not available (Rscript not found)")
        note("lme4", peers.loop_lme4(df, FORMULA, BY, reps=args.r_reps))
    if args.glmmtmb and "glmmtmb" not in skip:
        note("glmmtmb", peers.loop_lme4(df, FORMULA, BY, reps=args.r_reps, engine="glmmTMB"))

    ref = res.get("loop")
    ref_ll = ref.extra.get("loglik_by_stratum") if ref and ref.ok else None
    rows, fps = [], {}
    for key, r in res.items():
        t = r.clock(args.clock) if r.ok else None
        fps[key] = n / t if t else None
        ag = agreement(r.extra.get("loglik_by_stratum"), ref_ll) if key != "loop" else {}
        rows.append([
            key, r.peer,
            "-" if t is None else f"{t:.2f}",
            "-" if r.cpu_median_s is None else f"{r.cpu_median_s:.2f}",
            "-" if fps[key] is None else f"{fps[key]:.1f}",
            "-" if fps[key] is None else f"{1e3 / fps[key]:.1f}",
            "-" if not r.ok else f"{r.extra.get('n_converged', '?')}/{r.extra.get('n_strata', n)}",
            "-" if not ag.get("n_compared") else f"{ag['max_abs_dLL']:.1e}",
            "" if r.ok else (r.reason or "")[:60],
        ])
        r.extra["agreement_vs_loop"] = ag
    print()
    print(table(["engine", "what", "wall s", "cpu s", "fits/s/core", "ms/fit", "converged",
                 "max|dLL| vs loop", "note"], rows, align="llrrrrrrl"))

    best_ours_key = "fit_many" if fps.get("fit_many") else None
    ratios = {
        "fit_many/glmm": ratio(fps.get("fit_many"), fps.get("glmm")),
        "fit_many/lme4": ratio(fps.get("fit_many"), fps.get("lme4")),
        "loop/glmm": ratio(fps.get("loop"), fps.get("glmm")),
        "loop/lme4": ratio(fps.get("loop"), fps.get("lme4")),
    }
    print()
    print("Ratios (fits/s, higher = ours faster; targets fit_many/glmm >= 2, fit_many/lme4 >= 50)")
    print(table(["ratio", "value", "target", "check"], [
        ["fit_many / glmm loop", fmt_ratio(ratios["fit_many/glmm"]), ">= 2", check(ratios["fit_many/glmm"], 2)],
        ["fit_many / lme4 loop", fmt_ratio(ratios["fit_many/lme4"]), ">= 50", check(ratios["fit_many/lme4"], 50)],
        ["fit loop / glmm loop", fmt_ratio(ratios["loop/glmm"]), "(info)", ""],
        ["fit loop / lme4 loop", fmt_ratio(ratios["loop/lme4"]), "(info)", ""],
    ], align="lrrl"))
    if best_ours_key is None:
        print("fit_many not available: the fit_many ratios are n/a")

    payload = {"benchmark": "bench_batch", "issue": 4, "machine": info, "args": vars(args),
               "n_strata": n, "n_rows": len(df), "formula": FORMULA, "fits_per_s": fps,
               "ratios": ratios, "results": {k: v.to_dict() for k, v in res.items()}}
    path = write_json("bench_batch", payload)
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

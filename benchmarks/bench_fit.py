"""Issue #2: single-fit speed of ``fitting.fit`` against lme4 and the Python peers.

For models (a) random intercept, (b) crossed, (c) Contraception ``(urban | district)``
(see ``datasets.py``) this times, each as the median of N fits after one warm-up:

* ours: ``fitting.fit(formula, data, family="binomial")``;
* ours without random effects: ``fitting.fit`` on the formula minus its RE terms (the
  "GLM yardstick": a GLMM should cost a small multiple of a GLM), and statsmodels GLM;
* every peer that can fit the model: glmm, mixedlm, statsmodels BinomialBayesMixedGLM
  (variational), and in R (Rscript): lme4 ``glmer`` and glmmTMB.

Ratios (higher = ours faster, except ours/GLM):
  lme4/ours          lme4 time / ours                       target >= 10
  fastest_peer/ours  fastest other GLMM engine / ours        target >= 1
  ours/GLM           ours / ours-without-RE                  target <= 5

Agreement: each engine's log-likelihood minus ours, and the largest absolute
difference of a fixed-effect estimate from ours.

The fast engines (ours, ours without RE, statsmodels GLM, glmm) take turns: ``--rounds``
rounds (default 5) of ``reps / rounds`` fits each, pooled; on a shared virtual machine
whose speed drifts by tens of percent between minutes, back-to-back blocks per engine
would compare different machines.

    python benchmarks/bench_fit.py [--quick] [--reps N] [--slow-reps N] [--rounds R]
        [--models ri,crossed,contraception] [--skip mixedlm,sm_bayes,glmmtmb,...]
        [--clock wall|cpu]

Results go to benchmarks/out/bench_fit-<timestamp>.json (and bench_fit-latest.json).
"""
from __future__ import annotations

import _common  # noqa: F401  (must come first: pins thread pools)

import argparse
import sys
from dataclasses import replace

from _common import (check, fmt_ms, fmt_ratio, header, machine_info, median, ratio, table,
                     write_json)

import datasets
import peers

# engine key -> (adapter, speed class). "slow" engines get --slow-reps.
ENGINES = {
    "ours": (peers.time_ours, "fast"),
    "ours_glm": (None, "fast"),  # fitting.fit on the fixed-only formula
    "sm_glm": (None, "fast"),  # statsmodels GLM on the fixed-only formula
    "glmm": (peers.time_glmm, "fast"),
    "mixedlm": (peers.time_mixedlm, "slow"),
    "sm_bayes": (peers.time_statsmodels_bayes, "slow"),
    "lme4": (peers.time_lme4, "slow"),
    "glmmtmb": (peers.time_glmmtmb, "slow"),
}
# engines that fit the GLMM itself (candidates for "fastest peer")
GLMM_PEERS = ("glmm", "mixedlm", "sm_bayes", "lme4", "glmmtmb")


def run_model(model: datasets.Model, args, skip: set[str]) -> dict:
    df, f, fam = model.data, model.formula, model.family
    res: dict[str, peers.PeerResult] = {}

    def reps_for(key: str) -> int:
        return args.slow_reps if ENGINES[key][1] == "slow" else args.reps

    def note(key: str, r: peers.PeerResult) -> None:
        res[key] = r
        t = fmt_ms(r.median_s) + " ms" if r.ok else "n/a: " + str(r.reason)
        print(f"  {key:9s} {t}", file=sys.stderr, flush=True)

    print(f"{model.label}", file=sys.stderr, flush=True)
    ff = peers.fixed_only(f)

    def ours_glm(df, f, fam, reps):
        r = peers.time_ours(df, ff, fam, reps=reps)
        r.peer = "stratafit, no RE"
        return r

    fast = {"ours": peers.time_ours, "ours_glm": ours_glm, "sm_glm": peers.time_statsmodels_glm,
            "glmm": peers.time_glmm}
    fast = {k: fn for k, fn in fast.items() if k not in skip}
    # the fast engines take turns in `rounds` rounds of reps/rounds fits each, so that a
    # drift of the (shared, virtual) machine's speed during the run hits them alike
    rounds = max(1, min(args.rounds, args.reps))
    parts: dict[str, list[peers.PeerResult]] = {k: [] for k in fast}
    for i in range(rounds):
        n = args.reps // rounds + (1 if i < args.reps % rounds else 0)
        for key, fn in fast.items():
            parts[key].append(fn(df, f, fam, reps=n))
    for key in fast:
        note(key, merge_rounds(parts[key]))
    for key in ("mixedlm", "sm_bayes", "lme4", "glmmtmb"):
        if key in skip:
            continue
        fn = ENGINES[key][0]
        note(key, fn(df, f, fam, reps=reps_for(key)))
    return res


def merge_rounds(parts: list) -> "peers.PeerResult":
    """One engine's rounds as one result: all timed fits pooled, medians recomputed."""
    failed = [p for p in parts if not p.ok]
    if failed:
        return failed[0]
    times = [t for p in parts for t in p.times_s]
    cpu = [t for p in parts for t in p.cpu_times_s]
    return replace(parts[-1], times_s=times, cpu_times_s=cpu, median_s=median(times),
                   cpu_median_s=median(cpu))


def summarise(model: datasets.Model, res: dict, clock: str) -> dict:
    ours = res.get("ours")
    t_ours = ours.clock(clock) if ours and ours.ok else None
    ref_ll = ours.loglik if ours and ours.ok else None
    ref_fixed = ours.fixed if ours and ours.ok else {}

    rows = []
    for key, r in res.items():
        if not r.ok:
            rows.append([key, r.peer, "-", "-", "-", "-", "-", "-", (r.reason or "")[:70]])
            continue
        dll = None if (r.loglik is None or ref_ll is None or key in ("ours_glm", "sm_glm")) \
            else r.loglik - ref_ll
        dbeta = None if key in ("ours", "ours_glm", "sm_glm") else peers.max_abs_diff(r.fixed, ref_fixed)
        notes = "; ".join(r.notes[:1]) if key == "sm_bayes" else ""
        rows.append([
            key, r.peer, fmt_ms(r.median_s), fmt_ms(r.cpu_median_s),
            "-" if r.loglik is None else f"{r.loglik:.4f}",
            "-" if dll is None else f"{dll:+.2e}",
            "-" if dbeta is None else f"{dbeta:.1e}",
            {True: "yes", False: "NO", None: "?"}[r.converged], notes,
        ])

    # fastest peer that fitted the model (and converged)
    cands = [(res[k].clock(clock), k) for k in GLMM_PEERS
             if k in res and res[k].ok and res[k].converged is not False and res[k].clock(clock)]
    fastest = min(cands) if cands else (None, None)
    lme4 = res.get("lme4")
    t_lme4 = lme4.clock(clock) if lme4 and lme4.ok else None
    glm = res.get("ours_glm")
    t_glm = glm.clock(clock) if glm and glm.ok else None
    sm_glm = res.get("sm_glm")
    t_smglm = sm_glm.clock(clock) if sm_glm and sm_glm.ok else None
    ratios = {
        "lme4/ours": ratio(t_lme4, t_ours),
        "fastest_peer/ours": ratio(fastest[0], t_ours),
        "ours/GLM": ratio(t_ours, t_glm),
        "ours/statsmodels_GLM": ratio(t_ours, t_smglm),
    }
    lme4_ll = lme4.loglik if lme4 and lme4.ok else None
    return {
        "model": model.key,
        "label": model.label,
        "formula": model.formula,
        "nobs": len(model.data),
        "clock": clock,
        "rows": rows,
        "fastest_peer": fastest[1],
        "fastest_peer_s": fastest[0],
        "ours_s": t_ours,
        "glm_s": t_glm,
        "lme4_s": t_lme4,
        "ratios": ratios,
        "checks": {
            "lme4/ours>=10": check(ratios["lme4/ours"], 10),
            "fastest_peer/ours>=1": check(ratios["fastest_peer/ours"], 1),
            "ours/GLM<=5": check(ratios["ours/GLM"], 5, higher_is_better=False),
        },
        "loglik_ours_minus_lme4": None if (ref_ll is None or lme4_ll is None) else ref_ll - lme4_ll,
        "results": {k: v.to_dict() for k, v in res.items()},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="few reps (3 fast / 1 slow), skip statsmodels Bayes (~10 s per fit)")
    ap.add_argument("--reps", type=int, default=None, help="timed fits for fast engines (default 20, quick 3)")
    ap.add_argument("--slow-reps", type=int, default=None,
                    help="timed fits for mixedlm, statsmodels Bayes, lme4, glmmTMB (default 5, quick 1)")
    ap.add_argument("--models", default="ri,crossed,contraception")
    ap.add_argument("--rounds", type=int, default=5,
                    help="the fast engines take turns in this many rounds (default 5; 1 = one block each)")
    ap.add_argument("--skip", default="", help="comma list of engines to skip: " + ",".join(ENGINES))
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="clock the ratios use (cpu = process CPU time; steadier on a busy machine)")
    args = ap.parse_args(argv)
    args.reps = args.reps or (3 if args.quick else 20)
    args.slow_reps = args.slow_reps or (1 if args.quick else 5)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if args.quick:
        skip.add("sm_bayes")
    if "ours" in skip:
        skip.add("ours_glm")

    info = machine_info()
    print(header("bench_fit (issue #2): one GLMM fit, median per fit", info))
    ok, why = peers.ours_available()
    if not ok:
        print(f"stratafit: {why}")
    if peers.rscript() is None:
        print("lme4: not available (Rscript not found)")
        skip |= {"lme4", "glmmtmb"}
    print(f"reps: {args.reps} (fast engines), {args.slow_reps} (slow engines), after 1 warm-up; "
          f"ratios on the {args.clock} clock")

    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    models = [m for m in datasets.fit_models() if m.key in wanted]
    summaries = []
    for m in models:
        res = run_model(m, args, skip)
        s = summarise(m, res, args.clock)
        summaries.append(s)
        print()
        print(f"{m.label}:  {m.formula}   (n = {s['nobs']})")
        print(table(["engine", "what", "wall ms", "cpu ms", "loglik", "dLL vs ours",
                     "max|dbeta|", "conv", "note"], s["rows"], align="llrrrrrll"))

    print()
    print("Summary (targets: lme4/ours >= 10, fastest_peer/ours >= 1, ours/GLM <= 5)")
    srows = []
    for s in summaries:
        r = s["ratios"]
        srows.append([
            s["model"], fmt_ms(s["ours_s"]), fmt_ms(s["glm_s"]), fmt_ms(s["lme4_s"]),
            f"{s['fastest_peer'] or '-'} {fmt_ms(s['fastest_peer_s'])}",
            f"{fmt_ratio(r['lme4/ours'])} {s['checks']['lme4/ours>=10']}",
            f"{fmt_ratio(r['fastest_peer/ours'])} {s['checks']['fastest_peer/ours>=1']}",
            f"{fmt_ratio(r['ours/GLM'])} {s['checks']['ours/GLM<=5']}",
            "-" if s["loglik_ours_minus_lme4"] is None else f"{s['loglik_ours_minus_lme4']:+.2e}",
        ])
    print(table(["model", "ours ms", "GLM ms", "lme4 ms", "fastest peer ms", "lme4/ours",
                 "fastest/ours", "ours/GLM", "LL ours-lme4"], srows, align="lrrrlrrrr"))
    path = write_json("bench_fit", {"benchmark": "bench_fit", "issue": 2, "machine": info,
                                    "args": vars(args), "skip": sorted(skip), "models": summaries})
    print(f"\nJSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

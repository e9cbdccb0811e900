"""Adapters timing stratafit and its peers on the same model and data.

One function per engine. Each takes a pandas DataFrame and an lme4-syntax formula
(``family`` "binomial" unless said otherwise), does ``warmup`` untimed fits, then
``reps`` timed fits, and returns a :class:`PeerResult`:

* ``ok=True``: ``median_s`` (median seconds per fit over the timed reps), ``times_s``,
  and what the engine reported at its last fit (``loglik``, ``fixed`` estimates and
  ``re`` standard deviations/correlations under lme4-style names, ``converged``), so a
  table can show that every engine fitted the same model;
* ``ok=False``: ``median_s is None`` and ``reason`` says why the engine could not fit
  that model (random slopes, crossed factors, Gaussian-only, not installed, failed).

Engines: ``time_ours`` (``fitting.fit``), ``time_glmm`` (PyPI glmm), ``time_mixedlm``
(mixedlm ``glmer``), ``time_statsmodels_bayes`` (``BinomialBayesMixedGLM.fit_vb``,
variational Bayes: no likelihood to compare), ``time_statsmodels_mixedlm`` (Gaussian
only), ``time_statsmodels_glm`` (no random effects: the yardstick), ``time_lme4`` and
``time_glmmtmb`` (an ``Rscript`` subprocess running ``r/time_fit.R`` on a CSV copy of the
data; the R timings are measured inside R with ``system.time``, so R start-up and data
loading are excluded, as they are for the Python engines). Batch loops over strata:
``loop_ours``, ``loop_glmm``, ``loop_lme4``.

Names: fixed effects are normalised to lme4's spelling (``(Intercept)``, ``urbanY``,
``I(age^2)``); random-effect parameters to ``sd(group:term)`` and
``cor(group:term1,term2)``.
"""
from __future__ import annotations

import _common  # noqa: F401  (pins thread pools before numpy)

import json
import math
import re
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import BENCH_DIR, median, time_calls

R_SCRIPT = BENCH_DIR / "r" / "time_fit.R"


@dataclass
class PeerResult:
    peer: str
    ok: bool
    reason: str | None = None
    median_s: float | None = None  # wall clock, median over the timed reps
    times_s: list[float] = field(default_factory=list)
    cpu_median_s: float | None = None  # CPU time of the fitting process, median
    cpu_times_s: list[float] = field(default_factory=list)
    loglik: float | None = None
    fixed: dict[str, float] = field(default_factory=dict)
    re: dict[str, float] = field(default_factory=dict)
    converged: bool | None = None
    version: str | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float | None:
        return self.median_s

    def clock(self, which: str = "wall") -> float | None:
        """Median seconds on the ``"wall"`` or ``"cpu"`` clock."""
        return self.cpu_median_s if which == "cpu" else self.median_s

    def to_dict(self) -> dict:
        return asdict(self)


def unavailable(peer: str, reason: str, version: str | None = None) -> PeerResult:
    return PeerResult(peer=peer, ok=False, reason=reason, version=version)


# ---------------------------------------------------------------------------------------
# formula helpers (lme4 syntax)
# ---------------------------------------------------------------------------------------
def _split_top(s: str, sep: str = "+") -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur).strip())
    return [t for t in out if t]


@dataclass(frozen=True)
class ReTerm:
    lhs: str  # e.g. "1", "urban", "0 + x"
    group: str
    double_bar: bool

    @property
    def lhs_terms(self) -> list[str]:
        return _split_top(self.lhs)

    @property
    def intercept_only(self) -> bool:
        return [t.replace(" ", "") for t in self.lhs_terms] == ["1"]


def parse_formula(formula: str) -> tuple[str, list[str], list[ReTerm]]:
    """Split an lme4 formula into (response, fixed terms, random-effect terms)."""
    lhs, rhs = formula.split("~", 1)
    fixed, re_terms = [], []
    for t in _split_top(rhs):
        if t.startswith("(") and t.endswith(")") and "|" in t:
            inner = t[1:-1]
            double = "||" in inner
            left, grp = inner.split("||" if double else "|", 1)
            re_terms.append(ReTerm(left.strip(), grp.strip(), double))
        else:
            fixed.append(t)
    return lhs.strip(), fixed, re_terms


def fixed_only(formula: str) -> str:
    """The formula without its random-effect terms."""
    resp, fixed, _ = parse_formula(formula)
    return f"{resp} ~ " + (" + ".join(fixed) if fixed else "1")


def pow_to_python(formula: str) -> str:
    """``I(age^2)`` -> ``I(age**2)`` (patsy and mixedlm read ``^`` inside I() as XOR/error)."""
    return re.sub(r"I\(([^()]*)\)", lambda m: "I(" + m.group(1).replace("^", "**") + ")", formula)


def norm_name(name: str, df: pd.DataFrame | None = None) -> str:
    """Normalise a coefficient name to lme4's spelling."""
    name = name.strip()
    if name in ("Intercept", "const", "_Intercept"):
        return "(Intercept)"
    m = re.fullmatch(r"(?:C\()?(\w+)\)?\[T\.(.+)\]", name)  # patsy: urban[T.Y]
    if m:
        return m.group(1) + m.group(2)
    m = re.fullmatch(r"(\w+)\.(\d+)", name)  # mixedlm: urban.1 -> level index
    if m and df is not None and m.group(1) in df.columns:
        col = df[m.group(1)]
        cats = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else sorted(
            col.astype(str).unique()
        )
        i = int(m.group(2))
        if i < len(cats):
            return m.group(1) + str(cats[i])
    m = re.fullmatch(r"I\((.*)\)", name)
    if m:
        return "I(" + re.sub(r"\s*\*\*\s*", "^", m.group(1)).replace(" ", "") + ")"
    return name


def _levels(df: pd.DataFrame) -> dict[str, list[str]]:
    return {
        c: [str(x) for x in df[c].cat.categories]
        for c in df.columns
        if isinstance(df[c].dtype, pd.CategoricalDtype)
    }


def _formula_columns(df: pd.DataFrame, formula: str) -> list[str]:
    toks = set(re.findall(r"[A-Za-z_.][A-Za-z0-9_.]*", formula))
    return [c for c in df.columns if c in toks]


def _family_obj_statsmodels(family: str):
    import statsmodels.api as sm

    return {
        "binomial": sm.families.Binomial,
        "poisson": sm.families.Poisson,
        "gaussian": sm.families.Gaussian,
    }[family]()


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(mod)
    except Exception:
        return None


def _finite(x) -> float | None:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


# ---------------------------------------------------------------------------------------
# stratafit (ours)
# ---------------------------------------------------------------------------------------
def _summarise_ours(res) -> dict:
    fixed = {str(t): float(e) for t, e in zip(res.fixed["term"], res.fixed["estimate"])}
    re_ = {}
    vc = res.varcorr
    for _, r in vc.iterrows():
        if r["group"] == "Residual":
            continue
        if r.get("term2") is None or (isinstance(r.get("term2"), float) and math.isnan(r["term2"])):
            re_[f"sd({r['group']}:{r['term1']})"] = float(r["sd"])
        else:
            re_[f"cor({r['group']}:{r['term1']},{r['term2']})"] = float(r["correlation"])
    diag = getattr(res, "diagnostics", None)
    return {
        "loglik": _finite(res.loglik),
        "fixed": fixed,
        "re": re_,
        "converged": bool(diag.converged) if diag is not None else None,
        "extra": {
            "singular": bool(getattr(diag, "singular", False)) if diag is not None else None,
            "evaluations": getattr(getattr(res, "optinfo", None), "evaluations", None),
            "warnings": list(getattr(diag, "warnings", ()) or ()),
        },
    }


def ours_available() -> tuple[bool, str | None]:
    try:
        import fitting

        fitting.fit  # noqa: B018
    except Exception as e:  # ImportError, AttributeError
        return False, f"fitting.fit not available ({type(e).__name__}: {e})"
    return True, None


def time_ours(df: pd.DataFrame, formula: str, family: str = "binomial", reps: int = 5,
              warmup: int = 1, **kwargs) -> PeerResult:
    """``fitting.fit(formula, df, family=...)`` (the formula as lme4 writes it)."""
    ok, why = ours_available()
    if not ok:
        return unavailable("stratafit", why)
    import fitting

    try:
        times, cpu, res = time_calls(lambda: fitting.fit(formula, df, family=family, **kwargs), reps, warmup)
    except Exception as e:
        return unavailable("stratafit", f"fit raised {type(e).__name__}: {e}")
    s = _summarise_ours(res)
    return PeerResult("stratafit", True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu,
                      version=_version("stratafit"), **s)


def loop_ours(df: pd.DataFrame, formula: str, by: str, family: str = "binomial",
              reps: int = 1) -> PeerResult:
    """A plain Python loop of ``fitting.fit`` over the strata; times are per whole loop."""
    ok, why = ours_available()
    if not ok:
        return unavailable("stratafit loop", why)
    import fitting

    parts = [g for _, g in df.groupby(by, observed=True, sort=True)]
    parts = [p.reset_index(drop=True) for p in parts]

    def run():
        out = []
        for p in parts:
            try:
                out.append(fitting.fit(formula, p, family=family))
            except Exception as e:  # count, don't abort the loop
                out.append(e)
        return out

    try:
        fitting.fit(formula, parts[0], family=family)  # warm-up, untimed
    except Exception:
        pass
    times, cpu, fits = time_calls(run, reps, warmup=0)
    fails = [f"{type(f).__name__}: {f}" for f in fits if isinstance(f, Exception)]
    lls = [_finite(f.loglik) if not isinstance(f, Exception) else None for f in fits]
    conv = sum(1 for f in fits if not isinstance(f, Exception) and f.diagnostics.converged)
    return PeerResult("stratafit loop", True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu,
                      converged=conv == len(parts),
                      extra={"n_strata": len(parts), "n_failed": len(fails),
                             "n_converged": conv, "first_failures": fails[:3], "loglik_by_stratum": lls})


# ---------------------------------------------------------------------------------------
# glmm (PyPI glmm 0.6.x, Rust kernel)
# ---------------------------------------------------------------------------------------
def _glmm_re(fit) -> dict[str, float]:
    out = {}
    for (grp, terms), vech in zip(fit.re_groups, fit.varcorr):
        q = len(terms)
        S = np.zeros((q, q))
        k = 0
        for j in range(q):  # column-major lower triangle
            for i in range(j, q):
                S[i, j] = S[j, i] = vech[k]
                k += 1
        sd = np.sqrt(np.clip(np.diag(S), 0, None))
        for i, t in enumerate(terms):
            out[f"sd({grp}:{t})"] = float(sd[i])
        for j in range(q):
            for i in range(j + 1, q):
                c = S[i, j] / (sd[i] * sd[j]) if sd[i] * sd[j] > 0 else float("nan")
                out[f"cor({grp}:{terms[j]},{terms[i]})"] = float(c)
    return out


def time_glmm(df: pd.DataFrame, formula: str, family: str = "binomial", reps: int = 5,
              warmup: int = 1) -> PeerResult:
    """PyPI ``glmm``: ``glmm.fit(df, formula, family=...)`` (Laplace, lme4 syntax)."""
    try:
        import glmm
    except ImportError as e:
        return unavailable("glmm", f"not installed ({e})")
    ver = _version("glmm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            times, cpu, fit = time_calls(lambda: glmm.fit(df, formula, family=family), reps, warmup)
        except Exception as e:
            return unavailable("glmm", f"fit raised {type(e).__name__}: {e}", ver)
    return PeerResult(
        "glmm", True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu, version=ver,
        loglik=_finite(fit.loglik),
        fixed={norm_name(n): float(b) for n, b in zip(fit.names, fit.beta)},
        re=_glmm_re(fit), converged=bool(fit.converged),
        extra={"singular": bool(fit.singular), "n_eval": int(fit.n_eval),
               "warnings": [w.get("kind") for w in (fit.warnings or [])]},
    )


def loop_glmm(df: pd.DataFrame, formula: str, by: str, family: str = "binomial",
              reps: int = 1) -> PeerResult:
    """A Python loop of ``glmm.fit`` over the strata (one untimed warm-up on the first)."""
    try:
        import glmm
    except ImportError as e:
        return unavailable("glmm loop", f"not installed ({e})")
    parts = [g.reset_index(drop=True) for _, g in df.groupby(by, observed=True, sort=True)]

    def run():
        out = []
        for p in parts:
            try:
                out.append(glmm.fit(p, formula, family=family))
            except Exception as e:
                out.append(e)
        return out

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        glmm.fit(parts[0], formula, family=family)  # warm-up
        times, cpu, fits = time_calls(run, reps, warmup=0)
    ok = [f for f in fits if not isinstance(f, Exception)]
    conv = sum(1 for f in ok if f.converged)
    return PeerResult("glmm loop", True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu,
                      version=_version("glmm"), converged=conv == len(parts),
                      extra={"n_strata": len(parts), "n_failed": len(parts) - len(ok),
                             "n_converged": conv,
                             "loglik_by_stratum": [None if isinstance(f, Exception) else _finite(f.loglik)
                                                   for f in fits]})


# ---------------------------------------------------------------------------------------
# mixedlm (PyPI mixedlm 1.3, lme4 port)
# ---------------------------------------------------------------------------------------
def time_mixedlm(df: pd.DataFrame, formula: str, family: str = "binomial", reps: int = 5,
                 warmup: int = 1) -> PeerResult:
    """``mixedlm.glmer(formula, df, family=Binomial())`` (``lmer`` for Gaussian, ML).

    mixedlm's parser takes ``I(x**2)``, not ``I(x^2)``: the formula is translated.
    """
    try:
        import mixedlm
        from mixedlm import families as mfam
    except ImportError as e:
        return unavailable("mixedlm", f"not installed ({e})")
    ver = _version("mixedlm")
    f = pow_to_python(formula)
    if family == "gaussian":
        call = lambda: mixedlm.lmer(f, df, REML=False)  # noqa: E731
    else:
        fam = {"binomial": mfam.Binomial, "poisson": mfam.Poisson}[family]()
        call = lambda: mixedlm.glmer(f, df, family=fam)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            times, cpu, m = time_calls(call, reps, warmup)
        except Exception as e:
            return unavailable("mixedlm", f"fit raised {type(e).__name__}: {e}", ver)
    re_ = {}
    try:
        for gname, g in m.VarCorr().groups.items():
            for i, t in enumerate(g.term_names):
                re_[f"sd({gname}:{norm_name(t, df)})"] = float(g.stddev[t])
            if g.corr is not None:
                for j in range(len(g.term_names)):
                    for i in range(j + 1, len(g.term_names)):
                        re_[f"cor({gname}:{norm_name(g.term_names[j], df)},"
                            f"{norm_name(g.term_names[i], df)})"] = float(g.corr[i, j])
    except Exception as e:  # pragma: no cover - informational
        re_ = {"error": str(e)}
    return PeerResult(
        "mixedlm", True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu, version=ver,
        loglik=_finite(m.logLik().value),
        fixed={norm_name(k, df): float(v) for k, v in m.fixef().items()},
        re=re_, converged=bool(getattr(m, "converged", True)),
    )


# ---------------------------------------------------------------------------------------
# statsmodels
# ---------------------------------------------------------------------------------------
def time_statsmodels_bayes(df: pd.DataFrame, formula: str, family: str = "binomial",
                           reps: int = 3, warmup: int = 1) -> PeerResult:
    """``BinomialBayesMixedGLM`` / ``PoissonBayesMixedGLM`` ``.fit_vb()`` (variational Bayes).

    Random effects become independent variance components (``vc_formulas``), so
    random intercepts, crossed or nested, are supported; correlated random slopes
    ``(x | g)`` are not (reported unavailable). There is no marginal likelihood to
    compare (loglik None); ``re`` holds exp(posterior mean of log SD). ``fit_map`` is
    not used: its variance estimates collapse to 0 (MAP of log SD is unbounded) and
    it is ~50x slower on these data.
    """
    peer = "statsmodels BayesMixedGLM (VB)"
    try:
        import statsmodels
        from statsmodels.genmod.bayes_mixed_glm import BinomialBayesMixedGLM, PoissonBayesMixedGLM
    except ImportError as e:
        return unavailable(peer, f"not installed ({e})")
    ver = statsmodels.__version__
    cls = {"binomial": BinomialBayesMixedGLM, "poisson": PoissonBayesMixedGLM}.get(family)
    if cls is None:
        return unavailable(peer, f"no {family} family (binomial and Poisson only)", ver)
    resp, fixed, re_terms = parse_formula(formula)
    if not re_terms:
        return unavailable(peer, "no random effects in formula", ver)
    vc, vc_names = {}, []
    for t in re_terms:
        if not t.intercept_only:
            return unavailable(
                peer, f"cannot fit ({t.lhs} | {t.group}): only independent variance "
                "components, no correlated random slopes", ver)
        if ":" in t.group or "/" in t.group:
            return unavailable(peer, f"nested grouping '{t.group}' not adapted", ver)
        vc[t.group] = f"0 + C({t.group})"
        vc_names.append(f"sd({t.group}:(Intercept))")
    fform = pow_to_python(f"{resp} ~ " + " + ".join(fixed or ["1"]))

    def call():
        m = cls.from_formula(fform, vc, df)
        return m, m.fit_vb()

    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        try:
            times, cpu, (m, r) = time_calls(call, reps, warmup)
        except Exception as e:
            return unavailable(peer, f"fit raised {type(e).__name__}: {e}", ver)
    conv = bool(getattr(r.optim_retvals, "success", True)) if r.optim_retvals is not None else None
    notes = ["variational posterior means; no Laplace log-likelihood"]
    if conv is False:
        notes.append("optimizer reported no convergence: " + str(getattr(r.optim_retvals, "message", "")))
    return PeerResult(
        peer, True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu, version=ver, loglik=None,
        fixed={norm_name(n): float(b) for n, b in zip(m.exog_names, r.fe_mean)},
        re={k: float(np.exp(v)) for k, v in zip(vc_names, r.vcp_mean)},
        converged=conv, notes=notes,
    )


def time_statsmodels_mixedlm(df: pd.DataFrame, formula: str, family: str = "gaussian",
                             reps: int = 5, warmup: int = 1) -> PeerResult:
    """``statsmodels MixedLM`` (ML): Gaussian only, one grouping factor."""
    peer = "statsmodels MixedLM"
    if family != "gaussian":
        return unavailable(peer, f"Gaussian only (model is {family})")
    import statsmodels
    import statsmodels.formula.api as smf

    resp, fixed, re_terms = parse_formula(formula)
    groups = {t.group for t in re_terms}
    if len(groups) != 1:
        return unavailable(peer, "one grouping factor only (crossed not adapted)", statsmodels.__version__)
    t = re_terms[0]
    re_formula = "1" if t.intercept_only else "~" + t.lhs
    fform = pow_to_python(f"{resp} ~ " + " + ".join(fixed or ["1"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        times, cpu, r = time_calls(
            lambda: smf.mixedlm(fform, df, groups=df[t.group], re_formula=re_formula).fit(reml=False),
            reps, warmup)
    return PeerResult(peer, True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu, version=statsmodels.__version__,
                      loglik=_finite(r.llf),
                      fixed={norm_name(k): float(v) for k, v in r.fe_params.items()},
                      converged=bool(r.converged))


def time_statsmodels_glm(df: pd.DataFrame, formula: str, family: str = "binomial",
                         reps: int = 10, warmup: int = 1) -> PeerResult:
    """Plain ``statsmodels`` GLM (IRLS) on the formula WITHOUT its random-effect terms."""
    peer = "statsmodels GLM (no RE)"
    import statsmodels
    import statsmodels.formula.api as smf

    fform = pow_to_python(fixed_only(formula))
    fam = _family_obj_statsmodels(family)
    try:
        times, cpu, r = time_calls(lambda: smf.glm(fform, df, family=fam).fit(), reps, warmup)
    except Exception as e:
        return unavailable(peer, f"fit raised {type(e).__name__}: {e}", statsmodels.__version__)
    return PeerResult(peer, True, median_s=median(times), times_s=times,
                      cpu_median_s=median(cpu), cpu_times_s=cpu, version=statsmodels.__version__,
                      loglik=_finite(r.llf),
                      fixed={norm_name(k): float(v) for k, v in r.params.items()},
                      converged=bool(r.converged), notes=[f"formula: {fform}"])


# ---------------------------------------------------------------------------------------
# R: lme4 / glmmTMB via Rscript
# ---------------------------------------------------------------------------------------
def rscript() -> str | None:
    return shutil.which("Rscript")


def _run_r(df: pd.DataFrame, formula: str, family: str, engine: str, mode: str, reps: int,
           by: str | None = None, timeout: float = 3600.0) -> tuple[dict | None, str | None]:
    exe = rscript()
    if exe is None:
        return None, "Rscript not found"
    cols = _formula_columns(df, formula)
    if by and by not in cols:
        cols.append(by)
    data = df[cols]
    with tempfile.TemporaryDirectory(prefix="stratafit-bench-r-") as tmp:
        csv = Path(tmp) / "data.csv"
        data.to_csv(csv, index=False)
        spec = {"csv": str(csv), "levels": _levels(data), "formula": formula, "family": family,
                "engine": engine, "mode": mode, "reps": int(reps), "by": by}
        spec_path = Path(tmp) / "spec.json"
        spec_path.write_text(json.dumps(spec))
        try:
            p = subprocess.run([exe, "--vanilla", str(R_SCRIPT), str(spec_path)], capture_output=True,
                               text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"Rscript timed out after {timeout:.0f}s"
    for line in p.stdout.splitlines():
        if line.startswith("RESULT_JSON: "):
            return json.loads(line[len("RESULT_JSON: "):]), None
    err = (p.stderr or p.stdout).strip().splitlines()
    tail = " | ".join(err[-3:]) if err else f"exit code {p.returncode}"
    if "there is no package called" in (p.stderr or ""):
        return None, f"R package missing: {tail}"
    return None, f"Rscript failed: {tail}"


def _aslist(x) -> list:
    """jsonlite's auto_unbox turns a length-1 vector into a scalar: undo that."""
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _r_result(peer: str, out: dict) -> PeerResult:
    fit = out["fit"]
    return PeerResult(
        peer, True, median_s=median(_aslist(out["times_s"])), times_s=_aslist(out["times_s"]),
        cpu_median_s=median(_aslist(out.get("cpu_s"))), cpu_times_s=_aslist(out.get("cpu_s")),
        version=f"{out['engine_version']} ({out['R_version']})",
        loglik=_finite(fit["loglik"]), fixed={k: float(v) for k, v in fit["fixed"].items()},
        re={k: float(v) for k, v in (fit.get("re") or {}).items()},
        converged=bool(fit.get("converged")),
        extra={"singular": fit.get("singular"), "messages": fit.get("messages"), "theta": fit.get("theta")},
        notes=["timed inside R with system.time(gcFirst=TRUE); R start-up and CSV read excluded"],
    )


def time_lme4(df: pd.DataFrame, formula: str, family: str = "binomial", reps: int = 5,
              engine: str = "glmer") -> PeerResult:
    """lme4 ``glmer`` (default control, Laplace) in an Rscript subprocess: 1 warm-up + ``reps``."""
    peer = "lme4" if engine == "glmer" else engine
    out, why = _run_r(df, formula, family, engine, "single", reps)
    if out is None:
        return unavailable(peer, why)
    return _r_result(peer, out)


def time_glmmtmb(df: pd.DataFrame, formula: str, family: str = "binomial", reps: int = 5) -> PeerResult:
    """glmmTMB (ML, nlminb, ``parallel = 1``) in an Rscript subprocess."""
    return time_lme4(df, formula, family, reps, engine="glmmTMB")


def loop_lme4(df: pd.DataFrame, formula: str, by: str, family: str = "binomial", reps: int = 1,
              engine: str = "glmer") -> PeerResult:
    """An R loop (``lapply`` over ``split(d, d[[by]])``) of glmer fits; times per whole loop."""
    peer = ("lme4" if engine == "glmer" else engine) + " loop"
    out, why = _run_r(df, formula, family, engine, "batch", reps, by=by)
    if out is None:
        return unavailable(peer, why)
    lls = out.get("loglik_by_stratum") or {}
    return PeerResult(
        peer, True, median_s=median(_aslist(out["times_s"])), times_s=_aslist(out["times_s"]),
        cpu_median_s=median(_aslist(out.get("cpu_s"))), cpu_times_s=_aslist(out.get("cpu_s")),
        version=f"{out['engine_version']} ({out['R_version']})",
        converged=out["n_converged"] == out["n_strata"],
        extra={"n_strata": out["n_strata"], "n_failed": out["n_failed"],
               "n_converged": out["n_converged"], "loglik_by_stratum": list(lls.values())},
        notes=["timed inside R with system.time(gcFirst=TRUE) around the whole loop"],
    )


# ---------------------------------------------------------------------------------------
# agreement
# ---------------------------------------------------------------------------------------
def max_abs_diff(a: dict[str, float], b: dict[str, float]) -> float | None:
    keys = set(a) & set(b)
    if not keys:
        return None
    return max(abs(a[k] - b[k]) for k in keys)


if __name__ == "__main__":  # smoke: every engine on Contraception's random-slope model
    import datasets

    m = datasets.fit_models()[2]
    for fn in (time_ours, time_glmm, time_mixedlm, time_statsmodels_bayes, time_statsmodels_glm,
               time_lme4, time_glmmtmb):
        r = fn(m.data, m.formula, reps=2)
        print(f"{r.peer:32s} ok={r.ok} wall={r.median_s} cpu={r.cpu_median_s} loglik={r.loglik} "
              f"reason={r.reason}")
        if r.ok:
            print("   fixed", {k: round(v, 5) for k, v in r.fixed.items()})
            print("   re   ", {k: round(v, 5) for k, v in r.re.items()})

"""Response module: y, prior weights, offset and family; η in, μ, weights, deviance out.

The response knows the family and nothing about ``Z`` or ``L`` (lme4's ``respModule``):
:mod:`fitting.glm` and :mod:`fitting.glmm` hand it ``η`` and get back what IRLS/PIRLS and
the Laplace gradient need.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import kernels
from .families import Family

_EPS = np.finfo(float).eps

__all__ = ["Response", "ResponseEval", "make_response", "sum_log"]

#: :func:`sum_log` multiplies blocks of this many factors in [1, 2] (products stay below
#: 2**512, far from overflow) and takes one log per block
_LOG_BLOCK = 512


def sum_log(x: np.ndarray, w: np.ndarray | None = None) -> float:
    """``Σ w_i log x_i`` for factors ``x_i`` in [1, 2] (``1 + e^{-|η|}`` of the logit deviance).

    Unweighted, as the log of products of :data:`_LOG_BLOCK` factors: one ``log`` per block
    instead of per row (a float64 ``log1p`` costs ~20 ns a row without AVX-512, a product
    ~1 ns). Each block product has a relative rounding error below ``512 ε``, so the sum
    is exact to ~1e-13 per block in absolute terms.
    """
    if w is not None:
        return float(w @ np.log(x))
    n = x.size
    head = n - n % _LOG_BLOCK
    total = float(np.log(x[:head].reshape(-1, _LOG_BLOCK).prod(axis=1)).sum()) if head else 0.0
    if head < n:
        total += float(np.log(np.prod(x[head:])))
    return total


class ResponseEval(NamedTuple):
    """Family quantities at one linear predictor.

    Attributes
    ----------
    eta, mu, dmu, var : ndarray (n,)
        Linear predictor, mean, ``dμ/dη`` and ``V(μ)``.
    W : ndarray (n,)
        Fisher (IRLS) weights ``w dμ² / V``.
    dev : float
        Sum of the deviance residuals (finite or ``inf``).
    """

    eta: np.ndarray
    mu: np.ndarray
    dmu: np.ndarray
    var: np.ndarray
    W: np.ndarray
    dev: float

    def score(self, resp: "Response") -> np.ndarray:
        """``-½ d(dev)/dη = w (y - μ) dμ / V`` per observation."""
        if resp.fast:  # canonical link: dμ/dη = V
            return resp.wy - resp.weights * self.mu
        return resp.weights * (resp.y - self.mu) * self.dmu / self.var


@dataclass(frozen=True, eq=False)
class Response:
    """Observed data and family of a fit.

    Attributes
    ----------
    y, weights, offset : ndarray (n,)
    family : Family
    const : float
        ``-2 Σ loglik - Σ dev`` (independent of μ): adds the normalising constants to a
        deviance so that ``dev + const = -2 loglik``.
    """

    y: np.ndarray
    weights: np.ndarray
    offset: np.ndarray
    family: Family
    const: float
    fast: str = ""  # "logit" / "log": closed forms of the canonical binomial / Poisson links
    wy: np.ndarray | None = None  # w * y
    sat: float = 0.0  # 2 * Σ w (y η_sat - b(η_sat)): saturated term of the fast deviance
    unit: bool = False  # every prior weight is 1 (then W is V itself and Σ log needs no weights)
    fused: bool = False  # closed forms by the compiled kernels of :mod:`fitting.kernels`

    @property
    def canonical(self) -> bool:
        return self.family.link.name == self.family.canonical_link

    def evaluate(self, eta: np.ndarray) -> ResponseEval:
        """Family quantities at ``eta`` (non-finite deviance reported as ``inf``)."""
        kind = self.fast
        if kind == "logit":
            # μ = expit(η), V = μ(1-μ); dev = -2 Σ w (y η - log(1 + e^η)) + c, from one
            # exp(-|η|) (kernels.logit_response: no cancellation on either side of 0)
            mu, v, lin, softplus = kernels.logit_response(eta, self.wy, self.weights, self.unit,
                                                          compiled=self.fused)
            dev = -2.0 * (lin - softplus) - self.sat
            return ResponseEval(eta, mu, v, v, v if self.unit else self.weights * v,
                                dev if np.isfinite(dev) else np.inf)
        if kind == "log":
            mu = np.exp(np.minimum(eta, 700.0))
            np.maximum(mu, _EPS, out=mu)
            dev = -2.0 * float(self.wy @ eta - self.weights @ mu) - self.sat
            return ResponseEval(eta, mu, mu, mu, self.weights * mu, dev if np.isfinite(dev) else np.inf)
        fam = self.family
        link = fam.link
        mu = link.inverse(eta)
        dmu = link.mu_eta(eta)
        var = fam.variance(mu)
        W = self.weights * dmu * dmu / var
        dev = float(np.sum(fam.deviance_residuals(self.y, mu, self.weights)))
        if not np.isfinite(dev):
            dev = np.inf
        return ResponseEval(eta, mu, dmu, var, W, dev)

    def derivatives(self, ev: ResponseEval):
        """What the analytic Laplace gradient needs at ``ev``.

        Returns
        -------
        d1 : ndarray
            ``d(dev_i)/dη``.
        dW : ndarray
            ``dW_i/dη`` of the Fisher weights.
        D2 : ndarray
            ``½ d²(dev_i)/dη²`` (the observed weights; equal to ``W`` for canonical links).
        """
        w = self.weights
        if self.fast:  # canonical: d1 = -2 w (y - μ), D2 = W, dW/dη = W V'(μ)
            d1 = -2.0 * (self.wy - w * ev.mu)
            dW = ev.W * (1.0 - 2.0 * ev.mu) if self.fast == "logit" else ev.W
            return d1, dW, ev.W
        fam = self.family
        d2mu = fam.link.mu_eta2(ev.eta)
        dvar = fam.variance_deriv(ev.mu)
        res = self.y - ev.mu
        d1 = -2.0 * w * res * ev.dmu / ev.var
        dW = w * (2.0 * ev.dmu * d2mu / ev.var - ev.dmu ** 3 * dvar / ev.var ** 2)
        if self.canonical:
            D2 = ev.W
        else:
            D2 = ev.W + w * res * (dvar * ev.dmu ** 2 / ev.var ** 2 - d2mu / ev.var)
        return d1, dW, D2

    def loglik(self, dev: float) -> float:
        """Log-likelihood with full constants from a deviance (scale 1 families)."""
        return -0.5 * (dev + self.const)


def make_response(y, weights, offset, family: Family, *, fused: bool = False) -> Response:
    """Build a :class:`Response`, computing the constant of the log-likelihood.

    ``fused=True`` evaluates the canonical logit by :func:`fitting.kernels.logit_response`
    (for models whose other passes use those kernels too: importing numba costs a few
    tenths of a second per process, which a one-term model need not pay).
    """
    y = np.asarray(y, dtype=float)
    w = np.asarray(weights, dtype=float)
    o = np.asarray(offset, dtype=float)
    unit = bool(np.all(w == 1.0))
    if family.name == "binomial" and unit and np.all((y == 0.0) | (y == 1.0)):
        # 0/1 outcomes: log C(1, y) = 0 and the saturated log-likelihood is 0, so the
        # constant and the saturated term below are exactly 0 (no gammaln/xlogy passes)
        fast = "logit" if family.link.name == "logit" else ""
        return Response(y, w, o, family, 0.0, fast, w * y, 0.0, True, fused)
    mu0 = family.starting_mu(y, w)
    dres0 = family.deviance_residuals(y, mu0, w)
    const = float(np.sum(-2.0 * family.loglik(y, mu0, w) - dres0))
    fast = ""
    if family.name == "binomial" and family.link.name == "logit":
        fast = "logit"
    elif family.name == "poisson" and family.link.name == "log":
        fast = "log"
    sat = 0.0
    if fast:
        # dev(μ) = 2 Σ w [ℓ_sat - ℓ(μ)]; the fast path computes -2 Σ w (yη - b(η)) - sat
        eta0 = family.link.link(mu0)
        b0 = np.logaddexp(0.0, eta0) if fast == "logit" else mu0
        dev0 = float(np.sum(dres0))
        sat = -2.0 * float((w * y) @ eta0 - w @ b0) - dev0
    return Response(y, w, o, family, const, fast, w * y, sat, unit, fused)

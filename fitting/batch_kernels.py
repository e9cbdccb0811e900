"""Row kernels of :mod:`fitting.batch`: family quantities on stacked rows, fast.

The batched Laplace evaluation (:mod:`fitting.batch_laplace`) needs, for every row and
many times per fit, the unit deviance and its derivatives in ``η``. The family methods
(:mod:`fitting.families`) compute them through scipy special functions that cost ~10x
numpy's ``exp``/``log1p``; the kernels here give the same values (to rounding) for the
two families of the nightly job with one ``exp`` and one ``log1p`` per row, and fall
back to the family methods for every other family/link.

A kernel is stateless: every method takes the per-row arrays (``y``, prior weights
``w``, the per-row deviance constant ``c``) explicitly, so the same kernel serves any
subset of the stacked rows; ``w=None`` means unit weights and ``c=None`` a zero
constant (0/1 responses), saving a multiplication per row. Quantities (``d`` the unit deviance times the prior weight,
``W`` the Fisher weight, all derivatives in ``η``):

``basic(eta)``  → ``W``, the score ``s = -½ dd/dη``, ``dev`` (rows) — what penalised
IRLS needs.
``higher(eta)`` → ``d2 = d²d/dη², d3, W1 = dW/dη, W2`` — what the analytic gradient and
Hessian of the Laplace deviance need (canonical links: ``d2 = 2W``, ``d3 = 2W1``).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import special

from .families import Family

__all__ = ["RowKernel", "LogitBinomialKernel", "LogPoissonKernel", "GenericKernel", "row_kernel"]

_EPS = np.finfo(float).eps
_LOG_EPS = math.log(_EPS)
_FD_STEP = 1e-5


class RowKernel:
    """Family quantities per row through the :class:`~fitting.families.Family` methods.

    Subclasses override :meth:`basic`/:meth:`higher`/:meth:`loglik_const` with faster
    closed forms; this base class is the generic (always correct) implementation.

    Parameters
    ----------
    family : Family
    """

    #: whether Newton for the GLM may start at ``β = 0`` (else from the family's starting mean)
    zero_start = False

    def __init__(self, family: Family):
        self.family = family

    @property
    def canonical(self) -> bool:
        return self.family.link.name == self.family.canonical_link

    # ------------------------------------------------------------------ constants
    def deviance_const(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Per-row part of the deviance independent of ``μ`` (0 for the generic kernel)."""
        return np.zeros_like(y)

    def loglik_const(self, y: np.ndarray, w: np.ndarray) -> np.ndarray:
        """Per-row ``-2 loglik - deviance`` (independent of μ), as :func:`make_response`."""
        fam = self.family
        mu0 = fam.starting_mu(y, w)
        return -2.0 * fam.loglik(y, mu0, w) - fam.deviance_residuals(y, mu0, w)

    # ------------------------------------------------------------------ per pass
    def _first(self, eta, y, w):
        fam = self.family
        mu = fam.link.inverse(eta)
        dmu = fam.link.mu_eta(eta)
        var = fam.variance(mu)
        W = w * dmu * dmu / var
        d1 = -2.0 * w * (y - mu) * dmu / var
        return mu, dmu, var, W, d1

    def basic(self, eta: np.ndarray, y: np.ndarray, w: np.ndarray, c: np.ndarray,
              deviance: bool = True):
        """Fisher weights ``W``, ``d1`` and (optionally) the deviance of every row.

        Returns
        -------
        W : ndarray (n,)
            Fisher weights.
        s : ndarray (n,)
            Scores ``-½ dd/dη = w (y - μ) μ' / V``.
        dev : ndarray (n,) or None
            Unit deviances times prior weights plus ``c`` (``inf``/``nan`` where not finite).
        aux : object
            Kernel-specific values reused by :meth:`higher` at the same ``eta``.
        """
        w = np.ones_like(eta) if w is None else w
        mu, _, _, W, d1 = self._first(eta, y, w)
        dev = None
        if deviance:
            dev = self.family.deviance_residuals(y, mu, w)
            if c is not None:
                dev = dev + c
        return W, -0.5 * d1, dev, None

    def deviance_rows(self, eta, y, w, c, aux=None) -> np.ndarray:
        """The ``dev`` of :meth:`basic` alone (``aux`` from :meth:`basic` at the same η)."""
        return self.basic(eta, y, w, c)[2]

    def _second(self, eta, y, w):
        """``d2, W1`` from the family's first and second link derivatives."""
        fam = self.family
        mu, dmu, var, W, _ = self._first(eta, y, w)
        d2mu = fam.link.mu_eta2(eta)
        dvar = fam.variance_deriv(mu)
        res = y - mu
        W1 = w * (2.0 * dmu * d2mu / var - dmu ** 3 * dvar / var ** 2)
        if self.canonical:
            d2 = 2.0 * W
        else:
            d2 = 2.0 * (W + w * res * (dvar * dmu ** 2 / var ** 2 - d2mu / var))
        return d2, W1

    def weight_derivs(self, eta, y, w, aux=None):
        """``W1, W2`` alone (for canonical links, where ``d2 = 2W`` and ``d3 = 2W1``)."""
        return self.higher(eta, y, w, aux)[2:]

    def higher(self, eta: np.ndarray, y: np.ndarray, w: np.ndarray, aux=None):
        """``d2, d3, W1, W2`` per row (third derivatives by central differences in η)."""
        w = np.ones_like(eta) if w is None else w
        d2, W1 = self._second(eta, y, w)
        h = _FD_STEP * np.maximum(1.0, np.abs(eta))
        d2p, W1p = self._second(eta + h, y, w)
        d2m, W1m = self._second(eta - h, y, w)
        return d2, (d2p - d2m) / (2.0 * h), W1, (W1p - W1m) / (2.0 * h)


class LogitBinomialKernel(RowKernel):
    """Binomial family, logit link: ``μ = 1/(1+e^{-η})`` from one ``exp`` per row.

    With ``t = e^{-η}``: ``μ = 1/(1+t)``, ``μ(1-μ) = t μ²`` (no cancellation) and the
    unit deviance ``2w(-log μ + (1-y)η) + c``, capped at ``-2w log ε`` like the family's
    ``μ ∈ [ε, 1-ε]``. The values agree with the family's to rounding for ``|η| < 36``
    (beyond, the Fisher weight is not floored at ``ε``: both are ~0 there).
    """

    zero_start = True

    def deviance_const(self, y, w):
        out = np.zeros_like(y)
        frac = (y > 0.0) & (y < 1.0)  # 0/1 responses contribute nothing
        if frac.any():
            yf = y[frac]
            out[frac] = 2.0 * w[frac] * (special.xlogy(yf, yf) + special.xlogy(1.0 - yf, 1.0 - yf))
        return out

    def loglik_const(self, y, w):
        k = w * y
        if not (np.all(np.abs(k - np.rint(k)) <= 1e-9 * np.maximum(1.0, k))
                and np.all(np.abs(w - np.rint(w)) <= 1e-9 * np.maximum(1.0, w))):
            return super().loglik_const(y, w)
        n, k = np.rint(w), np.rint(k)
        out = -self.deviance_const(y, w)
        many = n != 1.0
        if many.any():
            nm, km = n[many], k[many]
            logchoose = special.gammaln(nm + 1.0) - special.gammaln(km + 1.0) - special.gammaln(nm - km + 1.0)
            out[many] -= 2.0 * logchoose
        return out

    def basic(self, eta, y, w, c, deviance=True):
        t = np.maximum(eta, -700.0)  # exp(-η) stays finite
        np.negative(t, out=t)
        np.exp(t, out=t)  # t = e^{-η} = (1 - μ)/μ
        p = t + 1.0
        np.reciprocal(p, out=p)  # μ
        pq = t * p
        pq *= p  # μ(1 - μ) = e^{-η} μ², without cancellation
        s = y - p
        if w is not None:
            s *= w
        W = pq if w is None else w * pq
        aux = (p, pq)
        return W, s, self.deviance_rows(eta, y, w, c, aux) if deviance else None, aux

    def deviance_rows(self, eta, y, w, c, aux=None):
        """``2w(-log μ + (1-y)η) + c`` (= the binomial deviance), capped at ``-2w log ε``."""
        if aux is None:
            aux = self.basic(eta, y, w, None, deviance=False)[3]
        dev = np.log(aux[0])
        np.subtract(np.minimum(eta, 700.0) * (1.0 - y), dev, out=dev)
        np.minimum(dev, -_LOG_EPS, out=dev)
        dev *= 2.0 if w is None else 2.0 * w
        if c is not None:
            dev += c
        return dev

    def higher(self, eta, y, w, aux=None):
        if aux is None:
            aux = self.basic(eta, y, w, None, deviance=False)[3]
        W1, W2 = self.weight_derivs(eta, y, w, aux)
        W = aux[1] if w is None else w * aux[1]
        return 2.0 * W, 2.0 * W1, W1, W2

    def weight_derivs(self, eta, y, w, aux=None):
        if aux is None:
            aux = self.basic(eta, y, w, None, deviance=False)[3]
        p, pq = aux
        W = pq if w is None else w * pq
        W1 = 1.0 - 2.0 * p
        W1 *= W
        W2 = pq * -6.0
        W2 += 1.0
        W2 *= W
        return W1, W2


class LogPoissonKernel(RowKernel):
    """Poisson family, log link: ``μ = exp(min(η, 700))`` (floored at ε like the family)."""

    def deviance_const(self, y, w):
        out = -2.0 * w * y
        big = y > 1.0
        if big.any():
            out[big] += 2.0 * w[big] * y[big] * np.log(y[big])
        return out

    def loglik_const(self, y, w):
        out = 2.0 * w * y
        big = y > 1.0
        if big.any():
            yb = y[big]
            out[big] += 2.0 * w[big] * (special.gammaln(yb + 1.0) - yb * np.log(yb))
        return out

    def basic(self, eta, y, w, c, deviance=True):
        et = np.minimum(eta, 700.0)
        mu = np.exp(et)
        np.maximum(mu, _EPS, out=mu)
        W = mu if w is None else w * mu
        s = y - mu
        if w is not None:
            s *= w
        return W, s, self.deviance_rows(eta, y, w, c, mu) if deviance else None, mu

    def deviance_rows(self, eta, y, w, c, aux=None):
        mu = np.maximum(np.exp(np.minimum(eta, 700.0)), _EPS) if aux is None else aux
        et = np.minimum(eta, 700.0)
        np.maximum(et, _LOG_EPS, out=et)
        et *= y
        dev = mu - et
        dev *= 2.0 if w is None else 2.0 * w
        if c is not None:
            dev += c
        return dev

    def higher(self, eta, y, w, aux=None):
        mu = np.maximum(np.exp(np.minimum(eta, 700.0)), _EPS) if aux is None else aux
        W = mu if w is None else w * mu
        return 2.0 * W, 2.0 * W, W, W

    def weight_derivs(self, eta, y, w, aux=None):
        mu = np.maximum(np.exp(np.minimum(eta, 700.0)), _EPS) if aux is None else aux
        W = mu if w is None else w * mu
        return W, W


def row_kernel(family: Family) -> RowKernel:
    """The fastest kernel for ``family`` (generic through the family methods otherwise)."""
    key = (family.name, family.link.name)
    if key == ("binomial", "logit"):
        return LogitBinomialKernel(family)
    if key == ("poisson", "log"):
        return LogPoissonKernel(family)
    return GenericKernel(family)


class GenericKernel(RowKernel):
    """Any family/link, through the family methods (see :class:`RowKernel`)."""

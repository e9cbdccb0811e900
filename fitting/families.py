"""Families and links: small stateless classes.

A :class:`Link` maps the mean ``mu`` to the linear predictor ``eta``; a :class:`Family`
is a variance function, a deviance and a log-likelihood with full normalising
constants, bound to one of the links it allows. Neither holds per-dataset state.

Look them up by name with :func:`get_family`::

    fam = get_family("binomial", "probit")
    mu = fam.link.inverse(eta)
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np
from scipy import special

from .errors import FamilyError

__all__ = [
    "Link",
    "IdentityLink",
    "LogitLink",
    "ProbitLink",
    "CloglogLink",
    "LogLink",
    "Family",
    "Gaussian",
    "Binomial",
    "Poisson",
    "get_link",
    "get_family",
    "FAMILIES",
    "LINKS",
]

_EPS = np.finfo(float).eps
_SQRT2PI = math.sqrt(2.0 * math.pi)


class Link(ABC):
    """A link function ``eta = g(mu)`` and what PIRLS and the gradient need of it."""

    name: str = ""

    @abstractmethod
    def link(self, mu: np.ndarray) -> np.ndarray:
        """``eta = g(mu)``."""

    @abstractmethod
    def inverse(self, eta: np.ndarray) -> np.ndarray:
        """``mu = g^{-1}(eta)``, kept strictly inside the family's mean range."""

    @abstractmethod
    def mu_eta(self, eta: np.ndarray) -> np.ndarray:
        """``d mu / d eta``."""

    @abstractmethod
    def mu_eta2(self, eta: np.ndarray) -> np.ndarray:
        """``d^2 mu / d eta^2`` (used by the analytic Laplace gradient)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class IdentityLink(Link):
    name = "identity"

    def link(self, mu):
        return np.asarray(mu, dtype=float)

    def inverse(self, eta):
        return np.asarray(eta, dtype=float)

    def mu_eta(self, eta):
        return np.ones_like(np.asarray(eta, dtype=float))

    def mu_eta2(self, eta):
        return np.zeros_like(np.asarray(eta, dtype=float))


class LogitLink(Link):
    name = "logit"

    def link(self, mu):
        mu = np.asarray(mu, dtype=float)
        return np.log(mu) - np.log1p(-mu)

    def inverse(self, eta):
        mu = special.expit(np.asarray(eta, dtype=float))
        return np.clip(mu, _EPS, 1.0 - _EPS)

    def mu_eta(self, eta):
        p = special.expit(np.asarray(eta, dtype=float))
        return np.maximum(p * (1.0 - p), _EPS)

    def mu_eta2(self, eta):
        p = special.expit(np.asarray(eta, dtype=float))
        return p * (1.0 - p) * (1.0 - 2.0 * p)


class ProbitLink(Link):
    name = "probit"

    def link(self, mu):
        return special.ndtri(np.asarray(mu, dtype=float))

    def inverse(self, eta):
        eta = np.asarray(eta, dtype=float)
        thresh = -special.ndtri(_EPS)
        return special.ndtr(np.clip(eta, -thresh, thresh))

    def mu_eta(self, eta):
        eta = np.asarray(eta, dtype=float)
        return np.maximum(np.exp(-0.5 * eta * eta) / _SQRT2PI, _EPS)

    def mu_eta2(self, eta):
        eta = np.asarray(eta, dtype=float)
        return -eta * np.exp(-0.5 * eta * eta) / _SQRT2PI


class CloglogLink(Link):
    name = "cloglog"

    def link(self, mu):
        mu = np.asarray(mu, dtype=float)
        return np.log(-np.log1p(-mu))

    def inverse(self, eta):
        eta = np.asarray(eta, dtype=float)
        mu = -np.expm1(-np.exp(np.minimum(eta, 700.0)))
        return np.clip(mu, _EPS, 1.0 - _EPS)

    def mu_eta(self, eta):
        eta = np.minimum(np.asarray(eta, dtype=float), 700.0)
        return np.maximum(np.exp(eta - np.exp(eta)), _EPS)

    def mu_eta2(self, eta):
        eta = np.minimum(np.asarray(eta, dtype=float), 700.0)
        e = np.exp(eta)
        return np.exp(eta - e) * (1.0 - e)


class LogLink(Link):
    name = "log"

    def link(self, mu):
        return np.log(np.asarray(mu, dtype=float))

    def inverse(self, eta):
        eta = np.asarray(eta, dtype=float)
        return np.maximum(np.exp(np.minimum(eta, 700.0)), _EPS)

    def mu_eta(self, eta):
        return self.inverse(eta)

    def mu_eta2(self, eta):
        return self.inverse(eta)


LINKS: dict[str, type[Link]] = {
    cls.name: cls for cls in (IdentityLink, LogitLink, ProbitLink, CloglogLink, LogLink)
}


def get_link(link: str | Link) -> Link:
    """Return a link instance from a name or an instance.

    Raises
    ------
    FamilyError
        For an unknown name; the message lists the valid names.
    """
    if isinstance(link, Link):
        return link
    try:
        return LINKS[str(link).lower()]()
    except KeyError:
        raise FamilyError(
            f"unknown link {link!r}; valid links: {', '.join(sorted(LINKS))}"
        ) from None


class Family(ABC):
    """An exponential-family distribution bound to one of its allowed links.

    Parameters
    ----------
    link : str or Link, optional
        Defaults to the canonical link.
    """

    name: str = ""
    allowed_links: tuple[str, ...] = ()
    canonical_link: str = ""
    #: whether the dispersion is estimated (Gaussian) or fixed at 1
    estimates_scale: bool = False

    def __init__(self, link: str | Link | None = None):
        lk = get_link(self.canonical_link if link is None else link)
        if lk.name not in self.allowed_links:
            raise FamilyError(
                f"link {lk.name!r} is not allowed for family {self.name!r}; "
                f"allowed: {', '.join(self.allowed_links)}"
            )
        self.link = lk

    def __repr__(self) -> str:
        return f"{type(self).__name__}(link={self.link.name!r})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.link == other.link  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.link))

    @abstractmethod
    def variance(self, mu: np.ndarray) -> np.ndarray:
        """Variance function ``V(mu)``."""

    @abstractmethod
    def variance_deriv(self, mu: np.ndarray) -> np.ndarray:
        """``dV / dmu``."""

    @abstractmethod
    def deviance_residuals(self, y, mu, weights) -> np.ndarray:
        """Unit deviances times prior weights (their sum is the deviance)."""

    @abstractmethod
    def loglik(self, y, mu, weights, scale: float = 1.0) -> np.ndarray:
        """Per-observation log-likelihood with full normalising constants."""

    @abstractmethod
    def starting_mu(self, y, weights) -> np.ndarray:
        """A mean inside the valid range to start iterations from."""

    def working_weights(self, eta, weights) -> np.ndarray:
        """IRLS weights ``w * (dmu/deta)^2 / V(mu)``."""
        mu = self.link.inverse(eta)
        d = self.link.mu_eta(eta)
        return weights * d * d / self.variance(mu)


class Gaussian(Family):
    name = "gaussian"
    allowed_links = ("identity", "log")
    canonical_link = "identity"
    estimates_scale = True

    def variance(self, mu):
        return np.ones_like(np.asarray(mu, dtype=float))

    def variance_deriv(self, mu):
        return np.zeros_like(np.asarray(mu, dtype=float))

    def deviance_residuals(self, y, mu, weights):
        r = np.asarray(y, dtype=float) - mu
        return weights * r * r

    def loglik(self, y, mu, weights, scale=1.0):
        r = np.asarray(y, dtype=float) - mu
        return -0.5 * (weights * r * r / scale + np.log(2.0 * np.pi * scale / weights))

    def starting_mu(self, y, weights):
        return np.asarray(y, dtype=float).copy()


class Binomial(Family):
    """Binomial with ``y`` a proportion and ``weights`` the number of trials."""

    name = "binomial"
    allowed_links = ("logit", "probit", "cloglog")
    canonical_link = "logit"

    def variance(self, mu):
        mu = np.asarray(mu, dtype=float)
        return np.maximum(mu * (1.0 - mu), _EPS)

    def variance_deriv(self, mu):
        return 1.0 - 2.0 * np.asarray(mu, dtype=float)

    def deviance_residuals(self, y, mu, weights):
        y = np.asarray(y, dtype=float)
        return 2.0 * weights * (special.xlogy(y, y / mu) + special.xlogy(1.0 - y, (1.0 - y) / (1.0 - mu)))

    def loglik(self, y, mu, weights, scale=1.0):
        y = np.asarray(y, dtype=float)
        k = np.round(weights * y)
        n = np.round(weights)
        logchoose = special.gammaln(n + 1.0) - special.gammaln(k + 1.0) - special.gammaln(n - k + 1.0)
        return logchoose + special.xlogy(k, mu) + special.xlog1py(n - k, -mu)

    def starting_mu(self, y, weights):
        y = np.asarray(y, dtype=float)
        return (weights * y + 0.5) / (weights + 1.0)


class Poisson(Family):
    name = "poisson"
    allowed_links = ("log",)
    canonical_link = "log"

    def variance(self, mu):
        return np.maximum(np.asarray(mu, dtype=float), _EPS)

    def variance_deriv(self, mu):
        return np.ones_like(np.asarray(mu, dtype=float))

    def deviance_residuals(self, y, mu, weights):
        y = np.asarray(y, dtype=float)
        return 2.0 * weights * (special.xlogy(y, y / mu) - (y - mu))

    def loglik(self, y, mu, weights, scale=1.0):
        y = np.asarray(y, dtype=float)
        return weights * (special.xlogy(y, mu) - mu - special.gammaln(y + 1.0))

    def starting_mu(self, y, weights):
        return np.asarray(y, dtype=float) + 0.1


FAMILIES: dict[str, type[Family]] = {cls.name: cls for cls in (Gaussian, Binomial, Poisson)}


def get_family(family: str | Family = "gaussian", link: str | Link | None = None) -> Family:
    """Return a family instance bound to ``link`` (default: the canonical link).

    Parameters
    ----------
    family : str or Family
        ``"gaussian"``, ``"binomial"`` or ``"poisson"`` (case-insensitive), or an instance
        (returned as is when ``link`` is None).
    link : str or Link, optional

    Raises
    ------
    FamilyError
        Unknown family or link, or a link the family does not allow.
    """
    if isinstance(family, Family):
        return family if link is None else type(family)(link)
    try:
        cls = FAMILIES[str(family).lower()]
    except KeyError:
        import difflib

        near = difflib.get_close_matches(str(family).lower(), list(FAMILIES), n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise FamilyError(
            f"unknown family {family!r}{hint} (valid: {', '.join(FAMILIES)})"
        ) from None
    return cls(link)

"""Gauss–Hermite rules for integrals against the standard normal density.

A rule of ``K`` nodes ``z_j`` and weights ``w_j`` (summing to one) integrates

.. math:: \\int f(z)\\,\\phi(z)\\,dz \\approx \\sum_j w_j f(z_j)

exactly for every polynomial ``f`` of degree ``<= 2K - 1``, where ``phi`` is the
standard normal density. :func:`tensor_rule` builds the product rule in ``k``
dimensions (``K**k`` points) for ``phi_k``, the ``k``-variate standard normal density,
optionally pruned of points whose weight is negligible.

The rules are built from :func:`numpy.polynomial.hermite_e.hermegauss` (the
"probabilists'" Hermite polynomials, weight ``exp(-z**2 / 2)``) and rescaled by
``1 / sqrt(2 pi)``; they are cached by ``K`` (and ``k``, pruning) and returned as
read-only arrays, so callers can share them safely.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

__all__ = ["GHRule", "gauss_hermite", "tensor_rule", "MAX_GRID_POINTS"]

#: Largest tensor grid (``K**k`` points before pruning) :func:`tensor_rule` builds.
MAX_GRID_POINTS = 10_000


@dataclass(frozen=True)
class GHRule:
    """A quadrature rule for the ``k``-variate standard normal density.

    Attributes
    ----------
    nodes : ndarray, shape (J, k)
        Points ``z_j``.
    weights : ndarray, shape (J,)
        Weights ``w_j`` (positive, summing to one before pruning).
    log_weights : ndarray, shape (J,)
        ``log(w_j)``, computed from the weights of the 1-D factors (no underflow).
    half_sq_norm : ndarray, shape (J,)
        ``0.5 * ||z_j||**2``: the term adaptive quadrature adds back to undo the
        normal density the rule is built for.
    n_per_dim : int
        ``K``, nodes per dimension.
    """

    nodes: np.ndarray
    weights: np.ndarray
    log_weights: np.ndarray
    half_sq_norm: np.ndarray
    n_per_dim: int

    @property
    def k(self) -> int:
        """Dimension of the rule."""
        return int(self.nodes.shape[1])

    @property
    def size(self) -> int:
        """Number of points ``J``."""
        return int(self.nodes.shape[0])


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=float)
    a.setflags(write=False)
    return a


@lru_cache(maxsize=64)
def _gh1(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    z, w = hermegauss(n)
    # hermegauss integrates against exp(-z^2/2), whose total mass is sqrt(2 pi);
    # its weights sum to sqrt(2 pi) up to rounding, normalise exactly instead.
    w = w / math.sqrt(2.0 * math.pi)
    w = w / w.sum()
    z = 0.5 * (z - z[::-1])  # exact symmetry (the middle node of an odd rule is 0)
    w = 0.5 * (w + w[::-1])
    return _readonly(z), _readonly(w), _readonly(np.log(w))


def gauss_hermite(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the ``n``-point rule for the standard normal density.

    Parameters
    ----------
    n : int
        Number of nodes, ``>= 1``. ``n = 1`` is the single node 0 with weight 1.

    Returns
    -------
    nodes, weights : ndarray, shape (n,)
        Read-only, nodes ascending and symmetric about 0, weights summing to 1.

    Raises
    ------
    ValueError
        If ``n`` is not an integer ``>= 1``.
    """
    n = _check_n(n)
    z, w, _ = _gh1(n)
    return z, w


def _check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of quadrature nodes must be an integer >= 1, got {n!r}")
    return int(n)


def tensor_rule(n: int, k: int = 1, *, prune: float = 0.0) -> GHRule:
    """Product Gauss–Hermite rule in ``k`` dimensions.

    Parameters
    ----------
    n : int
        Nodes per dimension ``K >= 1``.
    k : int, default 1
        Dimension ``>= 1``.
    prune : float, default 0.0
        Drop points whose weight is below ``prune * max(weight)`` (e.g. ``1e-12``):
        the corners of the grid carry weights far below rounding and cost as much
        as the centre. ``0`` keeps the full ``K**k`` grid. Pruned rules are no
        longer exact for all polynomials of degree ``2K - 1``; the weights are not
        renormalised (the dropped mass is at most ``K**k * prune``).

    Returns
    -------
    GHRule
        Cached, read-only arrays; the first coordinate varies slowest.

    Raises
    ------
    ValueError
        For ``n < 1``, ``k < 1``, ``prune`` outside ``[0, 1)`` or a grid of more than
        :data:`MAX_GRID_POINTS` points.
    """
    n = _check_n(n)
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"dimension k must be an integer >= 1, got {k!r}")
    prune = float(prune)
    if not 0.0 <= prune < 1.0:
        raise ValueError(f"prune must be in [0, 1), got {prune!r}")
    if n ** int(k) > MAX_GRID_POINTS:
        raise ValueError(
            f"a {n}-node rule in {k} dimensions has {n}**{k} = {n ** int(k)} points, "
            f"more than the cap of {MAX_GRID_POINTS}; use fewer nodes per dimension"
        )
    return _tensor(n, int(k), prune)


@lru_cache(maxsize=64)
def _tensor(n: int, k: int, prune: float) -> GHRule:
    z, _, lw = _gh1(n)
    idx = np.indices((n,) * k).reshape(k, -1).T  # (n**k, k), first index slowest
    nodes = z[idx]
    logw = lw[idx].sum(axis=1)
    if prune > 0.0:
        keep = logw >= logw.max() + math.log(prune)
        nodes, logw = nodes[keep], logw[keep]
    return GHRule(
        nodes=_readonly(nodes),
        weights=_readonly(np.exp(logw)),
        log_weights=_readonly(logw),
        half_sq_norm=_readonly(0.5 * np.einsum("jk,jk->j", nodes, nodes)),
        n_per_dim=n,
    )

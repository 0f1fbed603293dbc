"""Stochastic Lanczos quadrature (SLQ) of the spectral density of the curvature."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from dargmin.influence._lanczos import lanczos
from dargmin.influence._problem import Curvature, FlatProblem, Loader
from dargmin.typing import PyTree


class SpectralDensity(NamedTuple):
    r"""Gauss quadrature rules of the spectral measure, one per probe.

    For a probe :math:`v` with :math:`\|v\|^2 = p` and the Lanczos tridiagonal
    :math:`T = S \operatorname{diag}(\theta) S^\top` started from :math:`v/\|v\|`,
    :math:`v^\top f(C) v \approx p \sum_k \tau_k f(\theta_k)` with
    :math:`\tau_k = S_{1k}^2`; this is exact for polynomials of degree :math:`< 2m`, and
    averaging over Rademacher probes estimates :math:`\operatorname{tr} f(C)`.

    Attributes
    ----------
    nodes
        :math:`\theta_k` per probe, shape ``(probes, m)`` (zero-padded if a run stopped
        early on an invariant subspace; padded entries have zero weight).
    weights
        :math:`\tau_k`, shape ``(probes, m)``; each row sums to one.
    dimension
        :math:`p`, the number of parameters.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dimension: int

    def trace(self, function: Callable[[np.ndarray], np.ndarray] = lambda x: x) -> float:
        r"""Estimate of :math:`\operatorname{tr} f(C)` (default :math:`f(x) = x`).

        Examples
        --------
        >>> density = SpectralDensity(np.array([[1.0, 3.0]]), np.array([[0.5, 0.5]]), 2)
        >>> density.trace()
        4.0
        """
        return float(self.dimension * np.mean(np.sum(self.weights * function(self.nodes), 1)))

    def density(self, grid: np.ndarray, width: float) -> np.ndarray:
        r"""The spectral density smoothed by a Gaussian of standard deviation ``width``,

        .. math:: \phi(t) = \frac{1}{n_v} \sum_{v} \sum_k \tau_k^{(v)}
           \frac{1}{\sqrt{2\pi}\sigma} e^{-(t - \theta_k^{(v)})^2 / 2\sigma^2},

        which integrates to one (the eigenvalue histogram divided by ``p``).

        Examples
        --------
        >>> density = SpectralDensity(np.array([[0.0]]), np.array([[1.0]]), 1)
        >>> round(float(density.density(np.array([0.0]), 1.0)[0]), 4)
        0.3989
        """
        grid = np.asarray(grid, dtype=float)
        gaps = (grid[:, None, None] - self.nodes[None]) / width
        kernel = np.exp(-0.5 * gaps**2) / (np.sqrt(2 * np.pi) * width)
        return np.mean(np.sum(self.weights[None] * kernel, axis=2), axis=1)


def spectral_density(
    curvature: Curvature,
    params: PyTree,
    loader: Loader,
    *,
    num_probes: int = 4,
    num_iterations: int = 40,
    seed: int = 0,
) -> SpectralDensity:
    r"""Spectral density of the Hessian or Gauss–Newton matrix by stochastic Lanczos
    quadrature (Golub & Meurant; Ghorbani, Krishnan & Xiao, 2019 for neural networks).

    Each probe runs ``num_iterations`` Lanczos steps (one pass over the loader per step,
    full reorthogonalization, memory ``(m, p)``) from a Rademacher vector; the eigenvalues
    and squared first components of the eigenvectors of the tridiagonal matrix are the
    nodes and weights of a Gauss quadrature of the spectral measure seen from that probe.
    The extreme eigenvalues are resolved first (they are nodes after a few steps); the
    bulk is resolved to a width of about (spectral range)/m.

    Parameters
    ----------
    curvature
        :class:`Hessian` or :class:`GaussNewton`.
    params
        Parameters (any pytree; only float arrays are differentiated).
    loader
        Re-iterable of batches.
    num_probes
        Number of random probes (the estimator's variance falls like ``1/num_probes``).
    num_iterations
        Lanczos steps per probe (capped at ``p``).
    seed
        Seed of the probes.

    Returns
    -------
    SpectralDensity

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> from dargmin.influence import Hessian
    >>> loader = [{"x": jnp.diag(jnp.array([1.0, 2.0, 3.0]))}]
    >>> curvature = Hessian(lambda w, b: 0.5 * jnp.sum((b["x"] @ w) ** 2))
    >>> density = spectral_density(curvature, jnp.zeros(3), loader, num_iterations=3)
    >>> round(density.trace(), 4)  # 1 + 4 + 9, exact with m = p
    14.0
    """
    problem = FlatProblem(curvature, params)
    keys = jax.random.split(jax.random.PRNGKey(seed), num_probes)
    steps = min(num_iterations, problem.size)
    nodes = np.zeros((num_probes, steps))
    weights = np.zeros((num_probes, steps))
    for index, key in enumerate(keys):
        probe = jax.random.rademacher(key, (problem.size,), problem.dtype)
        tri = lanczos(lambda q: problem.full_products(loader, q[None])[0], probe, steps)
        values, vectors = np.linalg.eigh(tri.tridiagonal())
        nodes[index, : tri.size] = values
        weights[index, : tri.size] = vectors[0] ** 2
    return SpectralDensity(nodes, weights, problem.size)

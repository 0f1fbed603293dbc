"""Lanczos driven from the host, for operators that are a pass over a data loader.

:func:`dargmin.curvature.lanczos_extreme_eigenvalues` runs its loop under ``lax.fori_loop``,
so its matvec must be traceable; a sum of products over the batches of a Python loader is
not (the loader is a host iterable of unknown length). This variant runs the same
recurrence (full reorthogonalization, two Gram–Schmidt passes) with one Python iteration
per product, keeps the basis on the device in one preallocated ``(m, p)`` buffer updated in
place (donated), and returns the tridiagonal matrix that SLQ needs besides the basis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Tridiagonalization(NamedTuple):
    """``Q A Qᵀ = T`` for the orthonormal rows of ``basis[:size]``.

    Attributes
    ----------
    alphas, betas
        Diagonal (``size``) and off-diagonal (``size - 1``) of ``T`` (host arrays).
    basis
        ``(m, p)`` buffer whose first ``size`` rows are the Lanczos vectors (device).
    size
        Krylov dimension reached (``< m`` when an invariant subspace was found).
    """

    alphas: np.ndarray
    betas: np.ndarray
    basis: jax.Array
    size: int

    def tridiagonal(self) -> np.ndarray:
        """The dense ``T`` (``size × size``)."""
        return np.diag(self.alphas) + np.diag(self.betas, 1) + np.diag(self.betas, -1)


@functools.partial(jax.jit, donate_argnums=(0,))
def _store(basis: jax.Array, index: jax.Array, row: jax.Array) -> jax.Array:
    return basis.at[index].set(row)


@jax.jit
def _three_term_step(
    basis: jax.Array, w: jax.Array, q: jax.Array, q_previous: jax.Array, beta_previous: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    alpha = jnp.vdot(q, w)
    w = w - alpha * q - beta_previous * q_previous
    # Rows not yet filled are zero, so orthogonalizing against the whole buffer keeps one
    # compiled shape for every step; two passes are "twice is enough" (Kahan/Parlett).
    w = w - basis.T @ (basis @ w)
    w = w - basis.T @ (basis @ w)
    return alpha, jnp.linalg.norm(w), w


def lanczos(
    matvec: Callable[[jax.Array], jax.Array], start: jax.Array, num_iterations: int
) -> Tridiagonalization:
    """``num_iterations`` Lanczos steps from ``start`` (flat) for a symmetric ``matvec``.

    Stops early, truncating ``T``, when the Krylov space becomes invariant (the next
    residual is at rounding level): the Ritz values are then exact eigenvalues.
    """
    dimension = int(start.size)
    steps = min(int(num_iterations), dimension)
    if steps < 1:
        raise ValueError(f"num_iterations must be >= 1, got {num_iterations}.")
    norm = jnp.linalg.norm(start)
    if not bool(norm > 0):
        raise ValueError("The Lanczos start vector is zero.")
    eps = float(jnp.finfo(start.dtype).eps)
    basis = jnp.zeros((steps, dimension), start.dtype)
    q = start / norm
    basis = _store(basis, jnp.asarray(0), q)
    q_previous = jnp.zeros_like(q)
    beta = jnp.zeros((), start.dtype)
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    for step in range(steps):
        w = matvec(q)
        alpha, beta_next, w = _three_term_step(basis, w, q, q_previous, beta)
        alphas.append(float(alpha))
        scale = max(scale, abs(float(alpha)) + float(beta_next) + float(beta))
        # Rounding leaves a residual of about eps·‖A‖·sqrt(p) (errors of p terms add like a
        # random walk); a tolerance linear in p would call every step of a float32 network
        # with millions of parameters a breakdown.
        if step + 1 == steps or float(beta_next) <= 10.0 * math.sqrt(dimension) * eps * scale:
            break
        betas.append(float(beta_next))
        q_previous, q, beta = q, w / beta_next, beta_next
        basis = _store(basis, jnp.asarray(step + 1), q)
    return Tridiagonalization(np.asarray(alphas), np.asarray(betas), basis, len(alphas))

"""Projections by sorting: the simplex (sparsemax) and the ℓ1 ball, with the Jacobian of
the support as a ``custom_jvp`` rule (see :mod:`dargmin.projections` for the conventions at
kinks)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dargmin.projections._common import _as_float, _like
from dargmin.typing import ArrayLike


@jax.custom_jvp
def _simplex(x: jax.Array, scale: jax.Array) -> jax.Array:
    # Threshold τ with Σ max(x - τ, 0) = scale, found by sorting (Held, Wolfe & Crowder
    # 1974): with u sorted decreasingly, ρ = max{j : u_j > (Σ_{i≤j} u_i - scale)/j} and
    # τ = (Σ_{i≤ρ} u_i - scale)/ρ. Written here (20 lines) rather than taken from a peer:
    # the derivative rule below needs the support, which no peer exposes.
    n = x.shape[0]
    u = jnp.sort(x)[::-1]
    excess = jnp.cumsum(u) - scale
    counts = jnp.arange(1, n + 1, dtype=x.dtype)
    # The largest j passing the test (a max, not a count, so that rounding which breaks
    # the prefix property cannot pick a wrong index); at least 1 for a positive scale.
    rho = jnp.maximum(jnp.max(jnp.where(u - excess / counts > 0, counts, 0)), 1)
    tau = excess[rho.astype(jnp.int32) - 1] / rho
    return jnp.maximum(x - tau, 0.0)


@_simplex.defjvp
def _simplex_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    x, scale = primals
    x_dot, scale_dot = tangents
    p = _simplex(x, scale)
    # J = diag(s) - s sᵀ/|S| on the support S = {p > 0}; a coordinate with x_i = τ exactly
    # (p_i = 0) is left out (the active-constraint convention of this module).
    support = (p > 0).astype(x.dtype)
    size = jnp.maximum(jnp.sum(support), 1)
    shift = (jnp.sum(support * x_dot) - scale_dot) / size
    return p, support * (x_dot - shift)


def projection_simplex(x: ArrayLike, scale: ArrayLike = 1.0) -> jax.Array:
    r"""Euclidean projection onto the simplex ``{p ≥ 0, Σ p = scale}`` (``scale > 0``).

    .. math::

        P(x) = \max(x - \tau, 0), \qquad \sum_i \max(x_i - \tau, 0) = s,

    with ``τ`` found by sorting (O(n log n)). The Jacobian on the support
    ``S = {i : P(x)_i > 0}`` (indicator ``s``) is

    .. math:: \partial_x P = \operatorname{diag}(s) - s s^\top / |S|, \qquad
              \partial_s P = s / |S|.

    For ``scale = 1`` this is sparsemax (Martins & Astudillo, 2016). The whole array is
    one vector (any shape); use :func:`sparsemax` or ``jax.vmap`` for a batch.

    Parameters
    ----------
    x
        The point to project (any shape, flattened).
    scale
        The sum of the simplex, a positive scalar (differentiable).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> [round(float(v), 3) for v in projection_simplex(jnp.array([3.0, 1.0, 2.5]), 2.0)]
    [1.25, 0.0, 0.75]
    """
    x = _as_float(x)
    return _simplex(x.ravel(), _like(scale, x)).reshape(x.shape)


def sparsemax(logits: ArrayLike, axis: int = -1) -> jax.Array:
    """Sparsemax along ``axis``: :func:`projection_simplex` of each slice (scale 1).

    A sparse alternative to softmax: the output is a probability vector with exact zeros.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> P = sparsemax(jnp.array([[1.0, 0.0, -1.0], [0.2, 0.1, 0.0]]))
    >>> [[round(float(v), 2) for v in row] for row in P]
    [[1.0, 0.0, 0.0], [0.43, 0.33, 0.23]]
    """
    z = jnp.moveaxis(_as_float(logits), axis, -1)
    flat = z.reshape(-1, z.shape[-1])
    one = jnp.ones((), z.dtype)
    out = jax.vmap(_simplex, in_axes=(0, None))(flat, one)
    return jnp.moveaxis(out.reshape(z.shape), -1, axis)


def projection_l1_ball(x: ArrayLike, radius: ArrayLike = 1.0) -> jax.Array:
    r"""Euclidean projection onto the ℓ1 ball ``{‖p‖₁ ≤ radius}``.

    Inside the ball ``P(x) = x``; outside,
    ``P(x) = sign(x) ⊙ P_Δ(|x|)`` with ``P_Δ`` the projection onto the simplex of scale
    ``radius`` (Duchi et al., 2008), so the Jacobian is
    ``D (diag(s) - s sᵀ/|S|) D`` with ``D = diag(sign x)`` and ``s`` the support.
    A point with ``‖x‖₁ = radius`` exactly counts as on the boundary (active).

    Parameters
    ----------
    x
        The point to project (any shape, one vector).
    radius
        The radius, a positive scalar (differentiable).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> [round(float(v), 2) for v in projection_l1_ball(jnp.array([2.0, -1.0, 0.1]))]
    [1.0, -0.0, 0.0]
    """
    x = _as_float(x)
    r = _like(radius, x)
    flat = x.ravel()
    # |x| has derivative sign(x) (0 at 0, where the projection is 0 anyway).
    outside = jnp.sign(flat) * _simplex(jnp.abs(flat), r)
    inside = jnp.sum(jnp.abs(flat)) < r
    return jnp.where(inside, flat, outside).reshape(x.shape)

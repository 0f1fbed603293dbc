"""Proximal operators: soft thresholding (ℓ1), the elastic net and block soft thresholding
(group ℓ1), with the Jacobian of the kept coordinates or groups as a ``custom_jvp`` rule."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.projections._common import _as_float, _like
from dargmin.typing import ArrayLike


@jax.custom_jvp
def _soft_threshold(x: jax.Array, lam: jax.Array) -> jax.Array:
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - lam, 0.0)


@_soft_threshold.defjvp
def _soft_threshold_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    x, lam = primals
    x_dot, lam_dot = tangents
    keep = jnp.abs(x) > lam  # |x| = λ exactly: thresholded (derivative 0)
    return _soft_threshold(x, lam), jnp.where(keep, x_dot - jnp.sign(x) * lam_dot, 0.0)


def prox_l1(x: ArrayLike, lam: ArrayLike = 1.0) -> jax.Array:
    r"""Proximal operator of ``λ‖·‖₁``: soft thresholding ``sign(x) max(|x| - λ, 0)``.

    .. math::

        \dot p_i = \begin{cases} \dot x_i - \operatorname{sign}(x_i)\,\dot\lambda_i &
        |x_i| > \lambda_i \\ 0 & |x_i| \le \lambda_i \end{cases}

    ``lam ≥ 0`` broadcasts against ``x`` (per-coordinate weights). For a step ``η`` use
    ``prox_l1(x, η λ)``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> prox_l1(jnp.array([-2.0, 0.5, 3.0]), 1.0).tolist()
    [-1.0, 0.0, 2.0]
    """
    x = _as_float(x)
    lam = _like(lam, x)
    shape = jnp.broadcast_shapes(x.shape, lam.shape)
    return _soft_threshold(jnp.broadcast_to(x, shape), jnp.broadcast_to(lam, shape))


def prox_elastic_net(x: ArrayLike, lam: ArrayLike = 1.0, mu: ArrayLike = 1.0) -> jax.Array:
    r"""Proximal operator of ``λ‖p‖₁ + (μ/2)‖p‖₂²``: ``prox_l1(x, λ) / (1 + μ)``.

    Differentiable in ``x``, ``λ`` and ``μ`` (the soft-thresholding rule of
    :func:`prox_l1`, then a smooth division).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> prox_elastic_net(jnp.array([-2.0, 0.5, 3.0]), 1.0, 1.0).tolist()
    [-0.5, 0.0, 1.0]
    """
    x = _as_float(x)
    return prox_l1(x, lam) / (1.0 + _like(mu, x))


def _group_sum(v: jax.Array, groups: jax.Array | None, num_groups: int) -> jax.Array:
    """Per element, the sum of ``v`` over the element's group (the last axis if no ids)."""
    if groups is None:
        return jnp.broadcast_to(jnp.sum(v, axis=-1, keepdims=True), v.shape)
    return jax.ops.segment_sum(v, groups, num_segments=num_groups)[groups]


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _block_soft_threshold(
    num_groups: int, x: jax.Array, lam: jax.Array, groups: jax.Array | None
) -> jax.Array:
    # groups (integer ids, or None) is an ordinary argument: JAX gives it a float0
    # tangent, ignored; only the static group count is a non-differentiable argument.
    norm = jnp.sqrt(_group_sum(x**2, groups, num_groups))
    keep = norm > lam
    return x * jnp.where(keep, 1.0 - lam / jnp.where(keep, norm, 1.0), 0.0)


@_block_soft_threshold.defjvp
def _block_soft_threshold_jvp(
    num_groups: int, primals: tuple, tangents: tuple
) -> tuple[jax.Array, jax.Array]:
    x, lam, groups = primals
    x_dot, lam_dot, _ = tangents
    norm = jnp.sqrt(_group_sum(x**2, groups, num_groups))
    # ‖x_g‖ ≤ λ (a group at zero included): the group is zeroed, derivative 0. Otherwise
    # p = x - λ u with u = x/‖x‖: ṗ = (1 - λ/‖x‖) ẋ + (λ/‖x‖) u ⟨u, ẋ⟩ - λ̇ u.
    keep = norm > lam
    safe = jnp.where(keep, norm, 1.0)
    u = x / safe
    along = _group_sum(u * x_dot, groups, num_groups)
    tangent = (1.0 - lam / safe) * x_dot + (lam / safe) * u * along - lam_dot * u
    return _block_soft_threshold(num_groups, x, lam, groups), jnp.where(keep, tangent, 0.0)


def prox_group_l1(
    x: ArrayLike,
    lam: ArrayLike = 1.0,
    groups: ArrayLike | None = None,
    num_groups: int | None = None,
) -> jax.Array:
    r"""Proximal operator of the group-ℓ1 norm ``λ Σ_g ‖p_g‖₂``: block soft thresholding.

    .. math:: p_g = \max\!\Big(1 - \frac{\lambda_g}{\|x_g\|_2}, 0\Big)\, x_g, \qquad
              \dot p_g = \Big(1 - \frac{\lambda_g}{\|x_g\|}\Big)\dot x_g
              + \frac{\lambda_g}{\|x_g\|} u_g u_g^\top \dot x_g - \dot\lambda_g u_g

    for ``‖x_g‖ > λ_g`` (``u_g = x_g/‖x_g‖``), and ``0`` for a zeroed group (including
    ``x_g = 0``, where JAX's own derivative of the norm is NaN).

    Parameters
    ----------
    x
        Without ``groups``: each slice along the last axis is one group (a 1-D ``x`` is a
        single group). With ``groups``: a 1-D array.
    lam
        ``λ ≥ 0``: a scalar, or one weight per group (shape ``x.shape[:-1]`` without
        ``groups``, ``(num_groups,)`` with them).
    groups
        Optional integer group id of each coordinate of a 1-D ``x``, in
        ``0 … num_groups - 1`` (groups of unequal sizes, in any order).
    num_groups
        The number of groups; inferred from ``groups`` outside ``jax.jit``, required inside.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> prox_group_l1(jnp.array([[3.0, 4.0], [0.3, 0.4]]), 2.5).tolist()  # norms 5, 0.5
    [[1.5, 2.0], [0.0, 0.0]]
    >>> prox_group_l1(jnp.array([3.0, 0.1, 4.0]), 2.5, groups=jnp.array([0, 1, 0])).tolist()
    [1.5, 0.0, 2.0]
    """
    x = _as_float(x)
    lam = _like(lam, x)
    if groups is None:
        if x.ndim == 0:
            raise ValueError("prox_group_l1 needs an array x with at least one axis.")
        lam_elem = jnp.broadcast_to(jnp.broadcast_to(lam, x.shape[:-1])[..., None], x.shape)
        return _block_soft_threshold(0, x, lam_elem, None)
    ids = jnp.asarray(groups)
    if x.ndim != 1 or ids.shape != x.shape or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            "prox_group_l1 with groups= needs a 1-D x and an integer array of group ids of "
            f"the same shape; got x {x.shape} and groups {ids.shape} ({ids.dtype})."
        )
    if num_groups is None:
        if isinstance(ids, jax.core.Tracer):
            raise ValueError(
                "prox_group_l1: pass num_groups= (a Python int) when groups is traced "
                "(under jax.jit or jax.vmap): the number of groups fixes the output shapes."
            )
        num_groups = int(np.max(np.asarray(ids))) + 1
    lam_groups = jnp.broadcast_to(lam, (num_groups,))
    return _block_soft_threshold(int(num_groups), x, lam_groups[ids], ids)

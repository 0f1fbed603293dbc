r"""Differentiable Euclidean projections and proximal operators, with exact Jacobians.

Each function here is the solution map of a tiny optimization problem,

.. math::

    P_C(x) = \arg\min_{p \in C} \tfrac12\|p - x\|_2^2, \qquad
    \operatorname{prox}_h(x) = \arg\min_p \tfrac12\|p - x\|_2^2 + h(p),

computed in closed form (or by a sort, for the simplex and the ℓ1 ball) and differentiable
in ``x`` and in the set's or the penalty's parameters (radius, bounds, ``λ``). They are
meant as the non-smooth part of projected- and proximal-gradient fixed points,
``x = P_C(x - η ∇f(x, θ))`` or ``x = prox_{ηh}(x - η ∇f(x, θ))``, differentiated by
:func:`dargmin.fixed_point`.

========================================  ====================================================
function                                  set or penalty
========================================  ====================================================
:func:`projection_simplex`,               ``{p ≥ 0, Σ p = s}`` (sparsemax: the scale-1 simplex
:func:`sparsemax`                         along an axis)
:func:`projection_l1_ball`                ``{‖p‖₁ ≤ r}``
:func:`projection_box`                    ``{l ≤ p ≤ u}``
:func:`projection_l2_ball`                ``{‖p‖₂ ≤ r}``
:func:`projection_non_negative`           ``{p ≥ 0}``
:func:`projection_affine_set`             ``{A p = b}``
:func:`prox_l1`                           ``λ‖p‖₁`` (soft thresholding)
:func:`prox_group_l1`                     ``λ Σ_g ‖p_g‖₂`` (block soft thresholding)
:func:`prox_elastic_net`                  ``λ‖p‖₁ + (μ/2)‖p‖₂²``
========================================  ====================================================

**Derivatives.** Where the map is piecewise smooth, the derivative is a ``jax.custom_jvp``
rule with the Jacobian of the active piece, because JAX's own derivative is wrong or
wasteful there: ``jnp.clip`` and ``jnp.maximum`` split a tie into ``0.5``/``0.5`` (a
Jacobian entry that no piece has), ``jnp.linalg.norm`` has a NaN derivative at zero (a
group at zero, the most common case in a sparse solution, poisons the whole reverse-mode
gradient, even through ``jnp.where``), and the simplex through ``jnp.sort`` costs a sort and
a permutation per tangent where the rule costs one masked sum. Every rule is written in
differentiable JAX operations of the primal input, so Hessians (zero almost everywhere
for the polyhedral sets, non-zero for the ℓ2 ball and the group prox) are exact too.
All functions compose with ``jax.jit``, ``jax.vmap``, ``jax.grad``, ``jax.jacfwd``.

**At kinks** (a point exactly on the boundary of the set, or exactly at a threshold),
the map is not differentiable and its Jacobian is set-valued. The convention here is the
same everywhere: *a constraint that holds with equality counts as active*, a coordinate
exactly at the threshold counts as thresholded. So ``projection_box`` at ``x = u`` has
derivative 0 in ``x`` and 1 in ``u``; ``prox_l1`` at ``|x| = λ`` has derivative 0;
``projection_simplex`` leaves out a coordinate with ``x_i = τ``; ``projection_l2_ball``
at ``‖x‖ = r`` uses the derivative of the radial projection. This is the one-sided
derivative from outside the set, one element of the Clarke generalized Jacobian. At such
points the solution of a projected-gradient fixed point may itself have a kink (a weakly
active constraint): the derivative :func:`dargmin.fixed_point` returns there is then one
of the one-sided derivatives, not *the* derivative.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> p = projection_simplex(jnp.array([0.5, 1.2, -0.3]))      # sparsemax
>>> [round(float(v), 2) for v in p]
[0.15, 0.85, 0.0]
>>> J = jax.jacfwd(projection_simplex)(jnp.array([0.5, 1.2, -0.3]))
>>> [[round(float(v), 2) for v in row] for row in J]          # diag(s) - s sᵀ/|S|
[[0.5, -0.5, 0.0], [-0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np

from dargmin.linear_solvers import LinearSolver, as_linear_solver, factorize, operator_tags
from dargmin.typing import ArrayLike

__all__ = [
    "projection_affine_set",
    "projection_box",
    "projection_l1_ball",
    "projection_l2_ball",
    "projection_non_negative",
    "projection_simplex",
    "prox_elastic_net",
    "prox_group_l1",
    "prox_l1",
    "sparsemax",
]


def _as_float(x: ArrayLike) -> jax.Array:
    """``x`` as a floating array (integers become the default float type)."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.inexact):
        x = x.astype(jnp.result_type(float))
    return x


def _like(value: ArrayLike, x: jax.Array) -> jax.Array:
    """A parameter in ``x``'s dtype (so custom_jvp tangents are floats, never float0)."""
    return jnp.asarray(value, dtype=x.dtype)


# --------------------------------------------------------------------------------------
# Simplex (sparsemax) and ℓ1 ball
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Box, orthant, ℓ2 ball
# --------------------------------------------------------------------------------------


@jax.custom_jvp
def _box(x: jax.Array, lower: jax.Array, upper: jax.Array) -> jax.Array:
    return jnp.minimum(jnp.maximum(x, lower), upper)


@_box.defjvp
def _box_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    x, lower, upper = primals
    x_dot, lower_dot, upper_dot = tangents
    # Strictly inside: the identity; on or beyond a bound: the bound's tangent (jnp.clip
    # would give 0.5 ẋ + 0.5 l̇ at x = l, which is no piece's derivative).
    free = (x > lower) & (x < upper)
    at_lower = x <= lower
    tangent = jnp.where(free, x_dot, jnp.where(at_lower, lower_dot, upper_dot))
    return _box(x, lower, upper), tangent


def projection_box(x: ArrayLike, lower: ArrayLike, upper: ArrayLike) -> jax.Array:
    r"""Euclidean projection onto the box ``{lower ≤ p ≤ upper}`` (elementwise clipping).

    .. math::

        \dot P_i = \begin{cases} \dot x_i & l_i < x_i < u_i \\ \dot l_i & x_i \le l_i \\
        \dot u_i & x_i \ge u_i \end{cases}

    ``lower`` and ``upper`` broadcast against ``x`` (``±jnp.inf`` for a missing bound) and
    must satisfy ``lower ≤ upper``; a coordinate exactly on a bound counts as clamped.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> x = jnp.array([-2.0, 0.5, 1.0])
    >>> projection_box(x, 0.0, 1.0).tolist()
    [0.0, 0.5, 1.0]
    >>> jax.jacfwd(projection_box)(x, 0.0, 1.0).diagonal().tolist()  # x = 1 is clamped
    [0.0, 1.0, 0.0]
    """
    x = _as_float(x)
    lower, upper = _like(lower, x), _like(upper, x)
    shape = jnp.broadcast_shapes(x.shape, lower.shape, upper.shape)
    return _box(*(jnp.broadcast_to(a, shape) for a in (x, lower, upper)))


@jax.custom_jvp
def _non_negative(x: jax.Array) -> jax.Array:
    return jnp.maximum(x, 0.0)


@_non_negative.defjvp
def _non_negative_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    (x,), (x_dot,) = primals, tangents
    return _non_negative(x), jnp.where(x > 0, x_dot, jnp.zeros_like(x_dot))


def projection_non_negative(x: ArrayLike) -> jax.Array:
    """Euclidean projection onto the non-negative orthant: ``max(x, 0)``.

    The derivative is ``1`` where ``x > 0`` and ``0`` where ``x ≤ 0`` (at ``x = 0`` the
    constraint counts as active; ``jnp.maximum`` would give ``0.5``).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> jax.jacfwd(projection_non_negative)(jnp.array([-1.0, 0.0, 2.0])).diagonal().tolist()
    [0.0, 0.0, 1.0]
    """
    return _non_negative(_as_float(x))


@jax.custom_jvp
def _l2_ball(x: jax.Array, radius: jax.Array) -> jax.Array:
    norm = jnp.sqrt(jnp.sum(x**2))
    outside = norm > radius
    return x * jnp.where(outside, radius / jnp.where(outside, norm, 1.0), 1.0)


@_l2_ball.defjvp
def _l2_ball_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    x, radius = primals
    x_dot, radius_dot = tangents
    norm = jnp.sqrt(jnp.sum(x**2))
    # On the sphere (‖x‖ = r) the radial projection's derivative is used (active); the
    # safe norm keeps the inactive branch free of 0/0 at x = 0, also in second derivatives.
    active = (norm >= radius) & (norm > 0)
    safe = jnp.where(active, norm, 1.0)
    u = x / safe
    radial = (radius / safe) * (x_dot - u * jnp.sum(u * x_dot)) + u * radius_dot
    return _l2_ball(x, radius), jnp.where(active, radial, x_dot)


def projection_l2_ball(x: ArrayLike, radius: ArrayLike = 1.0) -> jax.Array:
    r"""Euclidean projection onto the ℓ2 ball ``{‖p‖₂ ≤ radius}``: ``x · r / max(‖x‖, r)``.

    Outside the ball, with ``u = x/‖x‖``,

    .. math:: \dot P = \frac{r}{\|x\|}\,(I - u u^\top)\,\dot x + u\,\dot r ;

    inside, the identity. (JAX's derivative of ``jnp.linalg.norm`` is NaN at ``x = 0``,
    inside the ball, and leaks through ``jnp.where`` in reverse mode; the rule here is exact there.)

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> projection_l2_ball(jnp.array([3.0, 4.0]), 1.0).tolist()
    [0.6..., 0.8...]
    """
    x = _as_float(x)
    return _l2_ball(x, _like(radius, x))


# --------------------------------------------------------------------------------------
# Affine set
# --------------------------------------------------------------------------------------


def projection_affine_set(
    x: ArrayLike,
    A: ArrayLike,
    b: ArrayLike,
    *,
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "cholesky",
) -> jax.Array:
    r"""Euclidean projection onto the affine set ``{p : A p = b}``.

    .. math:: P(x) = x - A^\top (A A^\top)^{-1} (A x - b),

    smooth in ``x``, ``A`` and ``b`` (JAX differentiates it, to any order). The solve with
    ``A Aᵀ`` goes through :mod:`dargmin.linear_solvers`, factorized once, its result
    checked. ``A`` must have full row rank for the default ``"cholesky"``; for a consistent
    rank-deficient system (repeated constraints) pass ``linear_solver="lstsq"``: the
    minimum-norm solve, which warns with the rank it used.

    Parameters
    ----------
    x
        The point, shape ``(n,)``.
    A, b
        The constraints, shapes ``(m, n)`` and ``(m,)`` with ``m ≤ n``.
    linear_solver
        Strategy for ``A Aᵀ`` (default ``"cholesky"``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> p = projection_affine_set(jnp.array([1.0, 2.0]), jnp.array([[1.0, 1.0]]), jnp.array([1.0]))
    >>> p.tolist()                                   # onto the line x₁ + x₂ = 1
    [0.0, 1.0]
    """
    x = _as_float(x)
    A, b = _like(A, x), _like(b, x)
    if x.ndim != 1 or A.ndim != 2 or b.ndim != 1 or A.shape != (b.shape[0], x.shape[0]):
        raise ValueError(
            "projection_affine_set needs x of shape (n,), A of shape (m, n) and b of shape "
            f"(m,); got x {x.shape}, A {A.shape}, b {b.shape}. Use jax.vmap for batches."
        )
    strategy = as_linear_solver(linear_solver).resolve(
        A.shape[0], symmetric=True, positive_definite=True
    )
    tags = operator_tags(strategy, symmetric=True, positive_definite=True)
    gram = lx.MatrixLinearOperator(A @ A.T, tags)
    system = factorize(gram, strategy, context="projection_affine_set")
    return x - A.T @ system.solve(A @ x - b)


# --------------------------------------------------------------------------------------
# Proximal operators
# --------------------------------------------------------------------------------------


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

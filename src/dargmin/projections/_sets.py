"""Projections in closed form: the box, the non-negative orthant, the ℓ2 ball (``custom_jvp``
rules with the active-constraint convention of :mod:`dargmin.projections`) and the affine
set (smooth; one checked factorization of ``A Aᵀ``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import lineax as lx

from dargmin.linear_solvers import LinearSolver, as_linear_solver, factorize, operator_tags
from dargmin.projections._common import _as_float, _like
from dargmin.typing import ArrayLike


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

"""The difference schemes: step-size rules, the stencils, and Richardson extrapolation.

Everything reduces to the derivative of a function of one scalar ``t`` at ``t0``
(:func:`_derivative_along_line`): forward, backward and central differences, or central
differences at halving steps extrapolated in a Neville tableau with Ridders' error estimates
(:func:`_best_richardson_estimate`). The step rules are those of :mod:`dargmin.finite_differences`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.typing import DTypeLike, PyTree, ScalarLike

Method = Literal["central", "forward", "backward", "richardson"]
_METHODS = ("central", "forward", "backward", "richardson")
_RICHARDSON_FIRST_RELATIVE_STEP = 0.1


def _resolve_order(method: str, order: int | None) -> int | None:
    """Validate ``order``; ``None`` for Richardson means the full tableau."""
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}.")
    natural = {"forward": 1, "backward": 1, "central": 2}
    if method in natural:
        if order is not None and order != natural[method]:
            raise ValueError(
                f"method={method!r} has order {natural[method]}; use method='richardson' "
                f"for higher orders (got order={order})."
            )
        return natural[method]
    if order is not None and (order < 2 or order % 2):
        raise ValueError(f"Richardson order must be an even integer >= 2, got {order}.")
    return order


def _richardson_num_steps(dtype: DTypeLike) -> int:
    # Halve from h0 = s/10 until the central-difference optimum eps^(1/3) s: below that,
    # round-off dominates every tableau entry and finer steps only add noise.
    eps = float(jnp.finfo(dtype).eps)
    return math.ceil(math.log2(_RICHARDSON_FIRST_RELATIVE_STEP / eps ** (1.0 / 3.0))) + 1


def _default_relative_step(method: str, dtype: DTypeLike) -> float:
    eps = float(jnp.finfo(dtype).eps)
    if method in ("forward", "backward"):
        return eps**0.5
    if method == "central":
        return eps ** (1.0 / 3.0)
    return _RICHARDSON_FIRST_RELATIVE_STEP


def _float_dtype(x: PyTree) -> np.dtype:
    dtype = jnp.result_type(x)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.result_type(float)


# Jitted because it is a long chain of tiny array operations: compiled once per shape,
# instead of dispatching (and compiling) every operation separately in eager mode.
@functools.partial(jax.jit, static_argnames="max_columns")
def _best_richardson_estimate(central: jax.Array, max_columns: int) -> jax.Array:
    """Neville/Richardson tableau over halving steps, Ridders-style selection.

    ``central[i]`` is D_0(h0 / 2^i) (leading axis = step index). Written by hand because
    neither JAX nor SciPy provide a traceable tableau (``scipy.differentiate`` runs in NumPy
    and cannot be jit-compiled or vmapped by JAX).
    """
    # With D_0(h) = f' + c_2 h^2 + c_4 h^4 + ... and step ratio 2,
    # T[i, j] = T[i, j-1] + (T[i, j-1] - T[i-1, j-1]) / (4^j - 1) cancels the h^(2j) term.
    # Error estimate of T[i, j] (Ridders / Numerical Recipes dfridr): the larger of its
    # distances to the two entries it was built from.
    column = central
    candidates = [column[1:]]
    errors = [jnp.abs(column[1:] - column[:-1])]
    for level in range(1, max_columns):
        new_column = column[1:] + (column[1:] - column[:-1]) / (4.0**level - 1.0)
        candidates.append(new_column)
        errors.append(
            jnp.maximum(jnp.abs(new_column - column[1:]), jnp.abs(new_column - column[:-1]))
        )
        column = new_column
    all_candidates = jnp.concatenate(candidates, axis=0)
    all_errors = jnp.concatenate(errors, axis=0)
    # NaN comes from steps that leave the function's domain; never select those entries.
    all_errors = jnp.where(jnp.isnan(all_errors), jnp.inf, all_errors)
    best = jnp.argmin(all_errors, axis=0)
    return jnp.take_along_axis(all_candidates, best[None], axis=0)[0]


def _derivative_along_line(
    g: Callable[[jax.Array], PyTree],
    t0: jax.Array,
    typical_scale: jax.Array,
    method: str,
    step: ScalarLike | None,
    order: int | None,
) -> PyTree:
    """Derivative of ``g`` at scalar ``t0``; ``typical_scale`` sets the default step."""
    dtype = t0.dtype
    if step is None:
        step = _default_relative_step(method, dtype) * typical_scale
    step = jnp.asarray(step, dtype)
    num_steps = _richardson_num_steps(dtype) if method == "richardson" else 1
    if order is not None and method == "richardson":
        num_steps = max(num_steps, order // 2 + 1)
    max_columns = num_steps - 1 if order is None else order // 2
    steps = step / 2.0 ** jnp.arange(num_steps, dtype=dtype)
    # Use the representable step (t0 + h) - t0 so that the rounding of t0 + h does not
    # enter the quotient (Numerical Recipes §5.7). For Richardson this makes step ratios
    # differ from 2 by O(eps / h), far below the target accuracy.
    steps = (t0 + steps) - t0

    if method == "forward":
        offsets = jnp.stack([steps[0], jnp.zeros((), dtype)])
    elif method == "backward":
        offsets = jnp.stack([jnp.zeros((), dtype), -steps[0]])
    else:
        offsets = jnp.concatenate([steps, -steps])
    values = jax.vmap(g)(t0 + offsets)

    def per_leaf(leaf_values: jax.Array) -> jax.Array:
        if method in ("forward", "backward"):
            return (leaf_values[0] - leaf_values[1]) / steps[0]
        broadcast_steps = steps.reshape((num_steps,) + (1,) * (leaf_values.ndim - 1))
        central = (leaf_values[:num_steps] - leaf_values[num_steps:]) / (2.0 * broadcast_steps)
        if method == "central":
            return central[0]
        return _best_richardson_estimate(central, max_columns)

    return jax.tree_util.tree_map(per_leaf, values)

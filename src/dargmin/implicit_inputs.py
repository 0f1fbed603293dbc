"""Input checks of the implicit-differentiation decorators: the optimality function's
output must mirror ``x`` (a square system), ``x`` must be a non-empty floating-point pytree,
and a solver must return the shapes of its ``init``. Each failure is a ``TypeError`` or
``ValueError`` naming both shapes, raised at trace time (so under ``jax.jit`` too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = ["flat_size", "validate_shapes", "validate_solver_output"]


def flat_size(tree: PyTree) -> int:
    """The number of scalar entries of ``tree``."""
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def validate_shapes(
    optimality_fn: Callable[..., PyTree], x: PyTree, params: tuple, kind: str
) -> None:
    try:
        out = jax.eval_shape(optimality_fn, x, *params)
    except TypeError as err:  # wrong arity or non-array outputs
        raise TypeError(
            f"Calling the {kind} optimality function as fn(x, *params) with "
            f"{len(params)} parameter argument(s) failed: {err}"
        ) from err
    x_struct = jax.tree_util.tree_structure(x)
    x_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(x)]
    out_shapes = [leaf.shape for leaf in jax.tree_util.tree_leaves(out)]
    if jax.tree_util.tree_structure(out) != x_struct or out_shapes != x_shapes:
        raise ValueError(
            f"The {kind} optimality function must return a pytree with the structure and "
            f"shapes of x (a square system); x has leaves of shapes {x_shapes}, the function "
            f"returned {jax.tree_util.tree_structure(out)} with shapes {out_shapes}."
        )
    if flat_size(x) == 0:
        raise ValueError(
            f"The {kind} solution x has no entries (leaves of shapes {x_shapes}): there is "
            "nothing to differentiate. Check the solver's output."
        )
    for leaf in jax.tree_util.tree_leaves(x):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"The solution x must have floating-point leaves to be differentiated, got "
                f"dtype {jnp.result_type(leaf)}."
            )


def validate_solver_output(
    solver: Callable[..., PyTree], init: PyTree, x_star: PyTree, kind: str
) -> None:
    """A solver that returns another shape than its ``init`` is a bug in the solver, not a
    convergence failure: say so with both shapes instead of reporting a huge residual."""
    if init is None:
        return
    init_struct = jax.tree_util.tree_structure(init)
    x_struct = jax.tree_util.tree_structure(x_star)
    init_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(init)]
    x_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(x_star)]
    if init_struct != x_struct or init_shapes != x_shapes:
        name = getattr(solver, "__name__", repr(solver))
        raise ValueError(
            f"dargmin.{kind}: the solver {name!r} returned a solution of shapes "
            f"{x_shapes} ({x_struct}) for an init of shapes {init_shapes} ({init_struct}). "
            "The solution must have the structure and shapes of init (e.g. reshape a (p, 1) "
            "column to (p,))."
        )

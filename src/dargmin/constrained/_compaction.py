"""A loop whose batched form runs its last passes on the members still active only.

``jax.vmap`` of a ``while_loop`` runs every pass on the whole batch until its slowest
member stops: each batched LAPACK call then factorizes every member, finished or not. The
interior point's active-set polish is such a loop (qpth's random QPs, n = 100, batch 128:
6 passes for the batch, but 80 members finish after 3, and 9 need the last two). Under
``vmap`` this loop gathers the active members into a smaller batch between stages and
scatters their results back. Why by hand: no JAX or XLA transformation compacts a batch
(``jax.custom_batching.custom_vmap`` is the hook that lets a function choose its own
batched form).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

#: (passes, fraction of the batch): the first 3 passes on the whole batch, the next on at
#: most half of it, the rest on at most an eighth.
DEFAULT_STAGES: tuple[tuple[int | None, float], ...] = ((3, 1.0), (1, 0.5), (None, 0.125))


def compacted_while(
    active: Callable[[Any], jax.Array],
    body: Callable[[Any, Any], Any],
    operands: Any,
    state: Any,
    stages: tuple[tuple[int | None, float], ...] = DEFAULT_STAGES,
) -> Any:
    """``while active(state): state = body(operands, state)``, for one member; under
    ``vmap``, by stages on a shrinking batch of the active members.

    ``stages`` are pairs (passes, fraction of the batch; ``None`` passes: until no
    member is active). A stage gathers the active members into a batch of that fraction
    (rounded down; the whole batch where more are active or the fraction rounds to 0),
    runs its passes there and scatters the states back. The batched form keeps an
    inactive member's state as it is, and gathers every batched operand (the body should
    be given only what it reads).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> def halve(operands, x):
    ...     return x / 2.0
    >>> xs = jnp.array([1.0, 8.0, 64.0])
    >>> jax.vmap(lambda x: compacted_while(lambda y: y > 1.0, halve, (), x))(xs).tolist()
    [1.0, 1.0, 1.0]
    """
    return _loop(active, body, stages)(operands, state)


def _loop(active: Callable, body: Callable, stages: tuple) -> Callable:
    @jax.custom_batching.custom_vmap
    def loop(operands: Any, state: Any) -> Any:
        return jax.lax.while_loop(active, lambda st: body(operands, st), state)

    @loop.def_vmap
    def loop_batched(size: int, in_batched: tuple, operands: Any, state: Any) -> tuple:
        ops_batched, state_batched = in_batched
        state = jax.tree_util.tree_map(
            lambda x, b: x if b else jnp.broadcast_to(x, (size, *jnp.shape(x))),
            state,
            state_batched,
        )
        ops_axes = jax.tree_util.tree_map(lambda b: 0 if b else None, ops_batched)
        step = jax.vmap(body, in_axes=(ops_axes, 0))
        is_active = jax.vmap(active)

        def run(ops: Any, st: Any, passes: int | None) -> Any:
            """Up to ``passes`` passes (``None``: until none is active) on a batch."""

            def going(carry: tuple) -> jax.Array:
                k, st = carry
                more = jnp.any(is_active(st))
                return more if passes is None else more & (k < passes)

            def one(carry: tuple) -> tuple:
                k, st = carry
                on = is_active(st)
                new = step(ops, st)
                kept = jax.tree_util.tree_map(
                    lambda a, b: jnp.where(on.reshape(on.shape + (1,) * (a.ndim - 1)), a, b),
                    new,
                    st,
                )
                return k + 1, kept

            return jax.lax.while_loop(going, one, (0, st))[1]

        def stage(st: Any, passes: int | None, limit: int) -> Any:
            """A stage on the active members gathered into a batch of ``limit`` (on the
            whole batch where more are active)."""

            def gathered(st: Any) -> Any:
                # The active members first (a stable sort keeps their order).
                idx = jnp.argsort(~is_active(st), stable=True)[:limit]
                ops = jax.tree_util.tree_map(lambda x, b: x[idx] if b else x, operands, ops_batched)
                sub = run(ops, jax.tree_util.tree_map(lambda x: x[idx], st), passes)
                return jax.tree_util.tree_map(lambda x, s: x.at[idx].set(s), st, sub)

            def whole(st: Any) -> Any:
                return run(operands, st, passes)

            count = jnp.sum(is_active(st))
            return jax.lax.cond(
                count == 0,
                lambda st: st,
                lambda st: jax.lax.cond(count <= limit, gathered, whole, st),
                st,
            )

        for passes, fraction in stages:
            limit = int(size * fraction)
            if limit >= size or limit < 1:
                state = run(operands, state, passes)
            else:
                state = stage(state, passes, limit)
        return state, jax.tree_util.tree_map(lambda _: True, state)

    return loop

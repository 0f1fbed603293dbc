"""The compiled kernels of :mod:`dargmin.sensitivity`, one set per ``(loss, regularizer)``.

Flat views of the problem ``F(θ, w) = Σᵢ wᵢ ℓ(θ, zᵢ) + r(θ)`` on the raveled parameters, and
the jitted bodies built on them: the total objective, the per-example gradients ``gᵢ``, the
Hessian ``H``, batched conjugate-gradient solves with ``H``, and the one-Newton-step
leave-one-out solves ``(H - Hᵢ)⁻¹ gᵢ`` (dense, Woodbury, CG). Cached per loss without keeping
it alive (:mod:`dargmin.sensitivity._weak_cache`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dargmin.derivatives import solve_cg
from dargmin.sensitivity._inputs import Loss, PyTree, Regularizer, _num_examples
from dargmin.sensitivity._weak_cache import _FunctionCache, _WeakCall


def _flat_problem(loss: Loss, regularizer: Regularizer, params: PyTree):
    """Flat views of the problem: ``θ ↦ ℓ(θ, z)`` and ``θ ↦ F(θ, 1)`` on a 1-D ``θ``.

    Working on the raveled parameters lets every solve be a plain matrix / vector one; the
    caller unravels the results back to the structure of ``params``.
    """
    flat, unravel = ravel_pytree(params)

    def example_loss(theta: jax.Array, example: PyTree) -> jax.Array:
        return loss(unravel(theta), example)

    def objective(theta: jax.Array, data: PyTree) -> jax.Array:
        total = jnp.sum(jax.vmap(example_loss, in_axes=(None, 0))(theta, data))
        if regularizer is not None:
            total = total + regularizer(unravel(theta))
        return total

    return flat, unravel, example_loss, objective


class _Kernels:
    """The jitted kernels of one ``(loss, regularizer)``.

    Repeated calls with the same functions reuse the compiled code instead of re-tracing,
    and nothing runs op by op. The kernels hold the functions weakly and are themselves
    cached weakly by them (:data:`_KERNELS`), so dropping a loss frees its compiled code.
    """

    def __init__(self, loss: Loss, regularizer: Regularizer):
        self.loss = _WeakCall(loss)
        self.regularizer = None if regularizer is None else _WeakCall(regularizer)

        def jit(body: Callable[..., Any], static_argnums: tuple[int, ...] = ()) -> Any:
            bound = functools.partial(body, self.loss, self.regularizer)
            return jax.jit(bound, static_argnums=static_argnums)

        self.total_objective = jit(_total_objective)
        self.example_gradients = jit(_example_gradients)
        self.total_hessian = jit(_total_hessian)
        self.solve_cg_batch = jit(_solve_cg_batch, static_argnums=(3, 4, 5))
        self.newton_dense = jit(_newton_dense, static_argnums=(2,))
        self.newton_woodbury = jit(_newton_woodbury, static_argnums=(2, 3))
        self.newton_cg = jit(_newton_cg, static_argnums=(2, 3, 4))


_KERNELS = _FunctionCache()  # loss -> _FunctionCache(regularizer -> _Kernels)


def _kernels(loss: Loss, regularizer: Regularizer) -> _Kernels:
    if not callable(loss):
        raise TypeError(f"loss must be a callable loss(params, example), got {loss!r}.")
    if regularizer is not None and not callable(regularizer):
        raise TypeError(
            f"regularizer must be None or a callable regularizer(params), got {regularizer!r}."
        )
    per_regularizer = _KERNELS.get(loss, _FunctionCache)
    kernels = per_regularizer.get(regularizer, lambda: _Kernels(loss, regularizer))
    kernels.loss.point_to(loss)
    if kernels.regularizer is not None:
        kernels.regularizer.point_to(regularizer)
    return kernels


# The bodies of the kernels, jitted per (loss, regularizer) by _Kernels.


def _total_objective(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    return _flat_problem(loss, regularizer, params)[3](ravel_pytree(params)[0], data)


def _example_gradients(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    flat, _, example_loss, _ = _flat_problem(loss, regularizer, params)
    return jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(flat, data)


def _total_hessian(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    flat, _, _, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)
    # Symmetrize: forward-over-reverse is symmetric only to round-off, and Cholesky reads
    # one triangle.
    return 0.5 * (hessian + hessian.T)


def _solve_cg_batch(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    rhs: jax.Array,
    max_steps: int,
    rtol: float,
    layout: tuple[int, int],
):
    """Solve ``H x_j = b_j`` for every row ``b_j`` of ``rhs`` by CG, never forming ``H``.

    ``layout`` is :func:`_row_layout` of ``rhs``: on row-sharded right-hand sides the solves
    run in chunks of rows spread over the devices (see :func:`_map_examples`).
    """
    flat, _, _, objective = _flat_problem(loss, regularizer, params)

    def hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(lambda t: jax.grad(objective)(t, data), (flat,), (v,))[1]

    def solve_one(b: jax.Array):
        solution = solve_cg(hvp, b, rtol=rtol, max_steps=max_steps, throw=False)
        return solution.value, solution.converged

    # vmap batches the right-hand sides through one CG loop: each iteration is one
    # batched Hessian-vector product instead of n separate ones.
    return _map_examples(solve_one, rhs, layout)


def _row_layout(
    tree: PyTree, batch_size: int, *, whole_if_unsharded: bool = False
) -> tuple[int, int]:
    """``(batch_size, shards)``: how many row blocks the leading axis of ``tree`` is split in.

    Read on the host from the arrays' shardings (a traced value has none), and passed to the
    kernels as a static argument. ``shards`` is 1 for NumPy arrays, replicated arrays and
    shardings that do not split the rows evenly. ``whole_if_unsharded``: on unsharded rows,
    one batch of all ``n`` (batched CG runs one loop for every right-hand side).
    """
    n = _num_examples(tree)
    shards = 1
    for leaf in jax.tree_util.tree_leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if sharding is None or not isinstance(leaf, jax.Array):
            continue
        rows = int(sharding.shard_shape(leaf.shape)[0])
        if 0 < rows < n and n % rows == 0:
            shards = max(shards, n // rows)
    if shards == 1 and whole_if_unsharded:
        return n, 1
    return batch_size, shards


def _map_examples(fn: Callable[[PyTree], PyTree], data: PyTree, layout: tuple[int, int]) -> PyTree:
    """``vmap`` of ``fn`` over the examples, in sequential batches when there are many.

    ``layout = (batch_size, shards)`` from :func:`_row_layout`. A single ``vmap`` when
    everything fits one batch: ``lax.map(batch_size=...)`` would compile a loop plus a
    remainder for nothing.

    Row-sharded data (``shards > 1``) cannot be cut into consecutive batches: ``lax.map``
    scans over its batch axis, and a scan over a sharded axis makes XLA gather the whole
    array on every device (measured: an all-gather of the 512 rows). Instead each step
    takes one row from each of ``w`` evenly spaced blocks, ``w`` a multiple of ``shards``
    dividing ``n``: viewing the rows as a ``(w, n/w)`` grid whose first axis is the sharded
    one, the loop runs over the second, so every device works on its own rows at every
    step and the results come back in the rows' own order and sharding.
    """
    batch_size, shards = layout
    n = _num_examples(data)
    if n <= batch_size:
        return jax.vmap(fn)(data)
    if shards <= 1:
        return jax.lax.map(fn, data, batch_size=batch_size)
    # The widest multiple of `shards` dividing n, at most max(batch_size, shards).
    width = max(w for w in range(shards, max(batch_size, shards) + 1, shards) if n % w == 0)
    steps = n // width

    def grid(leaf: jax.Array) -> jax.Array:  # row a·steps + b -> [b, a]
        return jnp.swapaxes(leaf.reshape(width, steps, *leaf.shape[1:]), 0, 1)

    def rows(leaf: jax.Array) -> jax.Array:  # the inverse of grid
        return jnp.swapaxes(leaf, 0, 1).reshape(n, *leaf.shape[2:])

    stepped = jax.lax.map(jax.vmap(fn), jax.tree_util.tree_map(grid, data))
    return jax.tree_util.tree_map(rows, stepped)


def _newton_dense(
    loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree, layout: tuple[int, int]
):
    """``(H - H_i)⁻¹ g_i`` for every ``i`` with per-example dense Hessians."""
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)

    def one(example: PyTree) -> jax.Array:
        g = jax.grad(example_loss)(flat, example)
        h = jax.hessian(example_loss)(flat, example)
        # The leave-i-out Hessian is a general (possibly indefinite when the model is not
        # convex) non-singular matrix: LU does not need positive definiteness.
        return jnp.linalg.solve(hessian - h, g)

    # Batches keep only batch_size per-example Hessians (p² each) alive.
    return _map_examples(one, data, layout)


def _newton_woodbury(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    rank: int,
    layout: tuple[int, int],
    key: jax.Array,
):
    """``(H - H_i)⁻¹ g_i`` by Sherman–Morrison–Woodbury from one factorization of ``H``.

    A randomized range finder recovers ``H_i = Q B Qᵀ`` exactly when ``rank(H_i) ≤ rank``
    (``Q`` spans ``H_i Ω`` for a Gaussian ``Ω``; ``B = Qᵀ H_i Q``). Then, with
    ``C = H⁻¹Q`` and ``u = H⁻¹g_i``, the form of Woodbury that tolerates a singular ``B``,

        (H - QBQᵀ)⁻¹ g = u + C (I - B QᵀC)⁻¹ B Qᵀ u,

    costs ``2·rank`` Hessian-vector products of one example and a ``rank × rank`` solve,
    instead of a ``p × p`` factorization per example. Returns the steps and, per example,
    the relative error of the low-rank representation on a fresh probe.
    """
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)
    # H⁻¹ formed once (p × p) and applied by products: a triangular solve batched over
    # examples is one solve with n right-hand-side columns, which XLA's partitioner gathers
    # onto every device when the examples are sharded (measured); a product stays local.
    inverse = _cholesky_inverse(hessian)
    p = flat.size
    probes = jax.random.normal(key, (p, rank + 1), dtype=flat.dtype)

    def one(example: PyTree):
        g = jax.grad(example_loss)(flat, example)

        def example_hvp(v: jax.Array) -> jax.Array:
            return jax.jvp(lambda t: jax.grad(example_loss)(t, example), (flat,), (v,))[1]

        hvps = jax.vmap(example_hvp, in_axes=1, out_axes=1)
        sketch = hvps(probes)  # H_i Ω, plus one probe kept aside to validate the rank
        q, _ = jnp.linalg.qr(sketch[:, :rank])
        b = q.T @ hvps(q)
        b = 0.5 * (b + b.T)
        # Validation: H_i ω for the spare probe must lie in span(Q) with the same action.
        spare = probes[:, rank]
        reconstructed = q @ (b @ (q.T @ spare))
        scale = jnp.linalg.norm(sketch[:, rank]) + jnp.finfo(flat.dtype).tiny
        mismatch = jnp.linalg.norm(sketch[:, rank] - reconstructed) / scale
        u = inverse @ g
        c = inverse @ q
        small = jnp.eye(rank, dtype=flat.dtype) - b @ (q.T @ c)
        step = u + c @ jnp.linalg.solve(small, b @ (q.T @ u))
        # An exactly zero H_i (e.g. a hinge-like flat loss) makes the mismatch 0/0-like:
        # scale is then ~tiny and the reconstruction 0, which is exact.
        mismatch = jnp.where(jnp.linalg.norm(sketch[:, rank]) == 0, 0.0, mismatch)
        return step, mismatch

    return _map_examples(one, data, layout)


def _newton_cg(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    max_steps: int,
    rtol: float,
    layout: tuple[int, int],
):
    """``(H - H_i)⁻¹ g_i`` by CG on ``v ↦ Hv - H_i v``, batched over examples."""
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)

    def total_hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(lambda t: jax.grad(objective)(t, data), (flat,), (v,))[1]

    def one(example: PyTree):
        g = jax.grad(example_loss)(flat, example)

        def leave_out_hvp(v: jax.Array) -> jax.Array:
            example_hvp = jax.jvp(lambda t: jax.grad(example_loss)(t, example), (flat,), (v,))
            return total_hvp(v) - example_hvp[1]

        solution = solve_cg(leave_out_hvp, g, rtol=rtol, max_steps=max_steps, throw=False)
        # CG may report a NaN right-hand side as converged (its NaN residual norm is not
        # above the tolerance).
        finite = jnp.all(jnp.isfinite(g)) & jnp.all(jnp.isfinite(solution.value))
        return solution.value, solution.converged & finite

    return _map_examples(one, data, layout)


def _cholesky_inverse(hessian: jax.Array) -> jax.Array:
    """``H⁻¹`` by one Cholesky factorization, symmetrized; NaN when ``H`` is not positive
    definite (the callers check)."""
    factor = jax.scipy.linalg.cho_factor(hessian, lower=True)
    inverse = jax.scipy.linalg.cho_solve(factor, jnp.eye(hessian.shape[0], dtype=hessian.dtype))
    return 0.5 * (inverse + inverse.T)

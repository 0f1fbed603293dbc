"""Solves with the Hessian ``H`` of the training objective, for many right-hand sides.

Dense: ``H`` built once and factorized once (Cholesky, LU when it is not positive definite)
for all right-hand sides. Matrix-free: conjugate gradients with Hessian-vector products,
batched over the right-hand sides. A failed solve is traced to its cause and refused.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dargmin.diagnostics import (
    SingularSystemError,
)
from dargmin.linear_solvers import DENSE_MAX_SIZE
from dargmin.sensitivity._checks import _raise_if_nonfinite
from dargmin.sensitivity._inputs import PyTree, _first_rows, _refusal
from dargmin.sensitivity._kernels import _Kernels, _row_layout

# Right-hand sides solved together by one batched CG loop when they are row-sharded (each
# batch is spread over the devices; see _kernels._map_examples). Unsharded: all at once.
_CG_BATCH = 128


@functools.partial(jax.jit, static_argnums=(2,))
def _dense_solve(hessian: jax.Array, rhs: jax.Array, method: str) -> jax.Array:
    """``H⁻¹ b_j`` for every row ``b_j`` of ``rhs``: ``rhs @ H⁻¹`` with ``H⁻¹`` from one
    Cholesky (or LU) factorization.

    The inverse (``p × p``) is formed and applied by a product rather than by triangular
    solves with ``n`` right-hand-side columns: XLA's partitioner has no rule for a sharded
    triangular solve and gathers row-sharded right-hand sides onto every device (measured),
    while the product stays on each device's rows. Non-finite entries in the result mean
    that ``H`` is not positive definite (Cholesky) or singular (LU).
    """
    eye = jnp.eye(hessian.shape[0], dtype=hessian.dtype)
    if method == "cholesky":
        inverse = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian, lower=True), eye)
        inverse = 0.5 * (inverse + inverse.T)
    else:
        inverse = jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(hessian), eye)
    return rhs @ inverse.T


@jax.jit
def _rows_not_finite(values: jax.Array) -> jax.Array:
    """Per row of a 2-D array: does it hold NaN/inf (computed where the rows are)."""
    return ~jnp.all(jnp.isfinite(values), axis=1)


def _default_rtol(dtype: Any) -> float:
    # A tenth of sqrt(eps): ~1.5e-9 in float64, ~3e-5 in float32 — CG's residual test is
    # relative, and float32 stalls well before eps.
    return 0.1 * float(jnp.finfo(dtype).eps) ** 0.5


def _resolve_solver(linear_solver: str, size: int) -> str:
    if linear_solver not in ("auto", "cholesky", "lu", "cg"):
        raise ValueError(
            f"linear_solver must be 'auto', 'cholesky', 'lu' or 'cg', got {linear_solver!r}."
        )
    if linear_solver == "auto":
        # Building the Hessian costs p Hessian-vector products and p² memory: worth it (one
        # factorization shared by all n solves) only while p is moderate.
        return "cholesky" if size <= DENSE_MAX_SIZE else "cg"
    return linear_solver


def _solve_hessian(
    kernels: _Kernels,
    params: PyTree,
    data: PyTree,
    rhs: jax.Array,
    *,
    linear_solver: str,
    rtol: float | None,
    max_steps: int | None,
    caller: str,
) -> jax.Array:
    """``H⁻¹ b_j`` for every row ``b_j`` of ``rhs`` (shape ``(m, p)``); returns ``(m, p)``.

    ``rhs`` must be finite (the callers check theirs).
    """
    size = rhs.shape[1]
    method = _resolve_solver(linear_solver, size)
    if method in ("cholesky", "lu"):
        hessian = kernels.total_hessian(params, data)
        solution = _dense_solve(hessian, rhs, "cholesky") if method == "cholesky" else None
        if solution is None or not bool(jnp.all(jnp.isfinite(solution))):
            # Cholesky failed (H not positive definite: a saddle accepted with
            # check="warn"/"ignore"): LU only needs H non-singular. Decided here rather
            # than with lax.cond so that the common case never compiles the LU branch.
            solution = _dense_solve(hessian, rhs, "lu")
        if not bool(jnp.all(jnp.isfinite(solution))):
            _raise_if_nonfinite(kernels, params, data, caller=caller, hessian=hessian)
            spectrum = jnp.linalg.eigvalsh(hessian)  # on the device: two scalars come back
            raise _refusal(
                SingularSystemError,
                "singular",
                f"dargmin.sensitivity.{caller}: solving with the Hessian gave non-finite "
                f"values: its eigenvalues lie in [{float(spectrum[0]):.3g}, "
                f"{float(spectrum[-1]):.3g}], so it is singular. Add a regularizer (e.g. a "
                "small ridge term).",
            )
        return solution
    rtol = float(rtol) if rtol is not None else _default_rtol(rhs.dtype)
    max_steps = max_steps if max_steps is not None else max(10 * size, 100)
    layout = _row_layout(rhs, _CG_BATCH, whole_if_unsharded=True)
    solution, converged = kernels.solve_cg_batch(params, data, rhs, max_steps, rtol, layout)
    # CG can stop at once, "converged", on a NaN right-hand side (a NaN residual norm is
    # not above the tolerance): check the inputs and the outputs. Only the count and the
    # first failed rows leave the devices.
    count, first = _first_rows(_rows_not_finite(rhs) | _rows_not_finite(solution) | ~converged)
    if count:
        _raise_if_nonfinite(kernels, params, data, caller=caller)
        raise _refusal(
            SingularSystemError,
            "singular",
            f"dargmin.sensitivity.{caller}: conjugate gradients on the Hessian did not reach "
            f"rtol={rtol:.2g} within max_steps={max_steps} for {count} of "
            f"{converged.shape[0]} right-hand sides (first: {first}): the "
            "Hessian is ill-conditioned or not positive definite. Raise max_steps, add a "
            "regularizer, or use linear_solver='cholesky'.",
        )
    return solution

"""Solves with the Hessian ``H`` of the training objective, for many right-hand sides.

Dense: ``H`` built once and factorized once (Cholesky, LU when it is not positive definite)
for all right-hand sides. Matrix-free: conjugate gradients with Hessian-vector products,
batched over the right-hand sides. A failed solve is traced to its cause and refused.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dargmin.diagnostics import (
    SingularSystemError,
)
from dargmin.linear_solvers import DENSE_MAX_SIZE
from dargmin.sensitivity._checks import _raise_if_nonfinite
from dargmin.sensitivity._inputs import PyTree, _refusal
from dargmin.sensitivity._kernels import _Kernels


@jax.jit
def _cholesky_solve(hessian: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solve ``H X = B`` for all columns of ``B`` with one Cholesky factorization.

    Non-finite entries in the result mean that ``H`` is not positive definite.
    """
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian, lower=True), rhs)


@jax.jit
def _lu_solve(hessian: jax.Array, rhs: jax.Array) -> jax.Array:
    return jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(hessian), rhs)


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
        solution = _cholesky_solve(hessian, rhs.T) if method == "cholesky" else None
        if solution is None or not bool(jnp.all(jnp.isfinite(solution))):
            # Cholesky failed (H not positive definite: a saddle accepted with
            # check="warn"/"ignore"): LU only needs H non-singular. Decided here rather
            # than with lax.cond so that the common case never compiles the LU branch.
            solution = _lu_solve(hessian, rhs.T)
        if not bool(jnp.all(jnp.isfinite(solution))):
            _raise_if_nonfinite(kernels, params, data, caller=caller, hessian=hessian)
            spectrum = np.linalg.eigvalsh(np.asarray(hessian))
            raise _refusal(
                SingularSystemError,
                "singular",
                f"dargmin.sensitivity.{caller}: solving with the Hessian gave non-finite "
                f"values: its eigenvalues lie in [{spectrum[0]:.3g}, {spectrum[-1]:.3g}], so "
                "it is singular. Add a regularizer (e.g. a small ridge term).",
            )
        return solution.T
    rtol = float(rtol) if rtol is not None else _default_rtol(rhs.dtype)
    max_steps = max_steps if max_steps is not None else max(10 * size, 100)
    solution, converged = kernels.solve_cg_batch(params, data, rhs, max_steps, rtol)
    # CG can stop at once, "converged", on a NaN right-hand side (a NaN residual norm is
    # not above the tolerance): check the inputs and the outputs.
    finite = np.all(np.isfinite(rhs), axis=1) & np.all(np.isfinite(solution), axis=1)
    failed = np.flatnonzero(~(np.asarray(converged) & finite))
    if failed.size:
        _raise_if_nonfinite(kernels, params, data, caller=caller)
        raise _refusal(
            SingularSystemError,
            "singular",
            f"dargmin.sensitivity.{caller}: conjugate gradients on the Hessian did not reach "
            f"rtol={rtol:.2g} within max_steps={max_steps} for {failed.size} of "
            f"{converged.shape[0]} right-hand sides (first: {failed[:5].tolist()}): the "
            "Hessian is ill-conditioned or not positive definite. Raise max_steps, add a "
            "regularizer, or use linear_solver='cholesky'.",
        )
    return solution

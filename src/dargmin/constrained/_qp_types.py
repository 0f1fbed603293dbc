"""The data, result and solver types of the QP layer, and the residuals every solver reports.

A QP is ``min ½xᵀQx + qᵀx s.t. Ax = b, Gx ≤ h``; its data travel together as a
:class:`QPData` (one unbatched problem inside a solver).
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp


class QPData(NamedTuple):
    """One unbatched QP: ``Q (n, n)``, ``q (n,)``, ``A (p, n)``, ``b (p,)``, ``G (m, n)``,
    ``h (m,)`` (empty constraint arrays when there are none)."""

    Q: jax.Array
    q: jax.Array
    A: jax.Array
    b: jax.Array
    G: jax.Array
    h: jax.Array


class QPInfo(NamedTuple):
    """Convergence of the forward solve (arrays; batched under ``vmap``).

    Attributes
    ----------
    converged
        Whether every residual below met the solver's tolerance.
    iterations
        Iterations used (``-1`` when the external solver does not say).
    primal_residual
        ``max(‖Ax − b‖∞, ‖max(Gx − h, 0)‖∞)``.
    dual_residual
        ``‖Qx + q + Aᵀν + Gᵀλ‖∞``.
    gap
        The complementarity ``sᵀλ / m`` (``0`` without inequalities).
    """

    converged: jax.Array
    iterations: jax.Array
    primal_residual: jax.Array
    dual_residual: jax.Array
    gap: jax.Array


class QPSolution(NamedTuple):
    """``x``, the multipliers ``ν`` of ``Ax = b`` and ``λ ≥ 0`` of ``Gx ≤ h`` (all
    differentiable), and the forward solve's :class:`QPInfo`."""

    x: jax.Array
    eq_dual: jax.Array
    ineq_dual: jax.Array
    info: QPInfo


class QPFactors(NamedTuple):
    """Factors a forward solver may hand to the KKT derivative for reuse (see
    :meth:`InteriorPoint.solve_and_factor`): ``Q = LLᵀ``, ``V = L⁻¹[A; G]ᵀ`` and
    ``VᵀV``, usable where ``usable`` (``Q`` positive definite and the factors computed)."""

    chol: jax.Array
    v: jax.Array
    gram: jax.Array
    usable: jax.Array


class QPSolver(Protocol):
    """A forward QP solver: ``(Q, q, A, b, G, h) -> (x, ν, λ, info)``, traceable (a
    callback for external solvers), for one unbatched problem.

    A solver may also have a ``solve_and_factor`` method with the same arguments,
    returning ``(x, ν, λ, info, QPFactors)``: :func:`solve_qp` then calls it instead and
    its default derivative reuses the factors where ``usable`` (they must be exactly the
    Cholesky factor of ``½(Q + Qᵀ)``, ``L⁻¹[A; G]ᵀ`` and its Gram matrix, as
    :meth:`InteriorPoint.solve_and_factor` computes them)."""

    def __call__(
        self, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, G: jax.Array, h: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, QPInfo]: ...


def qp_residuals(
    data: QPData, x: jax.Array, nu: jax.Array, lam: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(primal, dual, gap)`` of :class:`QPInfo` at ``(x, ν, λ)``; the objective's
    gradient is ``½(Q + Qᵀ)x + q`` for any ``Q`` (an external solver gets the caller's)."""
    Q, q, A, b, G, h = data
    grad = 0.5 * (Q @ x + x @ Q) + q
    dual = jnp.max(jnp.abs(grad + A.T @ nu + G.T @ lam), initial=0.0)
    primal = jnp.maximum(jnp.max(jnp.abs(A @ x - b), initial=0.0), jnp.max(G @ x - h, initial=0.0))
    slack = jnp.maximum(h - G @ x, 0.0)
    gap = jnp.sum(slack * lam) / max(h.size, 1)
    return primal, jnp.maximum(dual, 0.0), gap

r"""A batched quadratic-programming layer with KKT derivatives in every argument.

.. math::

    x^* = \arg\min_x \tfrac12 x^\top Q x + q^\top x \quad \text{s.t.} \quad A x = b,\;
    G x \le h .

The forward solve is a primal-dual interior-point method written in JAX
(:class:`InteriorPoint`: jittable, ``vmap``-able) or an external solver behind
``jax.pure_callback`` (:class:`Clarabel`, :class:`OSQP`). Either way the derivative is
dargmin's: the KKT system at the solution on its active set (:mod:`._kkt`), never the
unrolled iterations, with the KKT check (feasibility, stationarity, multipliers,
degenerate constraints, LICQ) before it. With the default ``linear_solver="lu"`` that
system is solved by the QP's own factorization (:mod:`._qp_derivative`: one Cholesky
chain, products for the tangents, no LAPACK call in the reverse pass); another linear
solver (``"lstsq"`` for redundant equalities, iterative ones) takes the generic route of
:func:`.kkt_solution`.

The pieces: the types in :mod:`._qp_types`, :class:`InteriorPoint` in
:mod:`._interior_point`, the external solvers in :mod:`._external`; this module holds the
layer itself (:func:`solve_qp`) and re-exports the rest under its former path.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx

from dargmin.constrained._derivative import kkt_solution
from dargmin.constrained._external import OSQP, Clarabel, _external_call
from dargmin.constrained._interior_point import InteriorPoint
from dargmin.constrained._qp_derivative import qp_duals_and_mask, qp_kkt_solution
from dargmin.constrained._qp_types import (
    QPData,
    QPFactors,
    QPInfo,
    QPSolution,
    QPSolver,
    qp_residuals,
)
from dargmin.constrained._settings import (
    ConstrainedProblem,
    Degenerate,
    KKTCheck,
    KKTSettings,
    reraise_constrained,
)
from dargmin.diagnostics import Check, CheckMode
from dargmin.errors import DargminError
from dargmin.linear_solvers import LU, LinearSolver, as_linear_solver, full_float32_products

__all__ = [
    "OSQP",
    "QP_PROBLEM",
    "Clarabel",
    "InteriorPoint",
    "QPData",
    "QPFactors",
    "QPInfo",
    "QPSolution",
    "QPSolver",
    "_external_call",
    "qp_residuals",
    "solve_qp",
]


def _qp_objective(x: jax.Array, Q: jax.Array, q: jax.Array, *_: jax.Array) -> jax.Array:
    return 0.5 * x @ (Q @ x) + q @ x


def _qp_eq(x: jax.Array, Q: jax.Array, q: jax.Array, A: jax.Array, b: jax.Array, *_: Any):
    return A @ x - b


def _qp_ineq(x: jax.Array, *args: jax.Array) -> jax.Array:
    G, h = args[4], args[5]
    return G @ x - h


#: The QP as a constrained problem of (Q, q, A, b, G, h): one compiled derivative for all.
QP_PROBLEM = ConstrainedProblem(_qp_objective, eq=_qp_eq, ineq=_qp_ineq)


@dataclass(frozen=True)
class _QPConfig:
    solver: Any = field(default_factory=InteriorPoint)
    settings: KKTSettings = field(default_factory=KKTSettings)


@functools.partial(jax.jit, static_argnums=0)
def _solve_one(config: _QPConfig, Q, q, A, b, G, h) -> QPSolution:
    frozen = jax.lax.stop_gradient
    args = (Q, q, A, b, G, h)
    lu = isinstance(config.settings.linear_solver, LU)
    solve_and_factor = getattr(config.solver, "solve_and_factor", None)
    reuse = None
    if lu and solve_and_factor is not None:
        # A solver that factorizes Q hands its factors to the derivative.
        x, nu, lam, info, reuse = solve_and_factor(*frozen(args))
        reuse = frozen(reuse)
    else:
        x, nu, lam, info = config.solver(*frozen(args))
    info = jax.tree_util.tree_map(frozen, info)
    if lu:
        # The default: the QP's own derivative (one Cholesky chain, see _qp_derivative).
        nu, lam, mask = qp_duals_and_mask(config.settings, frozen(x), nu, lam, frozen(args))
        x, nu, lam = qp_kkt_solution(config.settings, frozen((x, nu, lam)), mask, args, reuse)
        return QPSolution(x, nu, lam, info)
    # Another linear solver (lstsq for redundant equalities, iterative): the generic route.
    sol = kkt_solution(QP_PROBLEM, x, *args, eq_dual=nu, ineq_dual=lam, settings=config.settings)
    assert sol.eq_dual is not None and sol.ineq_dual is not None  # filled by kkt_solution
    return QPSolution(sol.x, sol.eq_dual, sol.ineq_dual, info)


def solve_qp(
    Q: jax.Array,
    q: jax.Array,
    A: jax.Array | None = None,
    b: jax.Array | None = None,
    G: jax.Array | None = None,
    h: jax.Array | None = None,
    *,
    solver: QPSolver | None = None,
    degenerate: Degenerate = "raise",
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "lu",
    check: CheckMode | Check | KKTCheck = "raise",
) -> QPSolution:
    r"""Solve ``min ½xᵀQx + qᵀx s.t. Ax = b, Gx ≤ h``, differentiably, possibly batched.

    The forward solve is ``solver`` (default :class:`InteriorPoint`, tolerance ``1e-10``
    in float64); its convergence is in ``QPSolution.info``. Derivatives with respect to
    every argument (``Q`` through the symmetric part ``½(Q + Qᵀ)`` the objective sees)
    come from the KKT system at the solution, restricted to its active set:

    .. math::

        \begin{pmatrix} Q & A^\top & G_\mathcal A^\top \\ A & 0 & 0 \\ G_\mathcal A & 0 & 0
        \end{pmatrix} \begin{pmatrix} \dot x \\ \dot\nu \\ \dot\lambda_\mathcal A
        \end{pmatrix} = -\begin{pmatrix} \dot Q x + \dot q + \dot A^\top \nu +
        \dot G_\mathcal A^\top \lambda_\mathcal A \\ \dot A x - \dot b \\
        \dot G_\mathcal A x - \dot h_\mathcal A \end{pmatrix},

    forward and reverse mode, under ``jit`` and ``vmap``, after the KKT check of
    :func:`constrained_argmin` (an infeasible instance, an unconverged solve, a weakly
    active constraint, dependent active constraints are refused with the numbers).

    Batches: arguments with one more leading axis than an unbatched problem
    (``Q: (B, n, n)``, ``q: (B, n)``, ``A: (B, p, n)``, ...) are solved as a batch, the
    others are shared (like qpth); or call ``jax.vmap(solve_qp)`` yourself.

    Parameters
    ----------
    Q, q
        ``(n, n)`` positive semidefinite (strictly convex for a unique derivative) and
        ``(n,)``.
    A, b, G, h
        ``(p, n)``, ``(p,)``, ``(m, n)``, ``(m,)``; ``None`` for no such constraints.
    solver
        :class:`InteriorPoint` (default), :class:`Clarabel`, :class:`OSQP` or any
        :class:`QPSolver`.
    degenerate, linear_solver, check
        As in :func:`constrained_argmin` (``linear_solver="lstsq"`` accepts redundant
        equalities). With ``"lu"`` (default) the KKT system is factorized by Cholesky
        after an augmented-Lagrangian shift (exact; see :mod:`._qp_derivative`), and a
        singular one (Q not positive definite on the null space of the active
        constraints) is refused with its pivot ratio.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> Q, q = jnp.eye(2), jnp.array([-1.0, -1.0])
    >>> G, h = jnp.array([[1.0, 1.0]]), jnp.array([1.0])     # x₁ + x₂ ≤ 1
    >>> sol = solve_qp(Q, q, G=G, h=h)
    >>> sol.x.round(6).tolist(), bool(sol.info.converged)
    ([0.5, 0.5], True)
    >>> jax.grad(lambda h: solve_qp(Q, q, G=G, h=h).x.sum())(h).round(6).tolist()
    [1.0]
    """
    q = jnp.asarray(q)
    batched = q.ndim == 2
    n = q.shape[-1]
    dtype = jnp.result_type(Q, q)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)

    def default(matrix: Any, vector: Any) -> tuple[jax.Array, jax.Array]:
        if matrix is None and vector is None:
            return jnp.zeros((0, n), dtype), jnp.zeros((0,), dtype)
        if matrix is None or vector is None:
            raise ValueError("Give both the matrix and the right-hand side of a constraint.")
        return jnp.asarray(matrix, dtype), jnp.asarray(vector, dtype)

    A_, b_ = default(A, b)
    G_, h_ = default(G, h)
    args = (jnp.asarray(Q, dtype), q.astype(dtype), A_, b_, G_, h_)
    config = _QPConfig(
        solver=solver if solver is not None else InteriorPoint(),
        settings=KKTSettings(
            linear_solver=as_linear_solver(linear_solver),
            check=KKTCheck.of(check),
            degenerate=degenerate,
            kind="solve_qp",
        ),
    )
    unbatched_ndim = (2, 1, 2, 1, 2, 1)
    axes = tuple(0 if a.ndim > d else None for a, d in zip(args, unbatched_ndim, strict=True))
    if batched or any(ax is not None for ax in axes):
        fn = jax.vmap(functools.partial(_solve_one, config), in_axes=axes)
        return _run(fn, *args)
    return _run(functools.partial(_solve_one, config), *args)


def _run(fn: Any, *args: jax.Array) -> QPSolution:
    try:
        # Full float32 products for the interior point and the derivative (TF32 on GPUs
        # stalled the interior point).
        with full_float32_products():
            return fn(*args)
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if not isinstance(err, DargminError):
            reraise_constrained(err)
        raise

r"""The one linear-system layer: solver strategies, defaults, factorization reuse, checked results.

Every linear system dargmin solves — the implicit system :math:`(\partial_x g)\,\dot x =
-\partial_\theta g\,\dot\theta`, the Newton step of the check, the Taylor coefficients, the
influence-function Hessian solves, the hypergradient's restricted system — goes through
this module. A *solver strategy* is a small immutable object that says

* which :mod:`lineax` solver to run (:meth:`LinearSolver.lineax_solver`); the solve is
  wrapped in :func:`jax.lax.custom_linear_solve`, so it is differentiable (in the right-hand
  side and the operator) and transposable: reverse mode is the transpose of the forward rule;
* what structure it needs (``needs``: a general, symmetric or positive-definite system);
* whether it is dense (a factorization, made once and reused through lineax's ``state``)
  or matrix-free (Krylov: operator products only, the matrix is never built).

=====================  ========================  ===========================================
strategy (name)        lineax solver             use when
=====================  ========================  ===========================================
``Cholesky()``         ``lineax.Cholesky``       SPD Hessian (a strict minimum); its success
                                                 certifies positive definiteness
``LU()``               ``lineax.LU``             any square non-singular system
``QR()``               ``lineax.QR``             square or full-rank rectangular
``LeastSquares()``     ``lineax.SVD``            singular systems: minimum-norm solution;
                                                 reports the rank used and the norm dropped
``CG()``               :class:`~dargmin.krylov.  large SPD Hessian; reports negative
                       ConjugateGradient`        curvature (a saddle) instead of diverging
``MINRES()``           :class:`~dargmin.krylov.  large symmetric indefinite (KKT, saddles)
                       MINRES`
``GMRES()``            ``lineax.GMRES``          large non-symmetric
``BiCGStab()``         ``lineax.BiCGStab``       large non-symmetric, low memory
``LSMR()``             ``lineax.LSMR``           large least squares
``Auto()``             —                         dense up to ``dense_max_size`` unknowns
                                                 (Cholesky if SPD, else LU), else CG/GMRES
=====================  ========================  ===========================================

Strings are shorthands for these objects (``"cholesky"`` is ``Cholesky()``, ...): the
registry :data:`SOLVERS` is the one place where a name maps to a strategy, so a new solver
is a new class plus one entry there. A raw :class:`lineax.AbstractLinearSolver` is accepted
too and wrapped in :class:`LineaxSolver`.

Results are always checked (:class:`CheckedSolver`): a Krylov method that stops at its step
limit, an LSMR run that settles for a least-squares residual on a square system, a
factorization that produces NaN, a truncated pseudo-inverse — each raises (or warns with)
a :class:`~dargmin.errors.DargminError` naming the solver, the numbers and the cause, inside
``jax.jit``, ``vmap`` and reverse mode too. No wrong vector is passed on silently.

Examples
--------
>>> import jax.numpy as jnp, lineax as lx
>>> solver = as_linear_solver("auto").resolve(size=3, symmetric=True, positive_definite=True)
>>> solver
Cholesky()
>>> op = lx.MatrixLinearOperator(jnp.diag(jnp.array([1.0, 2.0, 4.0])), lx.positive_semidefinite_tag)
>>> system = factorize(op, solver)                  # one factorization ...
>>> system.solve(jnp.ones(3)).tolist()              # ... reused for every right-hand side
[1.0, 0.5, 0.25]
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.solve_failures import report_failed_solve
from dargmin.solver_strategies import (
    CG,
    DENSE_MAX_SIZE,
    DENSE_MAX_SIZE_REUSED,
    GMRES,
    LSMR,
    LU,
    MINRES,
    QR,
    SOLVERS,
    Auto,
    BiCGStab,
    Cholesky,
    LeastSquares,
    LinearSolver,
    LineaxSolver,
    as_linear_solver,
    default_tolerances,
    operator_tags,
    two_norm,
    with_tolerances,
)

__all__ = [
    "CG",
    "DENSE_MAX_SIZE",
    "DENSE_MAX_SIZE_REUSED",
    "GMRES",
    "LSMR",
    "LU",
    "MINRES",
    "QR",
    "SOLVERS",
    "Auto",
    "BiCGStab",
    "CheckedSolver",
    "Cholesky",
    "Factorization",
    "LeastSquares",
    "LinearSolver",
    "LineaxSolver",
    "as_linear_solver",
    "default_tolerances",
    "factorize",
    "make_linear_solver",
    "operator_tags",
    "stop_gradient_arrays",
    "two_norm",
    "with_tolerances",
]


# --------------------------------------------------------------------------------------
# Checked solves
# --------------------------------------------------------------------------------------


class CheckedSolver(lx.AbstractLinearSolver):
    """A lineax solver whose every result is checked (forward, transposed and batched solves).

    After the inner solve, a host callback receives the lineax result code, whether the
    solution is finite, the relative residual ``‖Ax − b‖/‖b‖`` (Krylov and least-squares
    solvers: one more operator product), the step count and any condition or rank estimate,
    and raises :class:`~dargmin.errors.SingularSystemError` (``mode="raise"``) or warns
    (``mode="warn"``) with the numbers. lineax's own ``throw`` is then unnecessary (use
    ``throw=False``), and its messages never reach the user.
    """

    inner: lx.AbstractLinearSolver
    solver_name: str = eqx.field(static=True)
    context: str = eqx.field(static=True)
    mode: str = eqx.field(static=True, default="raise")
    max_condition: float = eqx.field(static=True, default=float("inf"))

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]):
        return self.inner.init(operator, options), operator

    def compute(self, state, vector, options: dict[str, Any]):
        inner_state, operator = state
        solution, result, stats = self.inner.compute(inner_state, vector, options)
        flat_b = ravel_pytree(vector)[0]
        # A zero right-hand side has the zero solution (lineax's BiCGStab returns NaN).
        zero_rhs = jnp.all(flat_b == 0)
        solution = jax.tree_util.tree_map(
            lambda leaf: jnp.where(zero_rhs, jnp.zeros_like(leaf), leaf), solution
        )
        result = lx.RESULTS.where(zero_rhs, lx.RESULTS.successful, result)
        flat_sol = ravel_pytree(solution)[0]
        dtype = flat_sol.dtype
        real = jnp.finfo(dtype).dtype
        nonfinite = ~jnp.all(jnp.isfinite(flat_sol))
        rank = jnp.asarray(-1.0, real)
        dropped = jnp.asarray(0.0, real)
        dense = isinstance(self.inner, lx.Cholesky | lx.LU | lx.QR)
        if dense:
            # An exact factorization has a tiny backward error whenever it is finite; its
            # accuracy is a matter of conditioning, which the diagnosis measures.
            residual = jnp.asarray(0.0, real)
        else:
            residual = jnp.linalg.norm(ravel_pytree(operator.mv(solution))[0] - flat_b)
        if isinstance(self.inner, lx.SVD):
            _, s, _ = inner_state[0]
            rcond = self.inner.rcond
            if rcond is None:
                rcond = float(jnp.finfo(dtype).eps) * max(flat_sol.size, flat_b.size)
            rank = jnp.sum(s > rcond * jnp.max(s)).astype(real)
            dropped = residual
            residual = jnp.asarray(0.0, real)  # truncation is the design: reported as rank
        steps = jnp.asarray(stats.get("num_steps", jnp.nan), real) if stats else jnp.nan
        condition = jnp.asarray(stats.get("cond_A", jnp.nan), real) if stats else jnp.nan
        if stats and "min_curvature" in stats:
            # CG: the slot carries the curvature met (reported on a breakdown). Zero curvature
            # within rounding of the largest met is a singular (semidefinite) matrix, not a
            # saddle: reported as such.
            curvature = stats["min_curvature"].astype(real)
            rounding = flat_b.size * jnp.finfo(real).eps * stats["max_curvature"].astype(real)
            broke = result == lx.RESULTS.breakdown
            condition = jnp.where(broke, curvature, condition)
            result = lx.RESULTS.where(broke & (curvature >= -rounding), lx.RESULTS.singular, result)
        code = jnp.asarray(result._value, jnp.int32)
        report = functools.partial(
            report_failed_solve,
            solver_name=self.solver_name,
            context=self.context,
            mode=self.mode,
            size=int(flat_b.size),
            dtype=np.dtype(real),
            max_condition=self.max_condition,
        )
        rhs_norm = jnp.linalg.norm(flat_b)
        steps = jnp.asarray(steps, real)
        condition = jnp.asarray(condition, real)
        # A solve "returned successful" whose true residual is far above what it was asked
        # for (10× its rtol, and at least 1 %) and above rounding of its absolute floor: LSMR
        # settling for least squares on a square system, or a solver's own stopping test
        # fooled (lineax's max norm).
        rtol = float(getattr(self.inner, "rtol", 0.0))
        atol = float(getattr(self.inner, "atol", 0.0))
        stalled = (residual > max(1e-2, 10 * rtol) * rhs_norm) & (residual > 100 * atol)
        # The report's triggers, on the device: the host is called only when some batch
        # member may have failed (a host round trip on every solve doubled small solves).
        suspicious = (
            (code != 0)
            | nonfinite
            | stalled
            | ((rank >= 0) & (rank < flat_b.size) & (dropped > 0))
            | (condition > self.max_condition)
        )
        zero = jax.lax.cond(
            eqxi.unvmap_any(suspicious),
            lambda args: jax.pure_callback(
                report, jax.ShapeDtypeStruct((), real), *args, vmap_method="expand_dims"
            ),
            lambda args: jnp.zeros((), real),
            (code, nonfinite, stalled, residual, rhs_norm, steps, condition, rank, dropped),
        )
        solution = jax.tree_util.tree_map(lambda leaf: leaf + zero.astype(leaf.dtype), solution)
        return solution, lx.RESULTS.successful, stats

    def transpose(self, state, options: dict[str, Any]):
        inner_state, operator = state
        transposed_state, transposed_options = self.inner.transpose(inner_state, options)
        return (transposed_state, operator.transpose()), transposed_options

    def conj(self, state, options: dict[str, Any]):
        inner_state, operator = state
        conj_state, conj_options = self.inner.conj(inner_state, options)
        return (conj_state, lx.conj(operator)), conj_options

    def assume_full_rank(self) -> bool:
        return self.inner.assume_full_rank()


class Factorization(eqx.Module):
    """A linear system prepared once (factorized, for dense strategies) and solved many times.

    Dense strategies factorize in :func:`factorize`; every :meth:`solve` reuses the factors
    through lineax's ``state`` (a triangular solve, O(n²), per right-hand side). Krylov
    strategies keep the operator. Solves are differentiable in the right-hand side (and, by
    lineax, in the operator).
    """

    operator: lx.AbstractLinearOperator
    solver: lx.AbstractLinearSolver
    state: Any

    def solve(self, rhs: Any) -> Any:
        """Solve ``A x = rhs`` (``rhs`` shaped like the operator's input), checked.

        Differentiable in ``rhs`` and in the operator (forward, reverse, any order) and
        batchable, through :func:`jax.lax.custom_linear_solve`: its rules are those of
        ``lineax.linear_solve`` (``ẋ = A⁻¹(ḃ − Ȧx)``, transposition by the solve with
        ``Aᵀ``), and it runs the prepared solver directly. Why not ``lineax.linear_solve``
        here: its wrapper (input checks, result plumbing, the error branch of a transposed
        solve) costs a fixed ~0.05 ms per call on the CPU, for checks that
        :class:`CheckedSolver` already makes. Measured in isolation on the ridge
        hypergradient of ``benchmarks/implicit_vs_peers.py`` at 100 unknowns: a bare
        ``custom_jvp`` with lineax's solve took 1.16-1.22x JAXopt's time, the same through
        ``custom_linear_solve`` 1.02x. Operators whose input and output structures differ
        still go through lineax.
        """
        structure = self.operator.in_structure()
        if structure != self.operator.out_structure():
            return lx.linear_solve(
                self.operator, rhs, self.solver, state=self.state, throw=False
            ).value
        solver, state = self.solver, self.state

        def solve(_: Any, b: Any) -> Any:
            return solver.compute(state, b, {})[0]

        def transpose_solve(_: Any, b: Any) -> Any:
            transposed_state, options = solver.transpose(state, {})
            return solver.compute(transposed_state, b, options)[0]

        symmetric = lx.is_symmetric(self.operator)
        return jax.lax.custom_linear_solve(
            self.operator.mv,
            rhs,
            solve,
            transpose_solve=None if symmetric else transpose_solve,
            symmetric=symmetric,
        )

    def solve_unchecked(self, rhs: Any) -> tuple[Any, jax.Array]:
        """Solve without the failure report; return ``(x, failed)`` with a boolean flag
        (used by the diagnosis, which measures rather than refuses). Not differentiable:
        the diagnosis measures at stopped values, so the prepared solver runs directly."""
        solution = self.solve_raw(rhs)
        return solution.value, solution.result != lx.RESULTS.successful

    def solve_raw(self, rhs: Any) -> lx.Solution:
        """Run the unchecked solver on ``rhs``: the solution, its result code and statistics
        (``state=None``), not differentiable (for measurements at stopped values)."""
        inner, state = self.unchecked_solver()
        value, result, stats = inner.compute(state, rhs, {})
        return lx.Solution(value=value, result=result, stats=stats, state=None)

    def unchecked_solver(self) -> tuple[lx.AbstractLinearSolver, Any]:
        """The lineax solver and state without the :class:`CheckedSolver` wrapper."""
        if isinstance(self.solver, CheckedSolver):
            return self.solver.inner, self.state[0]
        return self.solver, self.state

    def with_strategy(self, strategy: LinearSolver) -> Factorization:
        """The same system under another strategy (e.g. a looser Krylov tolerance).

        When the lineax solver type is unchanged the prepared state is reused: a Krylov
        solver's state is its (linearised) operator, which does not depend on tolerances,
        so the system is not linearised a second time.
        """
        size = int(self.operator.in_size())
        dtype = jax.tree_util.tree_leaves(self.operator.in_structure())[0].dtype
        inner = strategy.lineax_solver(size, dtype)
        checked = self.solver
        if not isinstance(checked, CheckedSolver) or type(inner) is not type(checked.inner):
            return factorize(self.operator, strategy)
        retuned = dataclasses.replace(checked, inner=inner, solver_name=strategy.name)
        return Factorization(self.operator, retuned, self.state)


def factorize(
    operator: lx.AbstractLinearOperator,
    solver: LinearSolver | lx.AbstractLinearSolver,
    *,
    context: str = "linear_solve",
    mode: str = "raise",
    max_condition: float = float("inf"),
) -> Factorization:
    """Prepare ``operator`` for repeated solves with ``solver`` (factorize once if dense).

    ``context`` names the caller in failure messages (e.g. ``"argmin"``); ``mode`` is
    ``"raise"`` or ``"warn"`` for failed solves; ``max_condition`` bounds the condition
    number estimate a solver reports (LSMR's), beyond which the solve is refused.
    """
    size = int(operator.in_size())
    if isinstance(solver, LinearSolver):
        name = solver.name
        dtype = jax.tree_util.tree_leaves(operator.in_structure())[0].dtype
        inner = solver.lineax_solver(size, dtype)
    else:
        name, inner = repr(solver), solver
    checked = CheckedSolver(
        inner, solver_name=name, context=context, mode=mode, max_condition=max_condition
    )
    # The factors are a function of the operator's value only: lineax differentiates a solve
    # through the operator itself, so factorizing a stopped copy spares JAX from tracing (or,
    # for QR, failing on) the factorization's own derivative under higher-order AD.
    return Factorization(operator, checked, checked.init(stop_gradient_arrays(operator), {}))


def full_float32_products() -> Any:
    """A context under which the matrix products JAX traces are full float32 products.

    GPUs run float32 matrix products in TF32 by default (a 10-bit mantissa). dargmin's own
    numerics — the derivative rules, the KKT checks, the QP interior point — are traced
    under this context; a user's solver keeps its own precision. Measured on an H200: the
    dense derivative of a float32 ridge ``argmin`` was 7.9e-5 off with TF32 and 2.4e-7
    without (p = 150), and the float32 interior point stalled (n = 100, batch 128,
    equality violation 61). No effect in float64 or on the CPU. A function traced once
    (``jax.closure_convert``) keeps the precision of that trace.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> with full_float32_products():
    ...     text = jax.jit(jnp.dot).lower(jnp.ones(2), jnp.ones(2)).as_text()
    >>> "HIGHEST" in text
    True
    """
    return jax.default_matmul_precision("float32")


def stop_gradient_arrays(tree: Any) -> Any:
    """``jax.lax.stop_gradient`` on the array leaves of ``tree`` (an operator or a
    :class:`Factorization`, whose other leaves — functions, jaxprs — pass unchanged).

    Examples
    --------
    >>> op = lx.MatrixLinearOperator(jnp.eye(2))
    >>> float(jax.grad(lambda a: stop_gradient_arrays(a * op).as_matrix().sum())(1.0))
    0.0
    """
    return jax.tree_util.tree_map(
        lambda leaf: jax.lax.stop_gradient(leaf) if eqx.is_array(leaf) else leaf, tree
    )


def make_linear_solver(
    name: str | lx.AbstractLinearSolver,
    *,
    size: int,
    symmetric_positive_definite: bool,
    rtol: float,
    atol: float,
    max_steps: int | None = None,
    dense_max_size: int = DENSE_MAX_SIZE,
) -> lx.AbstractLinearSolver:
    """Deprecated: use a strategy (``dargmin.linear_solvers.CG(rtol=...)``, ...) instead."""
    warnings.warn(
        "make_linear_solver is deprecated and will be removed in dargmin 0.3; pass a "
        "strategy from dargmin.linear_solvers (e.g. CG(rtol=1e-10), Cholesky(), "
        "Auto(dense_max_size=500)) or its name as linear_solver=.",
        DeprecationWarning,
        stacklevel=2,
    )
    strategy = as_linear_solver(name)
    if isinstance(strategy, Auto):
        strategy = Auto(dense_max_size=dense_max_size)
    strategy = strategy.resolve(
        size, symmetric=symmetric_positive_definite, positive_definite=symmetric_positive_definite
    )
    strategy = with_tolerances(strategy, rtol=rtol, atol=atol, max_steps=max_steps)
    x64 = jax.config.jax_enable_x64  # type: ignore[attr-defined]
    return strategy.lineax_solver(size, jnp.float64 if x64 else jnp.float32)

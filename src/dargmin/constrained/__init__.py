"""Constrained problems: KKT differentiation of any solver and a batched QP layer.

* :func:`constrained_argmin` decorates a solver of ``min f(x, θ) s.t. h(x, θ) = 0,
  g(x, θ) ≤ 0`` (primal, or primal-dual) and differentiates its solution through the KKT
  system on the active set, after a check that refuses infeasible, non-stationary,
  degenerate and constraint-qualification-failing points with the numbers.
* :func:`solve_qp` is a batched, jittable quadratic-programming layer (a primal-dual
  interior-point method in JAX, or an external solver through a callback) with
  derivatives in every argument.
* :func:`check_kkt` reports, eagerly, what the check measures.
"""

from dargmin.constrained._kkt import (
    ConstrainedProblem,
    ConstraintQualificationError,
    DegenerateActiveSetError,
    InfeasibleSolutionError,
    KKTCheck,
    KKTReport,
    KKTSettings,
    KKTSolution,
    check_kkt,
    constrained_argmin,
    kkt_solution,
)
from dargmin.constrained._qp import (
    OSQP,
    Clarabel,
    InteriorPoint,
    QPFactors,
    QPInfo,
    QPSolution,
    QPSolver,
    solve_qp,
)

__all__ = [
    "OSQP",
    "Clarabel",
    "ConstrainedProblem",
    "ConstraintQualificationError",
    "DegenerateActiveSetError",
    "InfeasibleSolutionError",
    "InteriorPoint",
    "KKTCheck",
    "KKTReport",
    "KKTSettings",
    "KKTSolution",
    "QPFactors",
    "QPInfo",
    "QPSolution",
    "QPSolver",
    "check_kkt",
    "constrained_argmin",
    "kkt_solution",
    "solve_qp",
]

r"""KKT differentiation of the solution of a constrained problem, from any solver.

The problem is

.. math::

    x^*(\theta) = \arg\min_x f(x, \theta) \quad \text{s.t.} \quad h(x, \theta) = 0,\;
    g(x, \theta) \le 0,

with Lagrangian :math:`L = f + \nu^\top h + \lambda^\top g` and :math:`\lambda \ge 0`. At a
KKT point whose active set :math:`\mathcal A = \{i : g_i = 0,\ \lambda_i > 0\}` is locally
constant (strict complementarity), the triple :math:`z = (x, \nu, \lambda)` is a root of

.. math::

    F(z, \theta) = \begin{pmatrix} \nabla_x f + J_h^\top \nu + J_g^\top (m \odot \lambda) \\
    h \\ m \odot g + (1 - m) \odot \lambda \end{pmatrix},

where :math:`m_i = 1` on the active set and :math:`0` elsewhere. Its Jacobian is the
symmetric (indefinite) KKT matrix restricted to the active set,

.. math::

    \partial_z F = \begin{pmatrix} \nabla^2_{xx} L & J_h^\top & J_g^\top M \\ J_h & 0 & 0 \\
    M J_g & 0 & I - M \end{pmatrix},

invertible when the active constraints are linearly independent (LICQ) and the Hessian of
the Lagrangian is positive definite on their null space (second-order sufficiency). The
derivative :math:`\dot z = -(\partial_z F)^{-1} \partial_\theta F\, \dot\theta` is attached
by :func:`dargmin.implicit.implicit_solution` (a ``jax.custom_jvp`` with re-entry: forward,
reverse and higher orders; the linear solve goes through :mod:`dargmin.linear_solvers`),
after a KKT-specific check that refuses, with the numbers, a point where that derivative
would be meaningless: infeasible, not stationary, a negative multiplier, a degenerate
(weakly active) constraint, or linearly dependent active constraints.

Where each piece lives: the configuration and error types in :mod:`._settings`, the
device-side measurements in :mod:`._measure`, the host-side verdict in :mod:`._verdict`, the
``custom_jvp`` rule and the public decorators in :mod:`._derivative`, the eager report in
:mod:`._report`. This module re-exports them under their former path.
"""

from dargmin.constrained._derivative import (
    _RULES,
    _attach_kkt,
    _kkt_solution,
    _kkt_solution_jvp,
    _KKTFunctions,
    constrained_argmin,
    kkt_solution,
)
from dargmin.constrained._measure import (
    _FIELDS,
    _Pieces,
    _pieces,
    _recover_duals,
    _scales,
    active_mask,
    duals_and_mask,
    kkt_measure,
)
from dargmin.constrained._report import KKTReport, check_kkt
from dargmin.constrained._settings import (
    _OWN_ERRORS,
    ConstrainedProblem,
    ConstraintQualificationError,
    Degenerate,
    DegenerateActiveSetError,
    InfeasibleSolutionError,
    KKTCheck,
    KKTSettings,
    KKTSolution,
    PyTree,
    reraise_constrained,
)
from dargmin.constrained._verdict import _judge, kkt_problems, kkt_report

__all__ = [
    "_FIELDS",
    "_OWN_ERRORS",
    "_RULES",
    "ConstrainedProblem",
    "ConstraintQualificationError",
    "Degenerate",
    "DegenerateActiveSetError",
    "InfeasibleSolutionError",
    "KKTCheck",
    "KKTReport",
    "KKTSettings",
    "KKTSolution",
    "PyTree",
    "_KKTFunctions",
    "_Pieces",
    "_attach_kkt",
    "_judge",
    "_kkt_solution",
    "_kkt_solution_jvp",
    "_pieces",
    "_recover_duals",
    "_scales",
    "active_mask",
    "check_kkt",
    "constrained_argmin",
    "duals_and_mask",
    "kkt_measure",
    "kkt_problems",
    "kkt_report",
    "kkt_solution",
    "reraise_constrained",
]

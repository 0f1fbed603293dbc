"""dargmin: derivatives of the solutions of optimization problems, built on JAX."""

from dargmin.diagnostics import (
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    OptimumReport,
    SingularSystemError,
    check_optimum,
)
from dargmin.implicit import (
    ImplicitConfig,
    argmin,
    fixed_point,
    gradient_optimality,
    implicit_solution,
    root,
)
from dargmin.linear_solvers import make_linear_solver

__version__ = "0.1.0"
__all__ = [
    "DargminError",
    "DargminWarning",
    "ImplicitConfig",
    "NonStationaryPointError",
    "OptimumReport",
    "SingularSystemError",
    "argmin",
    "check_optimum",
    "fixed_point",
    "gradient_optimality",
    "implicit_solution",
    "make_linear_solver",
    "root",
]

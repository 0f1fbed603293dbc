"""dargmin: derivatives of the solutions of optimization problems, built on JAX.

* :mod:`dargmin.implicit` — ``root``, ``argmin``, ``fixed_point``: make any solver
  differentiable by the implicit function theorem (forward, reverse, any order).
* :mod:`dargmin.diagnostics` — ``check_optimum`` and the errors raised when the implicit
  function theorem does not apply (not converged, singular, not a minimum).
* :mod:`dargmin.taylor` — ``TaylorExpansion``: higher-order Taylor series of an optimum.
* :mod:`dargmin.hyper` — hyperparameter selection by hypergradient (Lasso-type and smooth
  models, cross-validation, scikit-learn estimators); imported on first use.
* :mod:`dargmin.sensitivity` — influence functions, infinitesimal jackknife and approximate
  leave-one-out of M-estimators.
* :mod:`dargmin.constrained` — KKT differentiation of constrained optima from any solver
  (duals recovered when missing; infeasibility, LICQ and degeneracy refused with numbers)
  and a batched, differentiable QP layer ``solve_qp``.
* :mod:`dargmin.projections` — differentiable projections (simplex/sparsemax, ℓ1/ℓ2 balls,
  box, orthant, affine set) and proximal operators (ℓ1, group ℓ1, elastic net).
* :mod:`dargmin.compat.jaxopt` — JAXopt's ``custom_root``, ``custom_fixed_point``,
  ``root_vjp``, ``root_jvp`` on dargmin's core: one import line to migrate.
* :mod:`dargmin.imaging` — total-variation denoising and deblurring (Chambolle–Pock with a
  duality-gap certificate), their derivatives, and parameters tuned by SURE/SUGAR.
* :mod:`dargmin.influence` — influence at network scale: inverse-Hessian-vector products by
  Lanczos (Arnoldi), LiSSA, (E)K-FAC for dense and convolutional layers and
  EK-FAC-preconditioned CG over data loaders, SLQ spectra, influence scores.
* :mod:`dargmin.torch` — the same decorators, derivatives and checks for PyTorch models
  (extra ``[torch]``; imported explicitly: ``import dargmin.torch``).
* :mod:`dargmin.derivatives`, :mod:`dargmin.curvature`, :mod:`dargmin.finite_differences` —
  the derivative toolbox (HVP, Gauss–Newton products, Lanczos, trace estimators, finite
  differences and a gradient checker).
"""

from dargmin import linear_solvers, projections
from dargmin.curvature import (
    EigenEstimate,
    hutch_plus_plus_trace,
    hutchinson_trace,
    lanczos_extreme_eigenvalues,
    spectrum_dense,
)
from dargmin.derivatives import (
    CGSolution,
    gauss_newton_vector_product,
    hessian_vector_product,
    jacobian,
    jvp_from_vjps,
    rayleigh_quotient,
    solve_cg,
)
from dargmin.diagnostics import (
    Check,
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    OptimumReport,
    SingularSystemError,
    check_optimum,
    failure_reason,
)
from dargmin.finite_differences import (
    GradientCheckReport,
    LeafError,
    check_gradients,
    directional_derivative_fd,
    finite_difference_derivative,
    gradient_fd,
    hessian_fd,
    hvp_fd,
    jacobian_fd,
)
from dargmin.implicit import (
    ImplicitConfig,
    argmin,
    fixed_point,
    gradient_optimality,
    implicit_solution,
    root,
)
from dargmin.sensitivity import (
    approximate_cv_error,
    approximate_leave_one_out,
    infinitesimal_jackknife,
    influence_on_function,
    influence_on_params,
    jackknife_variance,
)
from dargmin.taylor import AccuracyReport, TaylorExpansion, taylor_expand

__version__ = "0.1.0"


_LAZY_SUBPACKAGES = frozenset({"compat", "constrained", "hyper", "imaging", "influence"})

# Old names, kept for one release: each warns and points to its replacement.
_DEPRECATED = {
    "check_grads": ("dargmin.finite_differences", "check_grads"),
    "solve_cg_with_info": ("dargmin.derivatives", "solve_cg_with_info"),
    "make_linear_solver": ("dargmin.linear_solvers", "make_linear_solver"),
}


def __getattr__(name: str):
    import importlib

    # Subpackages with heavier or optional dependencies (scikit-learn, tqdm, torch, ...)
    # load on first use only.
    if name in _LAZY_SUBPACKAGES:
        return importlib.import_module(f"dargmin.{name}")
    if name in _DEPRECATED:
        module, attribute = _DEPRECATED[name]
        return getattr(importlib.import_module(module), attribute)  # warns when called
    raise AttributeError(f"module 'dargmin' has no attribute {name!r}")


__all__ = [
    "AccuracyReport",
    "CGSolution",
    "Check",
    "DargminError",
    "DargminWarning",
    "EigenEstimate",
    "GradientCheckReport",
    "ImplicitConfig",
    "LeafError",
    "NonStationaryPointError",
    "OptimumReport",
    "SingularSystemError",
    "TaylorExpansion",
    "approximate_cv_error",
    "approximate_leave_one_out",
    "argmin",
    "check_gradients",
    "check_optimum",
    "directional_derivative_fd",
    "failure_reason",
    "finite_difference_derivative",
    "fixed_point",
    "gauss_newton_vector_product",
    "gradient_fd",
    "gradient_optimality",
    "hessian_fd",
    "hessian_vector_product",
    "hutch_plus_plus_trace",
    "hutchinson_trace",
    "hvp_fd",
    "implicit_solution",
    "infinitesimal_jackknife",
    "influence_on_function",
    "influence_on_params",
    "jackknife_variance",
    "jacobian",
    "jacobian_fd",
    "jvp_from_vjps",
    "lanczos_extreme_eigenvalues",
    "linear_solvers",
    "projections",
    "rayleigh_quotient",
    "root",
    "solve_cg",
    "spectrum_dense",
    "taylor_expand",
]

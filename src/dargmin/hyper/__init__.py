"""Hyperparameter selection by hypergradient descent (bilevel optimization).

Minimize a validation criterion ``R(θ) = C(ŵ(θ))`` over hyperparameters ``θ`` (log scale),
where ``ŵ(θ) = argmin_w F(w, θ)`` is a (possibly non-smooth, ℓ1-penalized) estimator, using
``∇R = (dŵ/dθ)ᵀ ∇C`` computed by implicit differentiation on the support (Bertrand et al.,
"Implicit differentiation for fast hyperparameter selection in non-smooth convex learning",
ICML 2020 / JMLR 2022) or by forward/reverse differentiation of the inner solver.

A call flows one way through the modules: the problem (``_datafits``, ``_penalty_maps``,
``_problems``, ``_models``) →
the inner solve (``_inner_solvers``, ``_sklearn_ridge_solvers``, ``_split_lbfgsb``,
``_prox_newton``, ``_working_set``) → the derivative (``_hypergradients``, ``_support_solve``,
``_unrolled``; one evaluation in ``_evaluation``) → the criterion
(``_criteria``, ``_dof``, ``_risk``) → the outer loop (``_optimizers``, ``_outer``) → the
estimators (``_estimator_base``: shared parameters and fit; ``_estimator_docs``: shared
docstring sections; ``_estimators``, ``_classifier``: the models). Strategies are objects
(:class:`ImplicitSupport`, :class:`ProxCD`, :class:`ProjectedGradientDescent`...); the
historical strings (``method="implicit"``, ``solver="cd"``, ``optimizer="lbfgs"``...) are
mapped to them by :data:`REGISTRY`.
"""

import warnings as _warnings

from dargmin.hyper._classifier import SparseLogisticHyperCV
from dargmin.hyper._compile_cache import enable_compilation_cache
from dargmin.hyper._criteria import (
    Criterion,
    CrossVal,
    CustomCriterion,
    HeldOutLogistic,
    HeldOutMSE,
)
from dargmin.hyper._datafits import Datafit, Logistic, Quadratic
from dargmin.hyper._dof import default_delta, degrees_of_freedom
from dargmin.hyper._estimators import (
    ElasticNetHyperCV,
    LassoHyperCV,
    RidgeHyperCV,
    WeightedLassoHyperCV,
)
from dargmin.hyper._evaluation import HypergradientResult, hypergradient
from dargmin.hyper._hypergradients import (
    METHODS,
    HypergradientMethod,
    ImplicitForward,
    ImplicitSupport,
)
from dargmin.hyper._inner_solvers import (
    FISTA,
    InnerResult,
    InnerSolver,
    InnerSolverWarning,
    ProxCD,
    kkt_violation,
    soft_threshold,
)
from dargmin.hyper._models import (
    elastic_net,
    l2_logistic,
    lasso,
    ridge,
    sparse_logistic,
    weighted_lasso,
)
from dargmin.hyper._optimizers import (
    LBFGSB,
    Monitor,
    OptaxOptimizer,
    OuterConvergenceWarning,
    OuterResult,
    ProjectedGradientDescent,
    minimize_hyper,
)
from dargmin.hyper._outer import (
    default_bounds,
    default_log_theta0,
    optimize_hyperparameters,
    optimize_sure,
)
from dargmin.hyper._plot import plot_convergence
from dargmin.hyper._problems import Cache, HyperProblem
from dargmin.hyper._prox_newton import ProxNewton
from dargmin.hyper._registry import REGISTRY, resolve
from dargmin.hyper._risk import SURE, SureResult
from dargmin.hyper._sklearn_ridge_solvers import RidgeDirect, SklearnSolver, default_solver
from dargmin.hyper._split_lbfgsb import SplitLBFGSB
from dargmin.hyper._unrolled import Unrolled
from dargmin.hyper._working_set import WorkingSetCD


def _make_solver(solver, problem):
    return resolve("solver", solver, problem)


def _deprecated():
    from dargmin.hyper import _dof, _risk

    return {
        "HyperGradient": (HypergradientResult, "dargmin.hyper.HypergradientResult"),
        "sure": (_risk._sure, "dargmin.hyper.SURE(sigma, df=...).evaluate(problem, log_theta)"),
        "sugar_gradient": (
            _risk._sugar_gradient,
            'dargmin.hyper.SURE(sigma, "finite_difference", ...).evaluate(problem, log_theta).grad',
        ),
        "lasso_degrees_of_freedom": (
            _dof._lasso_degrees_of_freedom,
            'dargmin.hyper.degrees_of_freedom(problem, log_theta, df="exact")',
        ),
        "monte_carlo_degrees_of_freedom": (
            _dof._monte_carlo_degrees_of_freedom,
            'dargmin.hyper.degrees_of_freedom(problem, log_theta, df="monte_carlo") (or '
            'df="finite_difference", delta=...)',
        ),
        "make_solver": (_make_solver, 'dargmin.hyper.resolve("solver", solver, problem)'),
    }


def __getattr__(name: str):
    # Names dropped from the public surface stay importable for one release.
    table = _deprecated()
    if name in table:
        obj, replacement = table[name]
        _warnings.warn(
            f"dargmin.hyper.{name} is deprecated and will be removed in the next release; "
            f"use {replacement}.",
            DeprecationWarning,
            stacklevel=2,
        )
        return obj
    raise AttributeError(f"module 'dargmin.hyper' has no attribute {name!r}")


__all__ = [
    "FISTA",
    "LBFGSB",
    "METHODS",
    "REGISTRY",
    "SURE",
    "Cache",
    "Criterion",
    "CrossVal",
    "CustomCriterion",
    "Datafit",
    "ElasticNetHyperCV",
    "HeldOutLogistic",
    "HeldOutMSE",
    "HyperProblem",
    "HypergradientMethod",
    "HypergradientResult",
    "ImplicitForward",
    "ImplicitSupport",
    "InnerResult",
    "InnerSolver",
    "InnerSolverWarning",
    "LassoHyperCV",
    "Logistic",
    "Monitor",
    "OptaxOptimizer",
    "OuterConvergenceWarning",
    "OuterResult",
    "ProjectedGradientDescent",
    "ProxCD",
    "ProxNewton",
    "Quadratic",
    "RidgeDirect",
    "RidgeHyperCV",
    "SklearnSolver",
    "SparseLogisticHyperCV",
    "SplitLBFGSB",
    "SureResult",
    "Unrolled",
    "WeightedLassoHyperCV",
    "WorkingSetCD",
    "default_bounds",
    "default_delta",
    "default_log_theta0",
    "default_solver",
    "degrees_of_freedom",
    "elastic_net",
    "enable_compilation_cache",
    "hypergradient",
    "kkt_violation",
    "l2_logistic",
    "lasso",
    "minimize_hyper",
    "optimize_hyperparameters",
    "optimize_sure",
    "plot_convergence",
    "resolve",
    "ridge",
    "soft_threshold",
    "sparse_logistic",
    "weighted_lasso",
]

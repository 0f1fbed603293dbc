"""Hyperparameter selection by hypergradient descent (bilevel optimization).

Minimize a validation criterion ``R(θ) = C(ŵ(θ))`` over hyperparameters ``θ`` (log scale),
where ``ŵ(θ) = argmin_w F(w, θ)`` is a (possibly non-smooth, ℓ1-penalized) estimator, using
``∇R = (dŵ/dθ)ᵀ ∇C`` computed by implicit differentiation on the support (Bertrand et al.,
"Implicit differentiation for fast hyperparameter selection in non-smooth convex learning",
ICML 2020 / JMLR 2022) or by forward/reverse differentiation of the inner solver.
"""

from dargmin.hyper._criteria import (
    Criterion,
    CrossVal,
    CustomCriterion,
    HeldOutLogistic,
    HeldOutMSE,
)
from dargmin.hyper._estimators import (
    ElasticNetHyperCV,
    LassoHyperCV,
    RidgeHyperCV,
    SparseLogisticHyperCV,
    WeightedLassoHyperCV,
)
from dargmin.hyper._hypergrad import METHODS, HyperGradient, hypergradient
from dargmin.hyper._outer import (
    Monitor,
    OuterResult,
    default_bounds,
    default_log_theta0,
    minimize_hyper,
    optimize_hyperparameters,
)
from dargmin.hyper._plot import plot_convergence
from dargmin.hyper._problems import (
    Datafit,
    HyperProblem,
    Logistic,
    Quadratic,
    elastic_net,
    l2_logistic,
    lasso,
    ridge,
    sparse_logistic,
    weighted_lasso,
)
from dargmin.hyper._risk import (
    SURE,
    SureResult,
    default_delta,
    degrees_of_freedom,
    lasso_degrees_of_freedom,
    monte_carlo_degrees_of_freedom,
    optimize_sure,
    sugar_gradient,
    sure,
)
from dargmin.hyper._solvers import (
    FISTA,
    InnerResult,
    InnerSolverWarning,
    ProxCD,
    RidgeDirect,
    SklearnSolver,
    kkt_violation,
    make_solver,
    soft_threshold,
)

__all__ = [
    "FISTA",
    "METHODS",
    "SURE",
    "Criterion",
    "CrossVal",
    "CustomCriterion",
    "Datafit",
    "ElasticNetHyperCV",
    "HeldOutLogistic",
    "HeldOutMSE",
    "HyperGradient",
    "HyperProblem",
    "InnerResult",
    "InnerSolverWarning",
    "LassoHyperCV",
    "Logistic",
    "Monitor",
    "OuterResult",
    "ProxCD",
    "Quadratic",
    "RidgeDirect",
    "RidgeHyperCV",
    "SklearnSolver",
    "SparseLogisticHyperCV",
    "SureResult",
    "WeightedLassoHyperCV",
    "default_bounds",
    "default_delta",
    "default_log_theta0",
    "degrees_of_freedom",
    "elastic_net",
    "hypergradient",
    "kkt_violation",
    "l2_logistic",
    "lasso",
    "lasso_degrees_of_freedom",
    "make_solver",
    "minimize_hyper",
    "monte_carlo_degrees_of_freedom",
    "optimize_hyperparameters",
    "optimize_sure",
    "plot_convergence",
    "ridge",
    "soft_threshold",
    "sparse_logistic",
    "sugar_gradient",
    "sure",
    "weighted_lasso",
]

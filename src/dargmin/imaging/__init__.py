"""Image restoration (total-variation denoising and deblurring, generalized Lasso) with its
parameters tuned by Stein's unbiased risk estimate and its gradient, SUGAR.

Chambolle–Pock primal-dual solver in JAX with a duality-gap certificate; forward-mode
(iterative) and implicit derivatives of the solution; Monte-Carlo and finite-difference
Monte-Carlo SURE; SUGAR and BFGS tuning (Deledalle, Vaiter, Fadili & Peyré, SIAM J. Imaging
Sci. 2014).

Modules: ``_operators`` (``Φ`` and ``D``), ``_penalties`` (``F_θ`` through the prox of its
conjugate), ``_problem`` (the problem, its objectives and input checks), ``_checks``
(refusals and warnings, eager and traced), ``_iteration`` (one iteration and its tangent),
``_solver`` (Chambolle–Pock, its gap certificate and forward-mode derivative), ``_implicit``
(the fixed-point derivative), ``_risk`` (SURE, SUGAR, tuning).
"""

from dargmin.imaging._implicit import implicit_solver, pd_fixed_point_map
from dargmin.imaging._operators import (  # the base classes
    AnalysisOperator,
    FFTBlur,
    ForwardOperator,
    Gradient2D,
    GradientAndHessian2D,
    Identity,
    MatrixAnalysis,
)
from dargmin.imaging._penalties import (
    L1,
    AnisotropicTV,
    HuberTV,
    IsotropicTV,
    Penalty,
    TVSecondOrder,
    TVTikhonov,
)
from dargmin.imaging._problem import (
    RestorationProblem,
    generalized_lasso,
    tv_deblurring,
    tv_denoising,
)
from dargmin.imaging._risk import ImageSURE, SureValue, TuneResult
from dargmin.imaging._solver import ChambollePock, PDResult, solve, solve_jvp

__all__ = [
    "L1",
    "AnalysisOperator",
    "AnisotropicTV",
    "ChambollePock",
    "FFTBlur",
    "ForwardOperator",
    "Gradient2D",
    "GradientAndHessian2D",
    "HuberTV",
    "Identity",
    "ImageSURE",
    "IsotropicTV",
    "MatrixAnalysis",
    "PDResult",
    "Penalty",
    "RestorationProblem",
    "SureValue",
    "TVSecondOrder",
    "TVTikhonov",
    "TuneResult",
    "generalized_lasso",
    "implicit_solver",
    "pd_fixed_point_map",
    "solve",
    "solve_jvp",
    "tv_deblurring",
    "tv_denoising",
]

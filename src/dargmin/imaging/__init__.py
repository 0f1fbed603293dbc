"""Image restoration (total-variation denoising and deblurring, generalized Lasso) with its
parameters tuned by Stein's unbiased risk estimate and its gradient, SUGAR.

Chambolle–Pock primal-dual solver in JAX with a duality-gap certificate; forward-mode
(iterative) and implicit derivatives of the solution; Monte-Carlo and finite-difference
Monte-Carlo SURE; SUGAR and BFGS tuning (Deledalle, Vaiter, Fadili & Peyré, SIAM J. Imaging
Sci. 2014).
"""

from dargmin.imaging._operators import (
    AnalysisOperator,
    FFTBlur,
    ForwardOperator,
    Gradient2D,
    Identity,
    MatrixAnalysis,
)
from dargmin.imaging._penalties import L1, AnisotropicTV, HuberTV, IsotropicTV, Penalty, TVTikhonov
from dargmin.imaging._risk import ImageSURE, SureValue, TuneResult
from dargmin.imaging._solver import (
    ChambollePock,
    PDResult,
    RestorationProblem,
    generalized_lasso,
    implicit_solver,
    pd_fixed_point_map,
    solve,
    solve_jvp,
    tv_deblurring,
    tv_denoising,
)

__all__ = [
    "L1",
    "AnalysisOperator",
    "AnisotropicTV",
    "ChambollePock",
    "FFTBlur",
    "ForwardOperator",
    "Gradient2D",
    "HuberTV",
    "Identity",
    "ImageSURE",
    "IsotropicTV",
    "MatrixAnalysis",
    "PDResult",
    "Penalty",
    "RestorationProblem",
    "SureValue",
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

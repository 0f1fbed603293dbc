"""dargmin for PyTorch: implicit derivatives of torch solvers, with the same checks.

``dargmin.torch.argmin``, ``root`` and ``fixed_point`` decorate ``solve(init, *params)``
whose objective or optimality function takes and returns torch tensors (or is an
``nn.Module``, called through ``torch.func.functional_call``). Reverse mode, forward mode,
double backward and ``torch.func.jacrev``/``jacfwd``/``hessian``/``vmap`` through the
solution are exact; the solver is run once and never unrolled; and, as on the JAX side, a
point that is not stationary, a singular system or a Hessian that is not positive definite
is refused (or warned about) with the numbers, in the same words.

Install with the ``torch`` extra: ``pip install "dargmin[torch]"``. This package imports
torch; ``import dargmin`` does not.
"""

from __future__ import annotations

try:
    import torch as _torch  # noqa: F401
except ImportError as _err:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "dargmin.torch needs PyTorch, which is not installed. Install the extra: "
        "pip install 'dargmin[torch]' (CPU), or first install the CUDA build of torch from "
        "https://pytorch.org/get-started/locally/ and then 'dargmin[torch]'."
    ) from _err

from dargmin.torch._core import (
    TorchImplicitConfig,
    argmin,
    fixed_point,
    implicit_solution,
    module_function,
    root,
)
from dargmin.torch._linear import (
    CG,
    GMRES,
    LU,
    MINRES,
    Auto,
    Cholesky,
    LeastSquares,
    TorchLinearSolver,
)

__all__ = [
    "CG",
    "GMRES",
    "LU",
    "MINRES",
    "Auto",
    "Cholesky",
    "LeastSquares",
    "TorchImplicitConfig",
    "TorchLinearSolver",
    "argmin",
    "fixed_point",
    "implicit_solution",
    "module_function",
    "root",
]

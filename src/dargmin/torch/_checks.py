"""The diagnosis before a torch implicit derivative: measured in torch, judged by dargmin.

The five numbers are the JAX side's (:class:`dargmin.diagnostics.Measurements`): the
residual ``‖g(x, θ)‖``, ``‖x‖``, the Newton step ``‖(∂ₓg)⁻¹ g‖``, the condition number of
``∂ₓg`` and the curvature (smallest eigenvalue, or a negative-curvature witness). They are
measured here with torch on plain tensors and handed, as floats, to
:func:`dargmin.diagnostics.report_implicit_check`, the host-side verdict of the JAX core: the
rules, the reason codes and every sentence of a refusal are shared, not copied.

What is certain and what is probable (as on the JAX side):

* dense strategies form the matrix: the condition number and the smallest eigenvalue are
  exact (one ``eigvalsh`` or ``svdvals``: the matrix is small), the Newton step exact;
* CG measures the Newton step to ``rtol=0.1`` and records the smallest Rayleigh quotient
  it meets on the residual and on a fixed probe (a witness of a saddle when negative);
  MINRES/GMRES measure the Newton step, and a short CG run on the probe looks for
  negative curvature when a minimum is declared. For a declared minimum the ratio of the
  largest to the smallest Rayleigh quotient met bounds the condition number from below
  (a singular Hessian is refused, not differentiated into a number of size 1e16); for a
  general ``∂ₓg`` no condition number is measured.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from dargmin.diagnostics import Check, report_implicit_check
from dargmin.errors import DargminWarning, SingularSystemError
from dargmin.torch._linear import CG, KrylovResult, TorchLinearSolver, krylov_tolerances

NUMPY_DTYPES: dict[torch.dtype, type[np.floating[Any]]] = {
    torch.float16: np.float16,
    torch.float32: np.float32,
    torch.float64: np.float64,
}


def numpy_dtype(dtype: torch.dtype) -> Any:
    """The NumPy dtype whose tolerances :class:`dargmin.Check` uses for ``dtype``."""
    if dtype not in NUMPY_DTYPES:
        raise TypeError(f"dargmin.torch supports float16/32/64 tensors, got {dtype}.")
    return np.dtype(NUMPY_DTYPES[dtype])


class TorchMeasurements(NamedTuple):
    """Plain floats, in the order :func:`report_implicit_check` takes them."""

    residual_norm: float
    x_norm: float
    newton_step: float
    condition: float
    curvature: float


@dataclass(frozen=True)
class Diagnosis:
    """How one problem is checked: the :class:`dargmin.Check`, the problem's kind and whether
    a minimum (positive-definite ``∂ₓg``) is declared."""

    check: Check
    kind: str
    positive_definite: bool

    def judge(
        self,
        measured: Sequence[TorchMeasurements],
        dtype: torch.dtype,
        batch_shape: tuple[int, ...] = (),
    ) -> None:
        """Raise or warn (per ``check.mode``) with dargmin's sentence, naming failing
        batch members when ``batch_shape`` is not empty."""
        np_dtype = numpy_dtype(dtype)
        tol, max_condition = self.check.tolerances(np_dtype)
        columns = [np.asarray([m[i] for m in measured], dtype=float) for i in range(5)]
        if batch_shape:
            columns = [c.reshape(batch_shape) for c in columns]
        else:
            columns = [c.reshape(()) for c in columns]
        report_implicit_check(
            *columns,
            kind=self.kind,
            mode=self.check.mode,
            tol=tol,
            max_condition=max_condition,
            expect_positive_definite=self.positive_definite,
            dtype=np_dtype,
        )


def _probe(n: int, like: torch.Tensor) -> torch.Tensor:
    """A fixed pseudo-random vector (reproducible, on ``like``'s device and dtype)."""
    return _cached_probe(n, like.dtype, like.device)


@functools.lru_cache(maxsize=16)
def _cached_probe(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Cached: drawing it cost about as much as the check's products at 1000 unknowns.
    generator = np.random.default_rng(0)
    return torch.as_tensor(generator.standard_normal(n), dtype=dtype, device=device)


def _beyond_rounding(curvature: float, scale: float, n: int, eps: float) -> float:
    """A negative curvature within rounding (``n·eps·scale``) reads as 0: a singular
    semidefinite matrix must be named singular, not a saddle (the JAX side's rule)."""
    if curvature < -n * eps * scale:
        return curvature
    return max(curvature, 0.0)


_HUGE = float(np.finfo(np.float64).max)


def measure_dense(
    residual: torch.Tensor, x: torch.Tensor, matrix: torch.Tensor, *, positive_definite: bool
) -> TorchMeasurements:
    """The five numbers from the formed matrix of ``∂ₓg`` (exact spectrum: it is small)."""
    r = residual.reshape(-1)
    n = r.numel()
    eps = torch.finfo(matrix.dtype).eps
    with torch.no_grad():
        if not bool(torch.isfinite(matrix).all()):
            # NaN/inf in x or θ: eigvalsh/svdvals would raise a bare LinAlgError; the
            # verdict names the non-finite residual (or the failed solve) instead.
            nan = math.nan
            return TorchMeasurements(float(r.norm()), float(x.norm()), nan, nan, nan)
        if positive_definite:
            eigenvalues = torch.linalg.eigvalsh(0.5 * (matrix + matrix.mT))
            magnitudes = eigenvalues.abs()
            largest, smallest = float(magnitudes.max()), float(magnitudes.min())
            curvature = _beyond_rounding(float(eigenvalues[0]), largest, n, eps)
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) == 0:
                newton = torch.cholesky_solve(r.unsqueeze(-1), factor).squeeze(-1)
            else:  # not positive definite: the curvature names why
                newton = torch.full_like(r, math.nan)
        else:
            singular = torch.linalg.svdvals(matrix)
            largest, smallest = float(singular[0]), float(singular[-1])
            curvature = math.nan
            newton, info = torch.linalg.solve_ex(matrix, r)
            if int(info) != 0:
                newton = torch.full_like(r, math.nan)
        # A zero smallest magnitude gives a huge finite number (an infinite one would be
        # read as "not measured" by the verdict).
        condition = largest / smallest if smallest > 0 else _HUGE
        if not math.isfinite(largest):
            condition = math.nan
        return TorchMeasurements(
            float(r.norm()), float(x.norm()), float(newton.norm()), condition, curvature
        )


def measure_matrix_free(
    residual: torch.Tensor,
    x: torch.Tensor,
    matvec: Callable[[torch.Tensor], torch.Tensor],
    strategy: TorchLinearSolver,
    *,
    positive_definite: bool,
    witness: KrylovResult | None = None,
) -> TorchMeasurements:
    """The Newton step by the strategy's Krylov method at ``rtol=0.1`` (one digit is enough
    to compare it with ``tol``; the absolute floor of the derivative's solve is kept), and
    for a declared minimum a negative-curvature witness from CG on a fixed probe — or from
    ``witness``, a CG run already made with the same operator on another right-hand side
    (the derivative's own solve), which costs no extra product. The ratio of the largest to
    the smallest Rayleigh quotient met is reported as the condition number: a lower bound
    of ``λmax/λmin``, so a refusal on it is never a false alarm."""
    r = residual.reshape(-1)
    n = r.numel()
    eps = torch.finfo(r.dtype).eps
    with torch.no_grad():
        newton: KrylovResult = strategy.krylov(matvec, r, rtol=0.1)
        step = float(newton.x.norm()) if newton.converged else math.nan
        curvature = condition = math.nan
        if positive_definite:
            if witness is None or not math.isfinite(witness.min_curvature):
                probe = _probe(n, r) * max(float(r.norm()), 1.0) / math.sqrt(n)
                witness = CG(max_steps=max(2 * n, 20)).krylov(matvec, probe, rtol=0.1)
            curvatures = [witness.min_curvature]
            if isinstance(strategy, CG):
                curvatures.append(newton.min_curvature)
            known = [c for c in curvatures if math.isfinite(c)]
            if known:
                # The operator's scale as the runs saw it (no extra product).
                scales = [newton.max_curvature, witness.max_curvature]
                scale = max((s for s in scales if math.isfinite(s)), default=0.0)
                curvature = _beyond_rounding(min(known), scale, n, eps)
                if curvature > 0:
                    # Rayleigh quotients lie in [λmin, λmax]: their ratio is a lower bound
                    # of the condition number, so exceeding the limit is never a false
                    # alarm. Without it a CG run on a singular Hessian (smallest quotient
                    # 1e-17 > 0) passed and returned a derivative of norm 1e16.
                    condition = scale / curvature
        return TorchMeasurements(float(r.norm()), float(x.norm()), step, condition, curvature)


def report_krylov_failure(
    result: KrylovResult,
    strategy: TorchLinearSolver,
    rtol: float,
    *,
    kind: str,
    mode: str,
    system: str,
) -> None:
    """A Krylov solve of the derivative that did not converge is reported in every mode
    (as the JAX side's checked solves are): its result would be silently wrong."""
    if result.converged:
        return
    message = (
        f"dargmin.{kind}: the {strategy.name.upper()} solve of the derivative's linear system "
        f"did not converge: {result.steps} steps left the residual at "
        f"{result.residual_norm:.3g} (target rtol {rtol:.1g})"
        + (
            f", and it met curvature {result.min_curvature:.3g} ≤ 0"
            if math.isfinite(result.min_curvature) and result.min_curvature <= 0
            else ""
        )
        + f". The {system} is singular, indefinite or too ill-conditioned for this method; "
        "regularize the problem, raise max_steps, or use a dense strategy "
        "(linear_solver='cholesky' or 'lu'). [reason: singular]"
    )
    if mode == "warn":
        import warnings

        warnings.warn(message, DargminWarning, stacklevel=3)
        return
    error = SingularSystemError(message)
    error.reason = "singular"
    raise error


__all__ = [
    "Diagnosis",
    "TorchMeasurements",
    "krylov_tolerances",
    "measure_dense",
    "measure_matrix_free",
    "numpy_dtype",
    "report_krylov_failure",
]

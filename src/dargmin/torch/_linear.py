"""Linear-system strategies of the torch front end: dense factorizations and Krylov methods.

The implicit derivative solves ``(∂ₓg) ẋ = b`` (forward mode) or ``(∂ₓg)ᵀ u = x̄`` (reverse
mode). Small systems build ``∂ₓg`` as a matrix (``n`` Jacobian-vector products) and solve it
with a differentiable ``torch.linalg`` factorization; large ones never form it and run a
Krylov method on Hessian- (Jacobian-) vector products.

PyTorch ships no Krylov solvers (``torch.linalg`` is dense only, and SciPy's would move every
vector to host memory, which a CUDA tensor cannot afford), so conjugate gradients, MINRES and
restarted GMRES are written here, in a few lines each, on flat tensors of the input's device
and dtype. They run on plain (untransformed) tensors only: the derivative of a Krylov solve
is another implicit linear solve (see :mod:`dargmin.torch._core`), never its unrolled loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch

from dargmin.linear_solvers import DENSE_MAX_SIZE

Needs = Literal["general", "symmetric", "positive_definite"]
MatVec = Callable[[torch.Tensor], torch.Tensor]


def krylov_tolerances(dtype: torch.dtype) -> tuple[float, float]:
    """Default ``(rtol, atol)`` of the Krylov solvers: ``0.1·sqrt(eps)`` and ``1e-3·rtol``,
    the JAX side's defaults (``dargmin.solver_strategies.default_tolerances``).

    Examples
    --------
    >>> rtol, atol = krylov_tolerances(torch.float64)
    >>> f"{rtol:.1e} {atol:.1e}"
    '1.5e-09 1.5e-12'
    """
    rtol = 0.1 * math.sqrt(torch.finfo(dtype).eps)
    return rtol, 1e-3 * rtol


class KrylovResult(NamedTuple):
    """The outcome of a Krylov solve of ``A x = b`` (on plain tensors).

    ``min_curvature`` and ``max_curvature`` are the smallest and largest Rayleigh quotients
    ``pᵀAp / pᵀp`` met by conjugate gradients (a negative value proves ``A`` indefinite; the
    largest is the scale of ``A`` seen by the run); NaN for the other methods.
    """

    x: torch.Tensor
    converged: bool
    steps: int
    residual_norm: float
    min_curvature: float
    max_curvature: float = math.nan


@dataclass(frozen=True)
class TorchLinearSolver:
    """A strategy for the derivative's linear system (immutable).

    Attributes (class-level)
    ------------------------
    dense
        Whether the strategy builds the matrix of ``∂ₓg``.
    needs
        What it requires of ``∂ₓg``: ``"general"``, ``"symmetric"`` or
        ``"positive_definite"``.
    name
        Its name in messages and in :func:`as_torch_linear_solver`.
    """

    dense: ClassVar[bool] = True
    needs: ClassVar[Needs] = "general"
    name: ClassVar[str] = "?"

    def resolve(self, size: int, *, symmetric: bool, positive_definite: bool) -> TorchLinearSolver:
        """The concrete strategy for a system of ``size`` unknowns (itself, unless ``Auto``)."""
        return self

    def check_applies(self, *, symmetric: bool, positive_definite: bool, problem: str) -> None:
        """Refuse, at decoration time, a strategy whose needs the system does not meet."""
        if (self.needs == "positive_definite" and not positive_definite) or (
            self.needs == "symmetric" and not symmetric
        ):
            raise ValueError(
                f"linear_solver={self.name!r} needs a {self.needs.replace('_', '-')} system, "
                f"but a {problem} has a general ∂ₓg. Use 'lu' or 'gmres' (or 'auto')."
            )

    def solve_dense(self, matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        """Differentiable solve of ``matrix @ y = rhs`` (dense strategies)."""
        raise NotImplementedError

    def krylov(
        self, matvec: MatVec, rhs: torch.Tensor, *, rtol: float | None = None
    ) -> KrylovResult:
        """Solve ``A y = rhs`` with products ``matvec`` (matrix-free strategies)."""
        raise NotImplementedError

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        """``(rtol, atol)`` for ``dtype``: the defaults (a Krylov strategy's own if set)."""
        return krylov_tolerances(dtype)


@dataclass(frozen=True)
class Cholesky(TorchLinearSolver):
    """Dense Cholesky (``torch.linalg.cholesky_ex`` + ``cholesky_solve``): positive definite."""

    needs: ClassVar[Needs] = "positive_definite"
    name: ClassVar[str] = "cholesky"

    def solve_dense(self, matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        # cholesky_ex: no exception on failure (the diagnosis has already named the problem
        # in raise mode; in warn mode a failed factor gives NaN, as on the JAX side).
        factor = torch.linalg.cholesky_ex(matrix).L
        return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)


@dataclass(frozen=True)
class LU(TorchLinearSolver):
    """Dense LU with partial pivoting (``torch.linalg.solve``): any invertible system."""

    name: ClassVar[str] = "lu"

    def solve_dense(self, matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve(matrix, rhs)


@dataclass(frozen=True)
class LeastSquares(TorchLinearSolver):
    """Dense minimum-norm solve through the pseudo-inverse (``torch.linalg.pinv``, SVD):
    for singular systems, where the derivative of the minimum-norm solution is wanted.
    Singular values below ``rcond`` times the largest are dropped (default ``n·eps``)."""

    rcond: float | None = None
    name: ClassVar[str] = "lstsq"

    def solve_dense(self, matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(matrix.dtype).eps
        rcond = self.rcond if self.rcond is not None else matrix.shape[-1] * eps
        return torch.linalg.pinv(matrix, rtol=rcond) @ rhs


@dataclass(frozen=True)
class KrylovSolver(TorchLinearSolver):
    """The matrix-free strategies' shared part: tolerances, step budget and stopping rule.

    A run stops at ``‖r‖ ≤ max(rtol·‖b‖, atol)`` or after ``max_steps`` matrix-vector
    products (default ``10·n``); subclasses implement :meth:`iterate` only.
    """

    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None
    dense: ClassVar[bool] = False

    def tolerances(self, dtype: torch.dtype) -> tuple[float, float]:
        rtol, atol = krylov_tolerances(dtype)
        return (
            self.rtol if self.rtol is not None else rtol,
            self.atol if self.atol is not None else atol,
        )

    def krylov(
        self, matvec: MatVec, rhs: torch.Tensor, *, rtol: float | None = None
    ) -> KrylovResult:
        own_rtol, atol = self.tolerances(rhs.dtype)
        stop = max((rtol if rtol is not None else own_rtol) * float(rhs.norm()), atol)
        return self.iterate(matvec, rhs, stop, self.max_steps or 10 * rhs.numel())

    def iterate(
        self, matvec: MatVec, rhs: torch.Tensor, stop: float, max_steps: int
    ) -> KrylovResult:
        """Run from ``x = 0`` until the residual norm is at most ``stop`` or ``max_steps``."""
        raise NotImplementedError


@dataclass(frozen=True)
class CG(KrylovSolver):
    """Conjugate gradients (matrix-free; positive definite). Stops at
    ``‖r‖ ≤ max(rtol·‖b‖, atol)`` or ``max_steps`` (default ``10·n``); records the smallest
    Rayleigh quotient met, a witness of negative curvature."""

    needs: ClassVar[Needs] = "positive_definite"
    name: ClassVar[str] = "cg"

    def iterate(
        self, matvec: MatVec, rhs: torch.Tensor, stop: float, max_steps: int
    ) -> KrylovResult:
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        p = r.clone()
        rr = float(r @ r)
        min_curv, max_curv = math.inf, -math.inf
        steps = 0
        while math.sqrt(rr) > stop and steps < max_steps:
            ap = matvec(p)
            pap = float(p @ ap)
            quotient = pap / float(p @ p)
            min_curv, max_curv = min(min_curv, quotient), max(max_curv, abs(quotient))
            if not pap > 0:  # zero or negative curvature: CG breaks down (a witness)
                return KrylovResult(x, False, steps, math.sqrt(rr), min_curv, max_curv)
            alpha = rr / pap
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = float(r @ r)
            p = r + (rr_new / rr) * p
            rr = rr_new
            steps += 1
        converged = math.sqrt(rr) <= stop
        if not steps:
            min_curv = max_curv = math.nan
        return KrylovResult(x, converged, steps, math.sqrt(rr), min_curv, max_curv)


@dataclass(frozen=True)
class MINRES(KrylovSolver):
    """MINRES (Paige-Saunders; matrix-free; symmetric, possibly indefinite)."""

    needs: ClassVar[Needs] = "symmetric"
    name: ClassVar[str] = "minres"

    def iterate(
        self, matvec: MatVec, rhs: torch.Tensor, stop: float, max_steps: int
    ) -> KrylovResult:
        beta1 = float(rhs.norm())
        x = torch.zeros_like(rhs)
        if beta1 <= stop:
            return KrylovResult(x, True, 0, beta1, math.nan)
        # Lanczos vectors and the QR factorization of the tridiagonal matrix by Givens
        # rotations (c, s), updated one column at a time; eta is the residual norm.
        v_prev, v = torch.zeros_like(rhs), rhs / beta1
        w_prev2, w_prev = torch.zeros_like(rhs), torch.zeros_like(rhs)
        beta, eta = beta1, beta1
        c_prev2, s_prev2, c_prev, s_prev = 1.0, 0.0, 1.0, 0.0
        steps = 0
        while abs(eta) > stop and steps < max_steps:
            av = matvec(v)
            alpha = float(v @ av)
            v_next = av - alpha * v - beta * v_prev
            beta_next = float(v_next.norm())
            epsilon = s_prev2 * beta
            delta_hat = c_prev2 * beta
            delta = c_prev * delta_hat + s_prev * alpha
            gamma_hat = -s_prev * delta_hat + c_prev * alpha
            gamma = math.hypot(gamma_hat, beta_next)
            if gamma == 0.0:  # singular tridiagonal: breakdown
                break
            c, s = gamma_hat / gamma, beta_next / gamma
            w = (v - delta * w_prev - epsilon * w_prev2) / gamma
            x = x + (c * eta) * w
            eta = -s * eta
            w_prev2, w_prev = w_prev, w
            c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
            v_prev, v = v, (v_next / beta_next if beta_next > 0 else v_next)
            beta = beta_next
            steps += 1
            if beta_next == 0.0:  # invariant subspace: exact solution reached
                break
        residual = float((rhs - matvec(x)).norm())
        return KrylovResult(x, residual <= 1.01 * stop, steps, residual, math.nan)


@dataclass(frozen=True)
class GMRES(KrylovSolver):
    """Restarted GMRES (matrix-free; any invertible system). The small least-squares problem
    of each cycle is solved by ``torch.linalg.lstsq`` on the Hessenberg matrix."""

    restart: int = 30
    needs: ClassVar[Needs] = "general"
    name: ClassVar[str] = "gmres"

    def iterate(
        self, matvec: MatVec, rhs: torch.Tensor, stop: float, max_steps: int
    ) -> KrylovResult:
        x = torch.zeros_like(rhs)
        r = rhs.clone()
        residual = float(r.norm())
        steps = 0
        while residual > stop and steps < max_steps:
            m = min(self.restart, rhs.numel())
            basis = [r / residual]
            hess = torch.zeros(m + 1, m, dtype=rhs.dtype, device=rhs.device)
            e1 = torch.zeros(m + 1, dtype=rhs.dtype, device=rhs.device)
            e1[0] = residual
            y = torch.zeros(0, dtype=rhs.dtype, device=rhs.device)
            for j in range(m):
                w = matvec(basis[j])
                for i in range(j + 1):  # modified Gram-Schmidt
                    hess[i, j] = basis[i] @ w
                    w = w - hess[i, j] * basis[i]
                next_norm = float(w.norm())
                if not math.isfinite(next_norm):  # NaN/inf products: lstsq would abort
                    nan = math.nan
                    return KrylovResult(torch.full_like(rhs, nan), False, steps, nan, nan)
                hess[j + 1, j] = next_norm
                steps += 1
                y = torch.linalg.lstsq(hess[: j + 2, : j + 1], e1[: j + 2, None]).solution[:, 0]
                small = float((hess[: j + 2, : j + 1] @ y - e1[: j + 2]).norm())
                if small <= stop or float(hess[j + 1, j]) == 0.0 or steps >= max_steps:
                    break
                basis.append(w / hess[j + 1, j])
            x = x + torch.stack(basis[: y.numel()], dim=1) @ y
            r = rhs - matvec(x)
            residual = float(r.norm())
        return KrylovResult(x, residual <= stop, steps, residual, math.nan)


@dataclass(frozen=True)
class Auto(TorchLinearSolver):
    """Dense Cholesky (argmin) / LU (root) up to ``dense_max_size`` unknowns, CG / GMRES
    beyond (the JAX side's rule and cut-over)."""

    dense_max_size: int = DENSE_MAX_SIZE
    name: ClassVar[str] = "auto"

    def resolve(self, size: int, *, symmetric: bool, positive_definite: bool) -> TorchLinearSolver:
        if size <= self.dense_max_size:
            return Cholesky() if positive_definite else LU()
        return CG() if positive_definite else GMRES()


SOLVERS: dict[str, type[TorchLinearSolver]] = {
    cls.name: cls for cls in (Auto, Cholesky, LU, LeastSquares, CG, MINRES, GMRES)
}


def as_torch_linear_solver(solver: str | TorchLinearSolver) -> TorchLinearSolver:
    """A strategy from a name (``"auto"``, ``"cholesky"``, ``"lu"``, ``"lstsq"``, ``"cg"``,
    ``"minres"``, ``"gmres"``) or a strategy object.

    Examples
    --------
    >>> as_torch_linear_solver("cg")
    CG(rtol=None, atol=None, max_steps=None)
    """
    if isinstance(solver, TorchLinearSolver):
        return solver
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise ValueError(
        f"linear_solver must be one of {sorted(SOLVERS)} or a dargmin.torch strategy object "
        f"(e.g. dargmin.torch.CG(rtol=1e-8)), got {solver!r}."
    )

r"""Linear-solver strategies: what to run, what structure it needs, and the defaults.

The strategy objects of :mod:`dargmin.linear_solvers` (``Cholesky()``, ``CG(rtol=...)``,
``Auto()``, ...), the registry :data:`SOLVERS` that maps a name to one, the default
tolerances and the dense/Krylov cut-over: the one place each of these lives. Solving with a
strategy (factorizing once, checking every result) is :mod:`dargmin.linear_solvers`' job;
import the names from there.

Examples
--------
>>> as_linear_solver("cg")
CG()
>>> as_linear_solver("auto").resolve(size=5000, symmetric=True, positive_definite=True).name
'cg'
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx

from dargmin.krylov import MINRES as _MINRESSolver
from dargmin.krylov import ConjugateGradient as _CGSolver

__all__ = [
    "CG",
    "DENSE_MAX_SIZE",
    "DENSE_MAX_SIZE_REUSED",
    "GMRES",
    "LSMR",
    "LU",
    "MINRES",
    "QR",
    "SOLVERS",
    "Auto",
    "BiCGStab",
    "Cholesky",
    "LeastSquares",
    "LinearSolver",
    "LineaxSolver",
    "as_linear_solver",
    "default_tolerances",
    "operator_tags",
    "two_norm",
    "with_tolerances",
]

#: ``Auto()`` switches from dense factorizations to Krylov methods above this many unknowns
#: when the system is solved a few times (building the matrix costs one operator product per
#: unknown, a Krylov solve a few dozen).
DENSE_MAX_SIZE = 200
#: The cut-over when one factorization serves many solves (Taylor coefficients of every
#: order, the report of ``check_optimum``): the O(n³) factorization is amortized.
DENSE_MAX_SIZE_REUSED = 2000

Needs = Literal["general", "symmetric", "positive_definite"]


def two_norm(tree: object) -> jax.Array:
    """Euclidean norm of a pytree of arrays, the stopping norm of our Krylov solvers.

    lineax's default (the max norm) made CG stall for thousands of iterations on a
    well-conditioned 10 000-unknown Hessian when the right-hand side lay in a
    low-dimensional subspace; the 2-norm stops where the textbook criterion says.

    Examples
    --------
    >>> float(two_norm({"a": jnp.array([3.0]), "b": jnp.array([4.0])}))
    5.0
    """
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in leaves))


def default_tolerances(dtype: Any) -> tuple[float, float]:
    """Default ``(rtol, atol)`` of the iterative solvers for ``dtype``: the one place.

    ``rtol = 0.1·sqrt(eps)`` (1.5e-9 in float64, 3.5e-5 in float32) keeps the linear-solve
    error well below what the derivative's own accuracy (limited by the solution's) can
    use. ``atol = 1e-3·rtol`` is an absolute floor: batched (vmapped, e.g. ``jacrev``)
    Krylov solves iterate until every member converges, and a member whose residual sits
    at rounding level never meets a purely relative test.

    Examples
    --------
    >>> rtol, atol = default_tolerances(jnp.float64)
    >>> f"{rtol:.1e} {atol:.1e}"
    '1.5e-09 1.5e-12'
    """
    eps = float(jnp.finfo(dtype).eps)
    rtol = 0.1 * eps**0.5
    return rtol, 1e-3 * rtol


class LinearSolver(eqx.Module):
    """A linear-solver strategy (abstract): what to run and what structure it needs.

    Subclasses set the class attributes and implement :meth:`lineax_solver`; ``Auto``
    overrides :meth:`resolve`. Instances are immutable (equinox Modules), hashable and
    usable as static arguments.
    """

    #: Whether the strategy factorizes a dense matrix (built once from the operator).
    dense: ClassVar[bool] = False
    #: The structure the system must have for this strategy to be valid.
    needs: ClassVar[Needs] = "general"
    #: Whether a successful solve proves that a symmetric system is positive definite.
    certifies_positive_definite: ClassVar[bool] = False

    def resolve(self, size: int, *, symmetric: bool, positive_definite: bool) -> LinearSolver:
        """The concrete strategy for a system of ``size`` unknowns (``self`` unless ``Auto``)."""
        del size, symmetric, positive_definite
        return self

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        """The lineax solver that runs this strategy."""
        raise NotImplementedError

    @property
    def name(self) -> str:
        """The registry name (``"cholesky"``, ``"cg"``, ...)."""
        return type(self).__name__.lower()


class Cholesky(LinearSolver):
    """Dense Cholesky factorization; a symmetric positive-definite system is required, and a
    successful factorization certifies it (a failure means not positive definite or singular).
    """

    dense: ClassVar[bool] = True
    needs: ClassVar[Needs] = "positive_definite"
    certifies_positive_definite: ClassVar[bool] = True

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        return lx.Cholesky()


class LU(LinearSolver):
    """Dense LU factorization with partial pivoting, for any square non-singular system."""

    dense: ClassVar[bool] = True

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        return lx.LU()


class QR(LinearSolver):
    """Dense QR factorization (square, or full-rank rectangular)."""

    dense: ClassVar[bool] = True

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        return lx.QR()


class LeastSquares(LinearSolver):
    """Dense SVD pseudo-inverse: the minimum-norm solution of a singular system.

    Singular values below ``rcond · σ_max`` (default ``rcond = n·eps``) are dropped; the
    solve then warns with the rank it used and the norm of the right-hand side it dropped,
    because the result is a derivative only in the directions that were kept.
    """

    rcond: float | None = None
    dense: ClassVar[bool] = True

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        return lx.SVD(rcond=self.rcond)

    @property
    def name(self) -> str:
        return "lstsq"


class _Krylov(LinearSolver):
    """Shared fields of the matrix-free strategies: tolerances (``None``: the dtype's
    defaults, :func:`default_tolerances`) and the step cap (``None``: ``max(10·n, 100)``)."""

    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None

    def _settings(self, size: int, dtype: Any) -> tuple[float, float, int]:
        rtol, atol = default_tolerances(dtype)
        rtol = self.rtol if self.rtol is not None else rtol
        atol = self.atol if self.atol is not None else 1e-3 * rtol
        max_steps = self.max_steps if self.max_steps is not None else max(10 * size, 100)
        return rtol, atol, max_steps


class CG(_Krylov):
    """Conjugate gradients (dargmin's :class:`~dargmin.krylov.ConjugateGradient`): SPD systems,
    matrix-free. A direction of negative curvature stops it with a ``breakdown`` that the
    check reports as "not a minimum"."""

    needs: ClassVar[Needs] = "positive_definite"

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        rtol, atol, max_steps = self._settings(size, dtype)
        return _CGSolver(rtol=rtol, atol=atol, max_steps=max_steps)


class MINRES(_Krylov):
    """MINRES (dargmin's :class:`~dargmin.krylov.MINRES`): symmetric, possibly indefinite."""

    needs: ClassVar[Needs] = "symmetric"

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        rtol, atol, max_steps = self._settings(size, dtype)
        return _MINRESSolver(rtol=rtol, atol=atol, max_steps=max_steps)


class GMRES(_Krylov):
    """Restarted GMRES (``lineax.GMRES``, restart ``min(n, 50)``): general square systems."""

    restart: int | None = None

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        rtol, atol, max_steps = self._settings(size, dtype)
        restart = self.restart if self.restart is not None else min(size, 50)
        return lx.GMRES(rtol=rtol, atol=atol, norm=two_norm, max_steps=max_steps, restart=restart)


class BiCGStab(_Krylov):
    """BiCGStab (``lineax.BiCGStab``): general square systems, constant memory."""

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        rtol, atol, max_steps = self._settings(size, dtype)
        return lx.BiCGStab(rtol=rtol, atol=atol, norm=two_norm, max_steps=max_steps)


class LSMR(_Krylov):
    """LSMR (``lineax.LSMR``): least squares, matrix-free. On a square system a solve that
    only reaches a least-squares residual (inconsistent or too ill-conditioned) is reported
    with LSMR's own condition estimate instead of being returned as a solution."""

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        rtol, atol, max_steps = self._settings(size, dtype)
        return lx.LSMR(rtol=rtol, atol=atol, max_steps=max_steps)


class Auto(LinearSolver):
    """Dense up to ``dense_max_size`` unknowns (Cholesky for an SPD system, LU otherwise),
    matrix-free beyond (CG for SPD, GMRES otherwise, with ``rtol``/``atol``/``max_steps``)."""

    dense_max_size: int = DENSE_MAX_SIZE
    rtol: float | None = None
    atol: float | None = None
    max_steps: int | None = None

    def resolve(self, size: int, *, symmetric: bool, positive_definite: bool) -> LinearSolver:
        spd = symmetric and positive_definite
        if size <= self.dense_max_size:
            return Cholesky() if spd else LU()
        krylov = CG if spd else GMRES
        return krylov(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        raise TypeError("Auto() must be resolved (Auto().resolve(...)) before it is run.")


class LineaxSolver(LinearSolver):
    """Any lineax solver instance, used as given (structure taken from its type)."""

    solver: lx.AbstractLinearSolver

    @property
    def dense(self) -> bool:  # type: ignore[override]
        return isinstance(self.solver, lx.Cholesky | lx.LU | lx.QR | lx.SVD)

    @property
    def needs(self) -> Needs:  # type: ignore[override]
        if isinstance(self.solver, lx.Cholesky | lx.CG | _CGSolver):
            return "positive_definite"
        return "symmetric" if isinstance(self.solver, _MINRESSolver) else "general"

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        return self.solver

    @property
    def name(self) -> str:
        return repr(self.solver)


#: The registry of solver names: the one place where a string maps to a strategy.
SOLVERS: dict[str, type[LinearSolver]] = {
    "auto": Auto,
    "cholesky": Cholesky,
    "lu": LU,
    "qr": QR,
    "lstsq": LeastSquares,
    "cg": CG,
    "minres": MINRES,
    "gmres": GMRES,
    "bicgstab": BiCGStab,
    "lsmr": LSMR,
}


def as_linear_solver(spec: str | LinearSolver | lx.AbstractLinearSolver) -> LinearSolver:
    """The strategy for ``spec``: a registry name, a strategy, or a lineax solver.

    Examples
    --------
    >>> as_linear_solver("cg")
    CG()
    >>> as_linear_solver("lu").dense
    True
    """
    if isinstance(spec, LinearSolver):
        return spec
    if isinstance(spec, lx.AbstractLinearSolver):
        return LineaxSolver(spec)
    if isinstance(spec, str) and spec in SOLVERS:
        return SOLVERS[spec]()
    raise ValueError(
        f"Unknown linear_solver {spec!r}. Choose one of {', '.join(SOLVERS)}, a "
        "dargmin.linear_solvers strategy (e.g. CG(rtol=1e-10)) or a "
        "lineax.AbstractLinearSolver instance."
    )


def with_tolerances(
    strategy: LinearSolver,
    *,
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int | None = None,
) -> LinearSolver:
    """``strategy`` with the given Krylov settings (``None`` keeps its own); dense strategies
    (and raw lineax solvers) are returned unchanged: they have no tolerance.

    Examples
    --------
    >>> with_tolerances(CG(), rtol=0.1)
    CG(rtol=0.1)
    >>> with_tolerances(Cholesky(), rtol=0.1)
    Cholesky()
    """
    if not isinstance(strategy, _Krylov | Auto):
        return strategy
    return dataclasses.replace(
        strategy,
        rtol=strategy.rtol if rtol is None else rtol,
        atol=strategy.atol if atol is None else atol,
        max_steps=strategy.max_steps if max_steps is None else max_steps,
    )


def operator_tags(
    solver: LinearSolver, *, symmetric: bool, positive_definite: bool, problem: str = "problem"
) -> tuple:
    """The lineax tags of the system, refusing a strategy whose needs the system lacks.

    Examples
    --------
    >>> operator_tags(LU(), symmetric=True, positive_definite=False)
    (symmetric_tag,)
    """
    if solver.needs == "positive_definite" and not (symmetric and positive_definite):
        if not symmetric:
            _refuse_structure(solver, problem)
        # A symmetric system that is not declared positive definite (a root of a symmetric
        # Jacobian): the SPD solver is the user's explicit choice; the check reports a
        # failure of definiteness.
    if solver.needs == "symmetric" and not symmetric:
        _refuse_structure(solver, problem)
    if symmetric and (positive_definite or solver.needs == "positive_definite"):
        return (lx.symmetric_tag, lx.positive_semidefinite_tag)
    return (lx.symmetric_tag,) if symmetric else ()


def _refuse_structure(solver: LinearSolver, problem: str) -> None:
    needs = "symmetric positive-definite" if solver.needs == "positive_definite" else "symmetric"
    raise ValueError(
        f"linear_solver={solver.name!r} needs a {needs} system, but this {problem} has a "
        "general Jacobian. Use 'lu', 'gmres' or 'bicgstab', or dargmin.argmin when the system "
        "is a Hessian (or root(..., symmetric=True) when it is symmetric)."
    )

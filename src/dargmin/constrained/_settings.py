"""The configuration of a KKT derivative: its refusals, tolerances and static settings.

:class:`KKTCheck` holds the tolerances of the KKT check (feasibility, stationarity,
degeneracy, rank), :class:`KKTSettings` everything static a derivative needs (hashable: a
static argument of compiled code), :class:`ConstrainedProblem` the functions ``f, h, g``.
The three error types are the KKT-specific refusals; :func:`reraise_constrained` restores
them from the ``JaxRuntimeError`` that wraps a refusal raised in compiled code.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from dargmin.diagnostics import Check, CheckMode
from dargmin.errors import (
    DargminError,
    NonStationaryPointError,
    SingularSystemError,
    failure_reason,
    reraise_typed,
)
from dargmin.implicit import ImplicitConfig
from dargmin.linear_solvers import LU, LeastSquares, LinearSolver, as_linear_solver

PyTree = Any

#: What to do at a weakly active inequality (active, multiplier ≈ 0), where the solution
#: map has a kink: refuse, or take the one-sided derivative of one branch, explicitly.
Degenerate = Literal["raise", "active", "inactive"]


class InfeasibleSolutionError(NonStationaryPointError):
    """The solution violates its constraints beyond the tolerance (reason ``infeasible``)."""


class DegenerateActiveSetError(DargminError):
    """A constraint is weakly active (strict complementarity fails): the solution map has a
    kink and no derivative (reason ``degenerate``)."""


class ConstraintQualificationError(SingularSystemError):
    """The active constraints are linearly dependent: LICQ fails (reason ``licq``)."""


_OWN_ERRORS: dict[str, type[DargminError]] = {
    cls.__name__: cls
    for cls in (
        InfeasibleSolutionError,
        DegenerateActiveSetError,
        ConstraintQualificationError,
    )
}


def reraise_constrained(err: Exception) -> None:
    """Re-raise a dargmin refusal wrapped by JAX (from compiled code) as its typed error;
    return if ``err`` is not one (then the caller re-raises ``err`` itself)."""
    match = re.search(r"(\w+Error): (dargmin\.\w+: .*)", str(err), flags=re.S)
    if match and match.group(1) in _OWN_ERRORS:
        error = _OWN_ERRORS[match.group(1)](match.group(2).strip().splitlines()[0])
        error.reason = failure_reason(err)
        raise error from None
    reraise_typed(err)


@dataclass(frozen=True)
class KKTCheck:
    """Tolerances of the KKT check made before a constrained derivative is returned.

    Scales: constraint values and slacks are compared with ``max(1, ‖x‖∞)``, the
    Lagrangian gradient with ``max(1, ‖∇f‖)``, multipliers with ``max(1, ‖λ‖∞)``.

    Attributes
    ----------
    mode
        ``"raise"`` (default), ``"warn"`` or ``"ignore"``, for every refusal below and for
        the implicit-function check of the KKT system (Newton step, condition number).
    feasibility_tol
        Largest accepted constraint violation (relative). Default ``1e-6`` in float64,
        ``1e-3`` in float32. Also the threshold below which a multiplier counts as negative
        and above which a multiplier and its slack both count as non-zero (complementary
        slackness fails).
    stationarity_tol
        Largest accepted ``‖∇f + J_hᵀν + J_gᵀλ‖`` (relative). Same defaults.
    degeneracy_tol
        An inequality whose multiplier and slack are both below this (relative) is weakly
        active: the derivative does not exist there. Default ``1e-6`` (float64), ``1e-4``
        (float32); it must sit above the
        accuracy of the solver's complementarity (an interior-point method stopped at
        ``sᵀλ = μ`` leaves both near ``√μ`` on a weakly active constraint).
    rank_tol
        The active-constraint Jacobian is rank deficient (LICQ fails) when a singular value
        is below ``rank_tol · σ_max``. Default ``1e-9`` (float64), ``1e-4`` (float32).
    tol, max_condition
        The implicit-function check of the KKT system (see :class:`dargmin.Check`).

    Examples
    --------
    >>> KKTCheck().tolerances(jnp.float64)["feasibility"]
    1e-06
    """

    mode: CheckMode = "raise"
    feasibility_tol: float | None = None
    stationarity_tol: float | None = None
    degeneracy_tol: float | None = None
    rank_tol: float | None = None
    tol: float | None = None
    max_condition: float | None = None

    def __post_init__(self) -> None:
        # Check validates mode, tol and max_condition with its own messages.
        Check(self.mode, self.tol, self.max_condition)
        for name in ("feasibility_tol", "stationarity_tol", "degeneracy_tol", "rank_tol"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"KKTCheck.{name} must be a positive number, got {value!r}.")

    def tolerances(self, dtype: Any) -> dict[str, float]:
        """The four KKT tolerances for ``dtype``, defaults filled in."""
        double = float(jnp.finfo(dtype).eps) < 1e-10
        default = 1e-6 if double else 1e-3
        return {
            "feasibility": self.feasibility_tol or default,
            "stationarity": self.stationarity_tol or default,
            # float32: 1e-4, not 1e-3. On 60 random QPs (n = 10-200, qpth's setting) with one
            # constraint made weakly active, the float32 interior point left its multiplier
            # and slack at most 2.3e-6 and 1.3e-5 (relative; the slack grows with n);
            # genuinely active constraints had multipliers down to 5e-4, which a 1e-3
            # threshold refused. Below 1e-4 a genuine multiplier is still refused (2
            # members of a batch of 128 at n = 100 on a GPU): a refusal, never a silent
            # one-sided derivative; pass degeneracy_tol or degenerate= to decide.
            "degeneracy": self.degeneracy_tol or (1e-6 if double else 1e-4),
            "rank": self.rank_tol or (1e-9 if double else 1e-4),
        }

    @property
    def core(self) -> Check:
        """The :class:`dargmin.Check` of the KKT linear system."""
        return Check(self.mode, self.tol, self.max_condition)

    @classmethod
    def of(cls, check: CheckMode | Check | KKTCheck) -> KKTCheck:
        """A :class:`KKTCheck` from a mode string, a :class:`dargmin.Check` or itself."""
        if isinstance(check, KKTCheck):
            return check
        if isinstance(check, Check):
            return cls(check.mode, tol=check.tol, max_condition=check.max_condition)
        return cls(check)


class KKTSolution(NamedTuple):
    """A primal-dual solution ``(x, ν, λ)``: ``eq_dual`` multiplies ``h(x) = 0``,
    ``ineq_dual ≥ 0`` multiplies ``g(x) ≤ 0`` (``L = f + νᵀh + λᵀg``). A solver may leave
    either dual ``None``: it is then recovered by least squares on the active constraints."""

    x: PyTree
    eq_dual: jax.Array | None = None
    ineq_dual: jax.Array | None = None


@dataclass(frozen=True, eq=False)
class ConstrainedProblem:
    """``f(x, *p)``, ``h(x, *p) = 0`` and ``g(x, *p) ≤ 0``; hashed by identity (a static
    argument of compiled code: one compilation per problem and shapes)."""

    objective: Callable[..., jax.Array]
    eq: Callable[..., jax.Array] | None = None
    ineq: Callable[..., jax.Array] | None = None

    def parts(self, x: PyTree, *params: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(f, h, g)`` at ``x``, constraints flattened to vectors (empty when absent)."""
        f = self.objective(x, *params)
        dtype = jnp.result_type(f)
        empty = jnp.zeros((0,), dtype)
        h = jnp.ravel(self.eq(x, *params)) if self.eq is not None else empty
        g = jnp.ravel(self.ineq(x, *params)) if self.ineq is not None else empty
        return f, h, g


@dataclass(frozen=True)
class KKTSettings:
    """Static settings of a KKT derivative (hashable: a static argument of compiled code)."""

    linear_solver: LinearSolver = field(default_factory=LU)
    check: KKTCheck = field(default_factory=KKTCheck)
    degenerate: Degenerate = "raise"
    kind: str = "constrained_argmin"

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_solver", as_linear_solver(self.linear_solver))
        object.__setattr__(self, "check", KKTCheck.of(self.check))
        if self.degenerate not in ("raise", "active", "inactive"):
            raise ValueError(
                f"degenerate must be 'raise', 'active' or 'inactive', got {self.degenerate!r}."
            )

    @property
    def implicit_config(self) -> ImplicitConfig:
        return ImplicitConfig(
            linear_solver=self.linear_solver,
            symmetric=True,
            positive_definite=False,
            check=self.check.core,
            kind=self.kind,
        )

    @property
    def least_squares(self) -> bool:
        return isinstance(self.linear_solver, LeastSquares)

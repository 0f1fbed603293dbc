r"""KKT differentiation of the solution of a constrained problem, from any solver.

The problem is

.. math::

    x^*(\theta) = \arg\min_x f(x, \theta) \quad \text{s.t.} \quad h(x, \theta) = 0,\;
    g(x, \theta) \le 0,

with Lagrangian :math:`L = f + \nu^\top h + \lambda^\top g` and :math:`\lambda \ge 0`. At a
KKT point whose active set :math:`\mathcal A = \{i : g_i = 0,\ \lambda_i > 0\}` is locally
constant (strict complementarity), the triple :math:`z = (x, \nu, \lambda)` is a root of

.. math::

    F(z, \theta) = \begin{pmatrix} \nabla_x f + J_h^\top \nu + J_g^\top (m \odot \lambda) \\
    h \\ m \odot g + (1 - m) \odot \lambda \end{pmatrix},

where :math:`m_i = 1` on the active set and :math:`0` elsewhere. Its Jacobian is the
symmetric (indefinite) KKT matrix restricted to the active set,

.. math::

    \partial_z F = \begin{pmatrix} \nabla^2_{xx} L & J_h^\top & J_g^\top M \\ J_h & 0 & 0 \\
    M J_g & 0 & I - M \end{pmatrix},

invertible when the active constraints are linearly independent (LICQ) and the Hessian of
the Lagrangian is positive definite on their null space (second-order sufficiency). The
derivative :math:`\dot z = -(\partial_z F)^{-1} \partial_\theta F\, \dot\theta` is attached
by :func:`dargmin.implicit.implicit_solution` (a ``jax.custom_jvp`` with re-entry: forward,
reverse and higher orders; the linear solve goes through :mod:`dargmin.linear_solvers`),
after a KKT-specific check that refuses, with the numbers, a point where that derivative
would be meaningless: infeasible, not stationary, a negative multiplier, a degenerate
(weakly active) constraint, or linearly dependent active constraints.
"""

from __future__ import annotations

import functools
import re
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.diagnostics import Check, CheckMode
from dargmin.errors import (
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    SingularSystemError,
    failure_reason,
    reraise_typed,
)
from dargmin.implicit import ImplicitConfig, _WeakCallable, implicit_solution
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
        active: the derivative does not exist there. Same defaults; it must sit above the
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
            "degeneracy": self.degeneracy_tol or default,
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


# --------------------------------------------------------------------------------------
# Measurements (device side)
# --------------------------------------------------------------------------------------


class _Pieces(NamedTuple):
    grad_f: jax.Array  # ∇f (flat)
    h: jax.Array
    g: jax.Array
    jac_h: jax.Array  # (m_eq, n)
    jac_g: jax.Array  # (m_in, n)
    x_flat: jax.Array


def _pieces(parts: Callable[..., tuple], x: PyTree, args: tuple) -> _Pieces:
    x_flat, unravel = ravel_pytree(x)

    def flat_parts(xf: jax.Array) -> tuple:
        return parts(unravel(xf), *args)

    _, h, g = flat_parts(x_flat)
    grad_f = jax.grad(lambda xf: flat_parts(xf)[0])(x_flat)
    jac_h = jax.jacrev(lambda xf: flat_parts(xf)[1])(x_flat).reshape(h.size, x_flat.size)
    jac_g = jax.jacrev(lambda xf: flat_parts(xf)[2])(x_flat).reshape(g.size, x_flat.size)
    return _Pieces(grad_f, h, g, jac_h, jac_g, x_flat)


def _scales(p: _Pieces, lam: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(p.x_flat), initial=0.0))
    lam_scale = jnp.maximum(1.0, jnp.max(jnp.abs(lam), initial=0.0))
    return x_scale, lam_scale


def active_mask(
    g: jax.Array,
    lam: jax.Array,
    x_scale: jax.Array,
    lam_scale: jax.Array,
    degeneracy_tol: float,
    degenerate: Degenerate,
) -> jax.Array:
    """1.0 where an inequality is treated as active, 0.0 elsewhere (float, for the KKT
    residual). A constraint is active when its relative multiplier exceeds its relative
    slack (the non-zero one of a complementary pair); a weakly active one (both below
    ``degeneracy_tol``) follows ``degenerate`` (``"raise"`` keeps the comparison: the
    check refuses it anyway)."""
    a = lam / lam_scale
    s = -g / x_scale
    weak = jnp.maximum(a, s) <= degeneracy_tol
    active = a > s
    if degenerate == "active":
        active = active | weak
    elif degenerate == "inactive":
        active = active & ~weak
    return active.astype(g.dtype)


def _recover_duals(p: _Pieces, active_tol: float) -> tuple[jax.Array, jax.Array]:
    """Least-squares multipliers on the active constraints: ``min ‖∇f + J_Aᵀ y‖``.

    Inequalities with slack below ``active_tol · max(1, ‖x‖∞)`` count as active; the
    others get a zero multiplier (their columns are zeroed, and the minimum-norm solution
    of ``lstsq`` gives them zero)."""
    x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(p.x_flat), initial=0.0))
    near = (-p.g <= active_tol * x_scale).astype(p.g.dtype)
    jac = jnp.concatenate([p.jac_h, near[:, None] * p.jac_g], axis=0)
    if jac.shape[0] == 0:
        return p.h[:0], p.g[:0]
    y = jnp.linalg.lstsq(jac.T, -p.grad_f)[0]
    return y[: p.h.size], near * y[p.h.size :]


#: The per-member numbers the host judges, in the order they are passed.
_FIELDS = (
    "eq_violation",
    "ineq_violation",
    "ineq_violation_index",
    "x_scale",
    "stationarity",
    "grad_scale",
    "min_multiplier",
    "min_multiplier_index",
    "lam_scale",
    "n_complementarity",
    "complementarity_index",
    "complementarity_multiplier",
    "complementarity_slack",
    "n_degenerate",
    "degenerate_index",
    "degenerate_multiplier",
    "degenerate_slack",
    "n_active_eq",
    "n_active_ineq",
    "rank",
    "sigma_ratio",
)


def kkt_measure(
    parts: Callable[..., tuple],
    z: tuple[PyTree, jax.Array, jax.Array],
    mask: jax.Array,
    args: tuple,
    tolerances: dict[str, float],
) -> tuple[jax.Array, ...]:
    """The numbers of the KKT check at ``z = (x, ν, λ)`` with active set ``mask``
    (traceable; scalars, batched under ``vmap``), in the order of ``_FIELDS``."""
    x, nu, lam = z
    p = _pieces(parts, x, args)
    dtype = p.x_flat.dtype
    x_scale, lam_scale = _scales(p, lam)
    zero = jnp.zeros((), dtype)
    eq_violation = jnp.max(jnp.abs(p.h), initial=0.0)
    if p.g.size:
        ineq_index = jnp.argmax(p.g)
        ineq_violation = jnp.maximum(p.g[ineq_index], 0.0)
    else:
        ineq_index, ineq_violation = jnp.zeros((), jnp.int32), zero
    lagrangian = p.grad_f + p.jac_h.T @ nu + p.jac_g.T @ lam
    stationarity = jnp.linalg.norm(lagrangian)
    grad_scale = jnp.maximum(1.0, jnp.linalg.norm(p.grad_f))
    a = lam / lam_scale
    s = -p.g / x_scale
    feasibility = tolerances["feasibility"]
    comp = (jnp.minimum(a, s) > feasibility) & (a > 0) & (s > 0)
    weak = jnp.maximum(a, s) <= tolerances["degeneracy"]

    def first(flags: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        if not flags.size:
            return zero, jnp.zeros((), jnp.int32), zero, zero
        index = jnp.argmax(flags)
        return jnp.sum(flags).astype(dtype), index, lam[index], -p.g[index]

    n_comp, comp_index, comp_lam, comp_slack = first(comp)
    n_weak, weak_index, weak_lam, weak_slack = first(weak)
    if lam.size:
        min_index = jnp.argmin(lam)
        min_multiplier = lam[min_index]
    else:
        min_index, min_multiplier = jnp.zeros((), jnp.int32), zero
    # LICQ: the rank of the active rows (equalities, and active inequalities; inactive
    # rows are zeroed and contribute zero singular values, not counted as active).
    jac = jnp.concatenate([p.jac_h, mask[:, None] * p.jac_g], axis=0)
    n_active = p.h.size + jnp.sum(mask)
    if jac.shape[0]:
        sigma = jnp.linalg.svd(jac, compute_uv=False)
        sigma_max = jnp.max(sigma)
        rank = jnp.sum(sigma > tolerances["rank"] * sigma_max).astype(dtype)
        padded = jnp.concatenate([sigma, jnp.zeros((jac.shape[0],), dtype)])
        last = jnp.clip(n_active.astype(jnp.int32) - 1, 0, padded.size - 1)
        sigma_ratio = jnp.where(
            n_active > 0, padded[last] / jnp.where(sigma_max > 0, sigma_max, 1.0), 1.0
        )
    else:
        rank, sigma_ratio = zero, jnp.ones((), dtype)
    values = (
        eq_violation,
        ineq_violation,
        ineq_index,
        x_scale,
        stationarity,
        grad_scale,
        min_multiplier,
        min_index,
        lam_scale,
        n_comp,
        comp_index,
        comp_lam,
        comp_slack,
        n_weak,
        weak_index,
        weak_lam,
        weak_slack,
        jnp.asarray(p.h.size, dtype),
        jnp.sum(mask),
        rank,
        sigma_ratio,
    )
    return tuple(jnp.asarray(v, dtype) for v in values)


# --------------------------------------------------------------------------------------
# The verdict (host side)
# --------------------------------------------------------------------------------------


def kkt_problems(
    m: dict[str, float],
    tolerances: dict[str, float],
    *,
    degenerate: Degenerate,
    least_squares: bool,
    recovered: bool,
) -> list[tuple[type[DargminError], str, str]]:
    """The problems of one (unbatched) KKT point, as ``(error type, reason, sentence)``,
    the most basic first (feasibility before stationarity before the active set)."""
    problems: list[tuple[type[DargminError], str, str]] = []
    tol_f = tolerances["feasibility"]
    x_scale, lam_scale = m["x_scale"], m["lam_scale"]
    values = [m[k] for k in ("eq_violation", "ineq_violation", "stationarity", "min_multiplier")]
    if not all(np.isfinite(values)):
        problems.append(
            (
                NonStationaryPointError,
                "nonfinite",
                "the solution, its multipliers or its constraints are not finite "
                f"(constraint violation {max(m['eq_violation'], m['ineq_violation']):.3g}, "
                f"Lagrangian gradient {m['stationarity']:.3g}); the solver diverged or "
                "received NaN/inf inputs.",
            )
        )
        return problems
    violation = max(m["eq_violation"], m["ineq_violation"])
    if violation > tol_f * x_scale:
        where = (
            f"inequality {int(m['ineq_violation_index'])}: g = {m['ineq_violation']:.3g} > 0"
            if m["ineq_violation"] >= m["eq_violation"]
            else f"an equality: |h| = {m['eq_violation']:.3g}"
        )
        problems.append(
            (
                InfeasibleSolutionError,
                "infeasible",
                f"x is not feasible: the largest constraint violation is {violation:.3g} "
                f"({where}), above the tolerance {tol_f:.1g} × max(1, ‖x‖∞ = {x_scale:.3g}). "
                "The problem may be infeasible, or the solver stopped before reaching the "
                "feasible set; a KKT derivative needs a feasible optimum.",
            )
        )
    if m["min_multiplier"] < -tol_f * lam_scale:
        problems.append(
            (
                NonStationaryPointError,
                "negative_multiplier",
                f"the multiplier of inequality {int(m['min_multiplier_index'])} is "
                f"λ = {m['min_multiplier']:.3g} < 0: at a minimum subject to g(x) ≤ 0 every "
                "inequality multiplier is ≥ 0, so x is not a constrained minimum (or the "
                "solver's duals use another sign convention: dargmin's is "
                "L = f + νᵀh + λᵀg with λ ≥ 0).",
            )
        )
    if m["n_complementarity"] > 0:
        problems.append(
            (
                NonStationaryPointError,
                "not_stationary",
                f"complementary slackness fails at {int(m['n_complementarity'])} "
                f"inequalit{'ies' if m['n_complementarity'] > 1 else 'y'}: e.g. inequality "
                f"{int(m['complementarity_index'])} has multiplier "
                f"λ = {m['complementarity_multiplier']:.3g} and slack "
                f"−g = {m['complementarity_slack']:.3g}, both non-zero (tolerance "
                f"{tol_f:.1g} relative). The solver has not converged.",
            )
        )
    tol_s = tolerances["stationarity"]
    if m["stationarity"] > tol_s * m["grad_scale"]:
        how = (
            " The multipliers were recovered by least squares on the constraints active "
            "at x; this is the best fit, so x is not a KKT point: not converged, or an "
            "inequality counted inactive (slack above the tolerance) is active."
            if recovered
            else " Run the solver to convergence (or check the sign of its duals)."
        )
        problems.append(
            (
                NonStationaryPointError,
                "not_stationary",
                "the Lagrangian is not stationary: ‖∇f + J_hᵀν + J_gᵀλ‖ = "
                f"{m['stationarity']:.3g}, above the tolerance {tol_s:.1g} × max(1, ‖∇f‖ = "
                f"{m['grad_scale']:.3g})." + how,
            )
        )
    n_active = m["n_active_eq"] + m["n_active_ineq"]
    if n_active > m["rank"] and not least_squares:
        problems.append(
            (
                ConstraintQualificationError,
                "licq",
                f"the active constraints are linearly dependent (LICQ fails): their "
                f"Jacobian has {n_active:.0f} rows ({m['n_active_eq']:.0f} equalities, "
                f"{m['n_active_ineq']:.0f} active inequalities) but numerical rank "
                f"{m['rank']:.0f} (σ_min/σ_max = {m['sigma_ratio']:.3g}, limit "
                f"{tolerances['rank']:.1g}). The multipliers are not unique and the KKT "
                "matrix is singular. If the constraints are consistent (redundant), pass "
                "linear_solver='lstsq' for the least-squares (minimum-norm) KKT solve, whose "
                "x-derivative is still exact; otherwise remove the dependent constraints.",
            )
        )
    if m["n_degenerate"] > 0 and degenerate == "raise":
        count = int(m["n_degenerate"])
        problems.append(
            (
                DegenerateActiveSetError,
                "degenerate",
                f"the active set is degenerate: inequality {int(m['degenerate_index'])} is "
                f"weakly active (multiplier λ = {m['degenerate_multiplier']:.3g}, slack "
                f"−g = {m['degenerate_slack']:.3g}, both below {tolerances['degeneracy']:.1g} "
                f"relative; {count} such constraint{'s' if count > 1 else ''}). Strict "
                "complementarity fails, so the solution map has a kink here: the derivative "
                "does not exist and the one-sided derivatives differ. Pass "
                "degenerate='active' for the one-sided derivative along which the "
                "constraint stays active, or degenerate='inactive' for the one along which "
                "it leaves the active set.",
            )
        )
    return problems


def _judge(
    *values: Any,
    tolerances: dict[str, float],
    degenerate: Degenerate,
    least_squares: bool,
    recovered: bool,
    mode: str,
    kind: str,
    dtype: Any,
) -> np.ndarray:
    """Host side of the KKT check: judge every batch member, raise or warn for the first
    failing one (naming the others), return zeros of the batch shape."""
    arrays = [np.asarray(v, dtype=float) for v in values]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    members = [np.broadcast_to(a, shape).ravel() for a in arrays]
    failing: list[tuple[int, list[tuple[type[DargminError], str, str]]]] = []
    for i in range(int(np.prod(shape, dtype=int))):
        measured = {name: float(col[i]) for name, col in zip(_FIELDS, members, strict=True)}
        found = kkt_problems(
            measured,
            tolerances,
            degenerate=degenerate,
            least_squares=least_squares,
            recovered=recovered,
        )
        if found:
            failing.append((i, found))
    passed = np.zeros(shape, dtype=dtype)
    if not failing:
        return passed
    where = ""
    if shape:
        bad = [tuple(int(j) for j in np.unravel_index(i, shape)) for i, _ in failing]
        named = ", ".join(str(b) for b in bad[:10])
        where = (
            f" (batch member{'s' if len(bad) > 1 else ''} {named}{' …' if len(bad) > 10 else ''}"
            f" of a batch of shape {tuple(shape)}; numbers below are member {bad[0]}'s)"
        )
    problems = failing[0][1]
    message = (
        f"dargmin.{kind}: cannot differentiate the solution{where}: "
        + " Also, ".join(text for _, _, text in problems)
        + f" [reason: {problems[0][1]}]"
    )
    if mode == "raise":
        error = problems[0][0](message)
        error.reason = problems[0][1]
        raise error
    warnings.warn(message, DargminWarning, stacklevel=2)
    return passed


def kkt_report(
    parts: Callable[..., tuple],
    z: tuple[PyTree, jax.Array, jax.Array],
    mask: jax.Array,
    args: tuple,
    settings: KKTSettings,
    *,
    recovered: bool,
) -> jax.Array:
    """Measure the KKT point on the device and judge it on the host (only when some batch
    member may fail). Returns a zero scalar the derivative must depend on."""
    dtype = ravel_pytree(z[0])[0].dtype
    tolerances = settings.check.tolerances(dtype)
    values = jax.lax.stop_gradient(kkt_measure(parts, z, mask, args, tolerances))
    m = dict(zip(_FIELDS, values, strict=True))
    tol_f = tolerances["feasibility"]
    suspicious = (
        ~jnp.isfinite(m["eq_violation"] + m["ineq_violation"] + m["stationarity"])
        | ~jnp.isfinite(m["min_multiplier"])
        | (jnp.maximum(m["eq_violation"], m["ineq_violation"]) > tol_f * m["x_scale"])
        | (m["min_multiplier"] < -tol_f * m["lam_scale"])
        | (m["n_complementarity"] > 0)
        | (m["stationarity"] > tolerances["stationarity"] * m["grad_scale"])
    )
    if not settings.least_squares:
        suspicious = suspicious | (m["n_active_eq"] + m["n_active_ineq"] > m["rank"])
    if settings.degenerate == "raise":
        suspicious = suspicious | (m["n_degenerate"] > 0)
    host = functools.partial(
        _judge,
        tolerances=tolerances,
        degenerate=settings.degenerate,
        least_squares=settings.least_squares,
        recovered=recovered,
        mode=settings.check.mode,
        kind=settings.kind,
        dtype=np.dtype(dtype),
    )

    def call_host(vals: tuple) -> jax.Array:
        return jax.pure_callback(
            host, jax.ShapeDtypeStruct((), dtype), *vals, vmap_method="expand_dims"
        )

    return jax.lax.cond(
        eqxi.unvmap_any(suspicious), call_host, lambda vals: jnp.zeros((), dtype), values
    )


# --------------------------------------------------------------------------------------
# The derivative
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _KKTFunctions:
    """The closure-converted ``parts`` of one traced call (no tracers inside), and whether
    the duals were recovered; hashed by identity (a ``nondiff_argnums`` of the rule)."""

    parts: Callable[..., tuple]
    recovered: bool

    def residual(self, z: tuple, mask: jax.Array, *args: PyTree) -> tuple:
        """``F(z, θ)`` of the module docstring (its Jacobian is the symmetric KKT matrix)."""
        x, nu, lam = z
        active_lam = mask * lam

        def lagrangian(xx: PyTree) -> jax.Array:
            f, h, g = self.parts(xx, *args)
            return f + jnp.dot(nu, h) + jnp.dot(active_lam, g)

        grad = jax.grad(lagrangian)(x)
        _, h, g = self.parts(x, *args)
        return grad, h, mask * g + (1.0 - mask) * lam


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _kkt_solution(
    fns: _KKTFunctions, settings: KKTSettings, z: tuple, mask: jax.Array, args: tuple
):
    return z


@_kkt_solution.defjvp
def _kkt_solution_jvp(fns, settings, primals, tangents):
    z, mask, args = primals
    _, _, args_dot = tangents
    frozen = jax.lax.stop_gradient
    if settings.check.mode != "ignore":
        verified = kkt_report(
            fns.parts, frozen(z), frozen(mask), frozen(args), settings, recovered=fns.recovered
        )
        # The implicit check and solve below depend on the KKT check through x (+ 0; x
        # is never empty, unlike the mask): the KKT refusal, which names the cause, comes
        # before a generic one, and the callback is never dead code.
        x, nu, lam = z
        x = jax.tree_util.tree_map(lambda leaf: leaf + verified.astype(leaf.dtype), x)
        z = (x, nu, lam)
    config = settings.implicit_config

    def attach(params: tuple) -> tuple:
        return implicit_solution(fns.residual, z, mask, *params, config=config)

    # Re-entry: the primal comes from implicit_solution, whose own rule differentiates it,
    # so second and higher derivatives (with the active set frozen) are exact.
    return jax.jvp(attach, (args,), (args_dot,))


def _attach_kkt(
    problem_parts: Callable[..., tuple],
    settings: KKTSettings,
    x: PyTree,
    nu: jax.Array | None,
    lam: jax.Array | None,
    params: tuple,
) -> KKTSolution:
    # Hoist arrays the problem's functions close over (tracers of an outer transformation)
    # into explicit arguments, so they are differentiated like params.
    parts, hoisted = jax.closure_convert(problem_parts, x, *params)
    args = (*params, *hoisted)
    frozen = jax.lax.stop_gradient
    dtype = ravel_pytree(x)[0].dtype
    tolerances = settings.check.tolerances(dtype)
    recovered = nu is None or lam is None
    if recovered:
        pieces = frozen(_pieces(parts, x, args))
        nu_fit, lam_fit = _recover_duals(pieces, tolerances["feasibility"])
        nu = nu_fit if nu is None else nu
        lam = lam_fit if lam is None else lam
        g = pieces.g
    else:
        g = frozen(parts(x, *args)[2])
    nu = jnp.asarray(frozen(nu), dtype)
    lam = jnp.asarray(frozen(lam), dtype)
    x_scale = jnp.maximum(1.0, jnp.max(jnp.abs(ravel_pytree(x)[0]), initial=0.0))
    lam_scale = jnp.maximum(1.0, jnp.max(jnp.abs(lam), initial=0.0))
    mask = active_mask(g, lam, x_scale, lam_scale, tolerances["degeneracy"], settings.degenerate)
    fns = _KKTFunctions(parts, recovered)
    x_out, nu_out, lam_out = _kkt_solution(fns, settings, (x, nu, lam), mask, args)
    return KKTSolution(x_out, nu_out, lam_out)


# One compiled attachment per live problem (released with it), as in dargmin.implicit.
_RULES: weakref.WeakKeyDictionary[ConstrainedProblem, Callable[..., KKTSolution]] = (
    weakref.WeakKeyDictionary()
)


def kkt_solution(
    problem: ConstrainedProblem,
    x: PyTree,
    *params: PyTree,
    eq_dual: jax.Array | None = None,
    ineq_dual: jax.Array | None = None,
    settings: KKTSettings | None = None,
) -> KKTSolution:
    """Attach KKT derivatives to a solution ``x`` (and optionally its duals) of ``problem``.

    The returned :class:`KKTSolution` equals ``(x, ν, λ)`` (duals recovered by least
    squares on the active constraints when not given); its derivatives with respect to
    ``params`` (and arrays the problem's functions close over) are those of the KKT system
    on the active set. Derivatives flowing through ``x`` and the duals are discarded.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> problem = ConstrainedProblem(lambda x, c: 0.5 * jnp.sum((x - c) ** 2),
    ...                              eq=lambda x, c: jnp.sum(x, keepdims=True) - 1.0)
    >>> c = jnp.array([0.3, 0.1, 0.2])          # projection onto the plane Σx = 1
    >>> proj = lambda c: c - (jnp.sum(c) - 1.0) / 3
    >>> sol = kkt_solution(problem, proj(c), c)
    >>> jnp.allclose(jax.jacobian(lambda c: kkt_solution(problem, proj(c), c).x)(c),
    ...              jnp.eye(3) - 1.0 / 3)
    Array(True, dtype=bool)
    """
    settings = settings if settings is not None else KKTSettings()
    frozen = jax.lax.stop_gradient
    x = frozen(x)
    rule = _RULES.get(problem)
    if rule is None:
        # A weak reference to the problem's method: the cache must not keep it alive.
        rule = jax.jit(
            functools.partial(_attach_kkt, _WeakCallable(problem.parts)), static_argnums=0
        )
        _RULES[problem] = rule
    try:
        return rule(settings, x, eq_dual, ineq_dual, params)
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        if not isinstance(err, DargminError):
            reraise_constrained(err)
        raise


def constrained_argmin(
    objective: Callable[..., jax.Array],
    *,
    eq: Callable[..., jax.Array] | None = None,
    ineq: Callable[..., jax.Array] | None = None,
    degenerate: Degenerate = "raise",
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "lu",
    check: CheckMode | Check | KKTCheck = "raise",
    with_duals: bool = False,
) -> Callable[[Callable[..., PyTree]], Callable[..., PyTree]]:
    r"""Decorate a solver of ``min f(x, θ) s.t. h(x, θ) = 0, g(x, θ) ≤ 0``.

    The solver ``solve(init, *params)`` returns ``x`` or a :class:`KKTSolution`
    ``(x, ν, λ)`` with the multipliers of ``L = f + νᵀh + λᵀg`` (``λ ≥ 0``). Missing
    multipliers are recovered by least squares on the active constraints (the fit is
    judged by the stationarity check). The decorated solver is differentiable in
    ``params`` (forward, reverse, higher orders with the active set frozen; ``jit``,
    ``vmap``, pytrees), by the implicit function theorem on the KKT system restricted to
    the active set :math:`\mathcal A`:

    .. math::

        \begin{pmatrix} \nabla^2_{xx} L & J_h^\top & J_{g_\mathcal A}^\top \\ J_h & 0 & 0 \\
        J_{g_\mathcal A} & 0 & 0 \end{pmatrix}
        \begin{pmatrix} \dot x \\ \dot\nu \\ \dot\lambda_\mathcal A \end{pmatrix}
        = -\begin{pmatrix} \partial_\theta \nabla_x L \\ \partial_\theta h \\
        \partial_\theta g_\mathcal A \end{pmatrix} \dot\theta, \qquad
        \dot\lambda_{\bar{\mathcal A}} = 0 .

    Before a derivative is returned the point is checked, eagerly and under ``jit``/``vmap``:
    a violated constraint, a non-stationary Lagrangian, a negative multiplier, failed
    complementary slackness, linearly dependent active constraints (LICQ) and a weakly
    active constraint (multiplier and slack both ≈ 0: the map has a kink) are refused with
    the numbers; then the implicit-function check of the KKT matrix (Newton step,
    condition number) runs as in :func:`dargmin.argmin`.

    Parameters
    ----------
    objective
        ``f(x, *params)``, a scalar.
    eq, ineq
        ``h(x, *params)`` and ``g(x, *params)``, arrays (flattened); bounds are
        inequalities (``lo - x`` and ``x - hi``).
    degenerate
        At a weakly active inequality: ``"raise"`` (default) refuses, naming its multiplier
        and slack; ``"active"`` gives the one-sided derivative of the branch where it stays
        active, ``"inactive"`` the branch where it leaves the active set.
    linear_solver
        The KKT matrix is symmetric indefinite: ``"lu"`` (default), ``"minres"``,
        ``"gmres"``, or ``"lstsq"`` (SVD, minimum norm), which also solves systems whose
        active constraints are redundant (LICQ fails; refused otherwise, with the rank).
    check
        ``"raise"``, ``"warn"``, ``"ignore"`` or a :class:`KKTCheck` with tolerances.
    with_duals
        Return a :class:`KKTSolution` (differentiable duals included) even when the solver
        returns ``x`` alone.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda x, c: 0.5 * jnp.sum((x - c) ** 2)     # projection of c onto x ≤ 0
    >>> @constrained_argmin(f, ineq=lambda x, c: x)
    ... def project(init, c):
    ...     return jnp.minimum(c, 0.0)                     # duals recovered: λ = max(c, 0)
    >>> jax.jacobian(lambda c: project(None, c))(jnp.array([1.0, -2.0])).tolist()
    [[0.0, 0.0], [0.0, 1.0]]
    """
    problem = ConstrainedProblem(objective, eq, ineq)
    settings = KKTSettings(
        linear_solver=as_linear_solver(linear_solver),
        check=KKTCheck.of(check),
        degenerate=degenerate,
    )

    def decorator(solver: Callable[..., PyTree]) -> Callable[..., PyTree]:
        @functools.wraps(solver)
        def solve(init: PyTree, *params: PyTree) -> PyTree:
            out = solver(init, *jax.lax.stop_gradient(params))
            given = isinstance(out, KKTSolution)
            sol = out if given else KKTSolution(out)
            result = kkt_solution(
                problem,
                sol.x,
                *params,
                eq_dual=sol.eq_dual,
                ineq_dual=sol.ineq_dual,
                settings=settings,
            )
            return result if (given or with_duals) else result.x

        solve.problem = problem  # type: ignore[attr-defined]
        return solve

    return decorator


@dataclass(frozen=True)
class KKTReport:
    """What :func:`check_kkt` measured at a primal(-dual) point (eager, floats).

    Attributes
    ----------
    measurements
        The numbers of the check: constraint violations, ``‖∇ₓL‖`` (the fit of the
        multipliers when they were recovered), the smallest multiplier, the counts of
        complementarity failures and weakly active constraints (with the first one's
        index, multiplier and slack), the active rows and their numerical rank.
    eq_dual, ineq_dual
        The multipliers used (given, or recovered by least squares).
    active
        Which inequalities the derivative would treat as active.
    reasons
        The reason codes of the problems found (empty: the KKT derivative applies).
    message
        The sentences naming the numbers (``"ok"`` when there is no problem).
    """

    measurements: dict[str, float]
    eq_dual: np.ndarray
    ineq_dual: np.ndarray
    active: np.ndarray
    reasons: tuple[str, ...]
    message: str

    @property
    def ok(self) -> bool:
        """Whether the KKT derivative applies (no problem found)."""
        return not self.reasons


def check_kkt(
    objective: Callable[..., jax.Array],
    x: PyTree,
    *params: PyTree,
    eq: Callable[..., jax.Array] | None = None,
    ineq: Callable[..., jax.Array] | None = None,
    eq_dual: jax.Array | None = None,
    ineq_dual: jax.Array | None = None,
    check: CheckMode | Check | KKTCheck = "raise",
    degenerate: Degenerate = "raise",
) -> KKTReport:
    """Report, eagerly, what the KKT check of :func:`constrained_argmin` measures at ``x``.

    Nothing is raised: the report lists the problems (reason codes and sentences). Missing
    multipliers are recovered by least squares on the active constraints, and
    ``measurements["stationarity"]`` is then the residual of that fit.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x, c: 0.5 * jnp.sum((x - c) ** 2)
    >>> c = jnp.array([1.0, -2.0])
    >>> report = check_kkt(f, jnp.minimum(c, 0.0), c, ineq=lambda x, c: x)
    >>> report.ok, report.ineq_dual.tolist(), report.active.tolist()
    (True, [1.0, 0.0], [True, False])
    """
    settings = KKTSettings(check=KKTCheck.of(check), degenerate=degenerate)
    problem = ConstrainedProblem(objective, eq, ineq)
    args = tuple(params)
    dtype = ravel_pytree(x)[0].dtype
    tolerances = settings.check.tolerances(dtype)
    pieces = _pieces(problem.parts, x, args)
    recovered = eq_dual is None or ineq_dual is None
    if recovered:
        nu_fit, lam_fit = _recover_duals(pieces, tolerances["feasibility"])
        eq_dual = nu_fit if eq_dual is None else eq_dual
        ineq_dual = lam_fit if ineq_dual is None else ineq_dual
    nu = jnp.asarray(eq_dual, dtype)
    lam = jnp.asarray(ineq_dual, dtype)
    x_scale, lam_scale = _scales(pieces, lam)
    mask = active_mask(
        pieces.g, lam, x_scale, lam_scale, tolerances["degeneracy"], settings.degenerate
    )
    values = kkt_measure(problem.parts, (x, nu, lam), mask, args, tolerances)
    measured = {name: float(v) for name, v in zip(_FIELDS, values, strict=True)}
    found = kkt_problems(
        measured,
        tolerances,
        degenerate=settings.degenerate,
        least_squares=settings.least_squares,
        recovered=recovered,
    )
    return KKTReport(
        measurements=measured,
        eq_dual=np.asarray(nu),
        ineq_dual=np.asarray(lam),
        active=np.asarray(mask) > 0.5,
        reasons=tuple(reason for _, reason, _ in found),
        message=" ".join(text for _, _, text in found) or "ok",
    )

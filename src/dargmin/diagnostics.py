"""Diagnostics that refuse to lie: is ``x`` a stationary point, and is the IFT system invertible?

The implicit function theorem needs (i) a root ``g(x, θ) = 0`` and (ii) an invertible
``∂ₓg`` (for a minimum: a positive-definite Hessian). When either fails, ``-(∂ₓg)⁻¹ ∂θg`` is
meaningless: an unconverged solution whose Hessian entries are ~1e-4 yields derivatives of
size 1e15 where finite differences of re-optimization give ~1. This module

* measures the residual, the Newton step ``‖(∂ₓg)⁻¹ g‖`` (an estimate of the distance to the
  true root), the extreme eigenvalues (or singular values) and the condition number;
* turns the measurements into a verdict and a sentence that names the numbers;
* raises or warns from inside compiled code (through a host callback), so the checks fire
  under ``jax.jit`` and ``jax.vmap`` too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.errors import (
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    SingularSystemError,
    failure_reason,
    reraise_typed,
)
from dargmin.krylov import ConjugateGradient
from dargmin.linear_solvers import (
    Factorization,
    LinearSolver,
    default_tolerances,
    with_tolerances,
)
from dargmin.verdict import member_problems as member_problems
from dargmin.verdict import report_implicit_check as report_implicit_check

PyTree = Any

__all__ = [
    "Check",
    "DargminError",
    "DargminWarning",
    "NonStationaryPointError",
    "OptimumReport",
    "SingularSystemError",
    "check_optimum",
    "failure_reason",
    "reraise_typed",
]


CheckMode = Literal["raise", "warn", "ignore"]


@dataclass(frozen=True)
class Check:
    """What to verify before an implicit derivative is returned, and how to react.

    The implicit function theorem needs a root ``g(x, θ) = 0`` and an invertible ``∂ₓg`` (a
    positive-definite Hessian for a minimum). Before every derivative, dargmin measures the
    Newton step ``‖(∂ₓg)⁻¹ g‖`` (the distance from ``x`` to the true root, so the error the
    derivative inherits), the conditioning of ``∂ₓg`` and, when a minimum is declared, its
    definiteness; then refuses, warns or passes. This object is the one configuration of
    that check for every module (``argmin``/``root``/``fixed_point``, ``TaylorExpansion``,
    ``check_optimum``, the sensitivity functions).

    Attributes
    ----------
    mode
        ``"raise"`` (default): a typed :class:`DargminError`; ``"warn"``: a
        :class:`DargminWarning` and the derivative anyway; ``"ignore"``: no measurement.
        A linear solve that *fails* (non-finite, not converged) is reported in every mode.
    tol
        Largest accepted Newton step relative to ``max(1, ‖x‖)``. Default ``1e-4`` in
        float64 and ``1e-3`` in float32. The derivative inherits the error of ``x``
        amplified by the conditioning: on a float32 ridge problem (condition ~1e3) a
        Newton step of 4e-3·‖x‖ gave a derivative 1.7 % off, so the float32 default is the
        tightest a converged float32 solver reliably meets (its rounding leaves ~1e-5 on
        such problems), not 1e-2.
    max_condition
        Largest accepted estimate of the condition number of ``∂ₓg`` (default ``0.01/eps``:
        4.5e13 in float64, 8.4e4 in float32); beyond, the derivative has lost all but two
        digits.

    Examples
    --------
    >>> Check().tolerances(jnp.float32)
    (0.001, 83886.0...)
    >>> Check(mode="warn", tol=1e-6).mode
    'warn'
    """

    mode: CheckMode = "raise"
    tol: float | None = None
    max_condition: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in ("raise", "warn", "ignore"):
            raise ValueError(
                f"check must be 'raise', 'warn' or 'ignore' (or a dargmin.Check), got "
                f"{self.mode!r}."
            )
        for name in ("tol", "max_condition"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"Check.{name} must be a positive number, got {value!r}.")

    def tolerances(self, dtype: Any) -> tuple[float, float]:
        """``(tol, max_condition)`` for ``dtype``, defaults filled in (the one place)."""
        eps = float(jnp.finfo(dtype).eps)
        tol = self.tol if self.tol is not None else (1e-4 if eps < 1e-10 else 1e-3)
        max_condition = self.max_condition if self.max_condition is not None else 1e-2 / eps
        return tol, max_condition

    @classmethod
    def of(
        cls,
        check: CheckMode | Check,
        *,
        tol: float | None = None,
        max_condition: float | None = None,
    ) -> Check:
        """A :class:`Check` from the ``check=``/``tol=``/``max_condition=`` keywords."""
        if isinstance(check, Check):
            if tol is not None or max_condition is not None:
                raise ValueError("Pass tol/max_condition inside the Check object, not beside it.")
            return check
        return cls(mode=check, tol=tol, max_condition=max_condition)


class Measurements(NamedTuple):
    """The numbers the diagnosis measures at ``x`` (scalars, or batched under ``vmap``)."""

    residual_norm: jax.Array
    x_norm: jax.Array
    newton_step: jax.Array
    condition: jax.Array  # a lower bound of cond(∂ₓg); NaN when not measured (matrix-free)
    curvature: jax.Array  # smallest eigenvalue (certified) or a negative-curvature witness


def measure(
    residual: PyTree,
    x: PyTree,
    system: Factorization,
    strategy: LinearSolver,
    *,
    positive_definite: bool,
    newton_system: Factorization | None = None,
) -> Measurements:
    """Measure stationarity, conditioning and (if declared) definiteness at ``x`` (traceable).

    ``system`` is the prepared system ``∂ₓg`` (factorized once when dense: the Newton step
    and the condition estimate reuse the factors, O(n²) each). ``newton_system`` optionally
    prepares a cheaper solve for the Newton step (a loose Krylov tolerance: one digit is
    enough to compare the step with ``tol``). Inputs must be free of tangents (the
    caller stops gradients); the result feeds :func:`report`.

    What is certain, and what is probable:

    * dense strategies build the matrix: the condition number is a lower bound from two
      inverse-power steps (never a false alarm), and a declared minimum is certified —
      by the Cholesky factorization's success, or by the smallest eigenvalue (LU/QR/SVD);
    * matrix-free strategies measure the Newton step only; conjugate gradients also witness
      negative curvature when they meet it (a proof of a saddle when found, no proof of a
      minimum when not) and bound the condition number from below by the ratio of the
      extreme Rayleigh quotients met (a proof of ill-conditioning when large, none of good
      conditioning when not).
    """
    flat_x, _ = ravel_pytree(x)
    flat_r, _ = ravel_pytree(residual)
    dtype = flat_x.dtype
    nan = jnp.asarray(jnp.nan, dtype)
    solver = newton_system if newton_system is not None else system
    if positive_definite and _runs_conjugate_gradients(solver):
        # CG runs give the Newton step and a negative-curvature witness: CG on the residual
        # alone cannot see a saddle at an exactly stationary point (its right-hand side is
        # zero), so a second run on a fixed pseudo-random probe follows.
        newton, failed, witness, quotient_ratio = _newton_step_and_curvature(solver, flat_r)
    else:
        newton, failed = solver.solve_unchecked(_like_input(system, flat_r))
        witness = nan
        if positive_definite and not strategy.dense:
            # GMRES/BiCGStab/LSMR/MINRES ignore definiteness: a short CG run on a probe
            # looks for a direction of negative curvature (a witness, not a certificate).
            witness = _curvature_probe(system, flat_r)
    newton_flat = ravel_pytree(newton)[0]
    # A failed (e.g. early-stopped Krylov) solve returns a finite but wrong vector: mark it
    # non-finite so the report names the failure instead of trusting the step.
    newton_flat = jnp.where(failed, jnp.nan, newton_flat)
    condition, curvature = nan, nan
    if strategy.dense:
        matrix = system.operator.as_matrix()
        certified_by_factor = strategy.certifies_positive_definite and positive_definite
        if positive_definite and not certified_by_factor:
            # No factorization certifies definiteness (LU/QR/SVD chosen for a minimum): the
            # smallest eigenvalue cannot miss a negative direction, unlike a random probe.
            curvature, condition = _spectrum(matrix)
        else:
            condition = _condition_lower_bound(system, matrix)
            if certified_by_factor:
                # Cholesky succeeded ⇔ positive definite. Only when it failed is the smallest
                # eigenvalue needed, to tell a saddle from a singular minimum.
                factor_failed = ~jnp.all(jnp.isfinite(newton_flat))
                curvature = jax.lax.cond(
                    factor_failed, _smallest_eigenvalue, _certified_by_cholesky, matrix
                )
    elif positive_definite:
        curvature = witness
        if _runs_conjugate_gradients(solver):
            # The ratio of the extreme Rayleigh quotients CG met bounds the condition number
            # from below (never a false alarm): a Hessian singular along the directions CG
            # explored is refused, not handed to the derivative solve.
            condition = quotient_ratio
    return Measurements(
        jnp.linalg.norm(flat_r),
        jnp.linalg.norm(flat_x),
        jnp.linalg.norm(newton_flat),
        condition,
        curvature,
    )


# Module-level branches: jax.lax.cond caches its compilation on the functions' identity, so
# fresh lambdas would compile (and keep) a new executable at every eager call.
def _smallest_eigenvalue(matrix: jax.Array) -> jax.Array:
    return _spectrum(matrix)[0]


def _spectrum(matrix: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Smallest eigenvalue (rounding-level negatives read as 0) and condition number of the
    symmetrized ``matrix``, from one ``eigvalsh``."""
    eigenvalues = jnp.linalg.eigvalsh(0.5 * (matrix + matrix.T))
    magnitudes = jnp.abs(eigenvalues)
    largest = jnp.max(magnitudes)
    curvature = _beyond_rounding(eigenvalues[0], largest, matrix.shape[0])
    return curvature, largest / jnp.min(magnitudes)


def _beyond_rounding(curvature: jax.Array, scale: jax.Array, n: int) -> jax.Array:
    """``curvature`` if it is negative beyond rounding (``n·eps·scale``), else ``max(·, 0)``:
    a singular positive semidefinite matrix computes eigenvalues like -1e-16, which must
    be named singular, not a saddle."""
    eps = jnp.finfo(curvature.dtype).eps
    return jnp.where(curvature < -n * eps * scale, curvature, jnp.maximum(curvature, 0.0))


def _certified_by_cholesky(matrix: jax.Array) -> jax.Array:
    return jnp.asarray(jnp.inf, matrix.dtype)


def _like_input(system: Factorization, flat: jax.Array) -> PyTree:
    structure = system.operator.in_structure()
    leaves, treedef = jax.tree_util.tree_flatten(structure)
    if treedef.num_leaves == 1 and leaves[0].shape == flat.shape:
        return flat
    template = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    return ravel_pytree(template)[1](flat)


def _condition_lower_bound(system: Factorization, matrix: jax.Array) -> jax.Array:
    """``‖A‖ · ‖A⁻¹‖`` estimated from below by two power and two inverse-power steps on a
    fixed pseudo-random vector: O(n²) with the factors, never above the true condition
    number (so it never raises a false alarm), and within a small factor of it unless the
    probe is nearly orthogonal to the extreme singular vectors."""
    v = _probe((matrix.shape[0],), matrix.dtype, unit=True)
    w = matrix.T @ (matrix @ v)
    norm_a = jnp.sqrt(jnp.linalg.norm(w))  # ≤ ‖A‖ (one step of power iteration on AᵀA)
    u = v
    for _ in range(2):
        u = ravel_pytree(system.solve_unchecked(_like_input(system, u))[0])[0]
        scale = jnp.linalg.norm(u)
        u = u / scale
    # after two steps, scale = ‖A⁻¹ u₁‖ ≤ ‖A⁻¹‖
    return jnp.where(jnp.isfinite(scale), norm_a * scale, jnp.nan)


def _probe(shape: tuple[int, ...], dtype: Any, *, unit: bool = False) -> jax.Array:
    """The fixed pseudo-random vector every probe of the diagnosis uses (reproducible),
    scaled to unit norm if ``unit``.

    Small probes are compile-time constants: generating them in the program (threefry) cost
    about a third of the whole check at 30-100 unknowns. Large ones are generated on the
    device, so that the compiled program does not embed megabytes of constants."""
    size = int(np.prod(shape))
    if size <= _CONSTANT_PROBE_MAX_SIZE:
        return jnp.asarray(_constant_probe(size, np.dtype(dtype).name, unit).reshape(shape))
    probe = jax.random.normal(jax.random.key(0), shape, dtype=dtype)
    return probe / jnp.linalg.norm(probe) if unit else probe


_CONSTANT_PROBE_MAX_SIZE = 4096


@functools.lru_cache(maxsize=64)
def _constant_probe(size: int, dtype: str, unit: bool) -> np.ndarray:
    probe = np.random.default_rng(0).standard_normal(size)
    probe = (probe / np.linalg.norm(probe) if unit and size else probe).astype(dtype)
    probe.setflags(write=False)
    return probe


def _curvature_probe(system: Factorization, flat_r: jax.Array) -> jax.Array:
    probe = _probe(flat_r.shape, flat_r.dtype)
    cg = ConjugateGradient(rtol=0.1, atol=0.0, max_steps=max(2 * flat_r.size, 20))
    operator = system.operator
    if not lx.is_positive_semidefinite(operator):
        operator = lx.TaggedLinearOperator(
            operator, (lx.symmetric_tag, lx.positive_semidefinite_tag)
        )
    # Measured at stopped values: the solver runs directly, without lineax's wrapper.
    _, _, stats = cg.compute(cg.init(operator, {}), _like_input(system, probe), {})
    curvature = jnp.asarray(stats["min_curvature"], flat_r.dtype)
    return _beyond_rounding(curvature, _curvature_scale(stats).astype(flat_r.dtype), probe.size)


def _runs_conjugate_gradients(system: Factorization) -> bool:
    return isinstance(system.unchecked_solver()[0], ConjugateGradient)


def _newton_step_and_curvature(
    system: Factorization, flat_r: jax.Array
) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
    """CG on the residual, then on a fixed probe: the Newton step, its failure flag and the
    smallest Rayleigh quotient met (a negative value proves the Hessian indefinite), and the
    ratio of the largest to the smallest (a lower bound of the condition number).

    Two loops, not one batched (vmapped) loop: on CPU, XLA multiplies a large matrix by a
    two-column block about nine times slower than by two vectors (measured at 1000 x 10000:
    35 ms against 4 ms): at p = 10 000 the batched loop made the checked derivative cost
    1.30x the unchecked one, two loops 1.05x. At a converged point the residual's loop
    stops at once (its right-hand side is below the absolute floor)."""
    residual_norm = jnp.linalg.norm(flat_r)
    probe = _probe(flat_r.shape, flat_r.dtype, unit=True) * jnp.maximum(residual_norm, 1.0)

    def solve(b: jax.Array) -> lx.Solution:
        return system.solve_raw(_like_input(system, b))

    floor = getattr(system.unchecked_solver()[0], "atol", 0.0)

    def skip_solve(b: jax.Array) -> lx.Solution:
        # What CG returns for a right-hand side below its absolute floor (the zero step,
        # no iteration), without setting up its loop: at a converged point this is the
        # usual case.
        stats = {
            "num_steps": jnp.array(0, jnp.int32),
            "min_curvature": jnp.array(jnp.inf, b.dtype),
            "max_curvature": jnp.array(0.0, b.dtype),
            "residual_norm": residual_norm,
        }
        return lx.Solution(
            value=_like_input(system, jnp.zeros_like(b)),
            result=lx.RESULTS.successful,
            stats=stats,
            state=None,
        )

    below_floor = residual_norm <= jnp.asarray(floor, flat_r.dtype)
    newton = jax.lax.cond(below_floor, skip_solve, solve, flat_r)
    probed = solve(probe)
    curvature = jnp.minimum(newton.stats["min_curvature"], probed.stats["min_curvature"])
    scale = _curvature_scale(probed.stats)
    largest = jnp.maximum(newton.stats["max_curvature"], scale).astype(flat_r.dtype)
    smallest = curvature.astype(flat_r.dtype)
    # NaN (unmeasured, never a trigger) unless the smallest quotient is positive: a
    # non-positive one is the curvature witness's business.
    ratio = jnp.where(smallest > 0, largest / jnp.where(smallest > 0, smallest, 1), jnp.nan)
    return (
        newton.value,
        newton.result != lx.RESULTS.successful,
        _beyond_rounding(smallest, scale, probe.size),
        ratio,
    )


def _curvature_scale(stats: dict[str, jax.Array]) -> jax.Array:
    """The operator's scale seen by a CG run (its ``stats``): its largest Rayleigh quotient
    (no extra product; on a breakdown at the first step, the magnitude of the one quotient
    met)."""
    return jnp.maximum(stats["max_curvature"], jnp.abs(stats["min_curvature"]))


def judge(
    check: Check, *, kind: str, positive_definite: bool, dtype: Any
) -> Callable[..., np.ndarray]:
    """The host-side verdict on the five measurements, configured by ``check``: what
    :func:`report` calls through its callback, and what eager callers (``TaylorExpansion``)
    call directly with floats. Raises or warns per ``check.mode``; returns zeros."""
    tol, max_condition = check.tolerances(dtype)
    return functools.partial(
        report_implicit_check,
        kind=kind,
        mode=check.mode,
        tol=tol,
        max_condition=max_condition,
        expect_positive_definite=positive_definite,
        dtype=np.dtype(dtype),
    )


def report(
    measurements: Measurements,
    check: Check,
    *,
    kind: str,
    positive_definite: bool,
    dtype: Any,
) -> jax.Array:
    """Judge ``measurements`` on the host (through ``jax.pure_callback``) and raise or warn.

    Returns a zero scalar (batched under ``vmap``) that the caller must make the derivative
    depend on, so that the check is never dead code and runs before the derivative is used.
    """
    tol, max_condition = check.tolerances(dtype)
    host = judge(check, kind=kind, positive_definite=positive_definite, dtype=dtype)
    values = tuple(jax.lax.stop_gradient(m) for m in measurements)
    residual_norm, x_norm, newton_step, condition, curvature = values
    # The verdict's triggers, on the device: the host is called only when some batch member
    # may fail (a host round trip costs more than a small derivative). NaN compares False,
    # so an unmeasured condition or curvature never triggers.
    suspicious = (
        ~jnp.isfinite(residual_norm)
        | ~jnp.isfinite(x_norm)
        | ~jnp.isfinite(newton_step)
        | (newton_step > tol * jnp.maximum(1.0, x_norm))
        | (condition > max_condition)
    )
    if positive_definite:
        suspicious = suspicious | (curvature < 0)

    def call_host(args: tuple) -> jax.Array:
        # pure_callback rather than jax.debug.callback: its result is used, so it cannot be
        # dropped, and it carries no ordering effect into the compiled derivative.
        return jax.pure_callback(
            host, jax.ShapeDtypeStruct((), dtype), *args, vmap_method="expand_dims"
        )

    return jax.lax.cond(
        eqxi.unvmap_any(suspicious),
        call_host,
        lambda args: jnp.zeros((), dtype),
        values,
    )


def newton_system_for(system: Factorization, strategy: LinearSolver) -> Factorization | None:
    """The cheaper system the Newton step is measured with: ``None`` (reuse ``system``) for
    dense strategies, the same Krylov method at ``rtol=0.1`` otherwise — one digit of the
    step is enough to compare it with ``tol``, and costs a few iterations. The prepared
    (linearised) operator of ``system`` is reused."""
    if strategy.dense:
        return None
    # Keep the derivative solve's absolute floor: with 1e-3·rtol = 1e-4 as the floor, CG
    # stopped after one step and a Newton step 100× over the limit passed the check.
    dtype = jax.tree_util.tree_leaves(system.operator.in_structure())[0].dtype
    atol = getattr(strategy, "atol", None)
    strategy = with_tolerances(
        strategy, rtol=0.1, atol=atol if atol is not None else default_tolerances(dtype)[1]
    )
    return system.with_strategy(strategy)


# check_optimum reuses measure() and the verdict rules; it lives in its own module and is
# re-exported here, where users have always found it. (Imported last: it imports this module.)
from dargmin.optimum_check import OptimumReport, check_optimum  # noqa: E402

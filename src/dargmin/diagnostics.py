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

import dataclasses
import functools
import warnings
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
    DENSE_MAX_SIZE_REUSED,
    Auto,
    Factorization,
    LinearSolver,
    as_linear_solver,
    default_tolerances,
    factorize,
    operator_tags,
    with_tolerances,
)

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
      minimum when not).
    """
    flat_x, _ = ravel_pytree(x)
    flat_r, _ = ravel_pytree(residual)
    dtype = flat_x.dtype
    nan = jnp.asarray(jnp.nan, dtype)
    solver = newton_system if newton_system is not None else system
    if positive_definite and _runs_conjugate_gradients(solver):
        # One batched CG run gives the Newton step and a negative-curvature witness: CG on
        # the residual alone cannot see a saddle at an exactly stationary point (its
        # right-hand side is zero), so a fixed pseudo-random probe rides along.
        newton, failed, witness = _newton_step_and_curvature(solver, flat_r)
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
    v = _probe((matrix.shape[0],), matrix.dtype)
    v = v / jnp.linalg.norm(v)
    w = matrix.T @ (matrix @ v)
    norm_a = jnp.sqrt(jnp.linalg.norm(w))  # ≤ ‖A‖ (one step of power iteration on AᵀA)
    u = v
    for _ in range(2):
        u = ravel_pytree(system.solve_unchecked(_like_input(system, u))[0])[0]
        scale = jnp.linalg.norm(u)
        u = u / scale
    # after two steps, scale = ‖A⁻¹ u₁‖ ≤ ‖A⁻¹‖
    return jnp.where(jnp.isfinite(scale), norm_a * scale, jnp.nan)


def _probe(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """The fixed pseudo-random vector every probe of the diagnosis uses (reproducible)."""
    return jax.random.normal(jax.random.key(0), shape, dtype=dtype)


def _curvature_probe(system: Factorization, flat_r: jax.Array) -> jax.Array:
    probe = _probe(flat_r.shape, flat_r.dtype)
    cg = ConjugateGradient(rtol=0.1, atol=0.0, max_steps=max(2 * flat_r.size, 20))
    operator = system.operator
    if not lx.is_positive_semidefinite(operator):
        operator = lx.TaggedLinearOperator(
            operator, (lx.symmetric_tag, lx.positive_semidefinite_tag)
        )
    sol = lx.linear_solve(operator, _like_input(system, probe), cg, throw=False)
    curvature = jnp.asarray(sol.stats["min_curvature"], flat_r.dtype)
    return _beyond_rounding(curvature, _scale(system, probe), probe.size)


def _scale(system: Factorization, probe: jax.Array) -> jax.Array:
    """``‖A p‖/‖p‖``: the scale of the operator seen by a probe (one product)."""
    image = ravel_pytree(system.operator.mv(_like_input(system, probe)))[0]
    return jnp.linalg.norm(image) / jnp.linalg.norm(probe)


def _runs_conjugate_gradients(system: Factorization) -> bool:
    return isinstance(system.unchecked_solver()[0], ConjugateGradient)


def _newton_step_and_curvature(
    system: Factorization, flat_r: jax.Array
) -> tuple[PyTree, jax.Array, jax.Array]:
    """CG on ``[residual, probe]`` in one batched loop: the Newton step, its failure flag and
    the smallest Rayleigh quotient met (a negative value proves the Hessian indefinite)."""
    inner, state = system.unchecked_solver()
    probe = _probe(flat_r.shape, flat_r.dtype)
    probe = probe * jnp.maximum(jnp.linalg.norm(flat_r), 1.0) / jnp.linalg.norm(probe)

    def solve(b: jax.Array) -> tuple[PyTree, jax.Array, jax.Array]:
        rhs = _like_input(system, b)
        sol = lx.linear_solve(system.operator, rhs, inner, state=state, throw=False)
        return sol.value, sol.result != lx.RESULTS.successful, sol.stats["min_curvature"]

    values, failures, curvatures = jax.vmap(solve)(jnp.stack([flat_r, probe]))
    newton = jax.tree_util.tree_map(lambda leaf: leaf[0], values)
    curvature = jnp.min(curvatures).astype(flat_r.dtype)
    return newton, failures[0], _beyond_rounding(curvature, _scale(system, probe), probe.size)


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


def _member_problems(
    res: float,
    xn: float,
    step: float,
    cond: float,
    curv: float,
    *,
    system: str,
    tol: float,
    max_condition: float,
    expect_positive_definite: bool,
) -> list[tuple[type[DargminError], str, str]]:
    """The problems of one (unbatched) solution, as ``(error type, reason code, sentence)``.

    Conditioning is named before stationarity: at a nearly singular system the Newton step
    is inflated by the conditioning, and "run the solver longer" would be the wrong advice.
    """
    scale = max(1.0, xn) if np.isfinite(xn) else 1.0
    problems: list[tuple[type[DargminError], str, str]] = []
    if not np.isfinite(res) or not np.isfinite(xn):
        problems.append(
            (
                NonStationaryPointError,
                "nonfinite",
                f"the solution or its residual is not finite (‖x‖ = {xn:.3g}, "
                f"‖g(x, θ)‖ = {res:.3g}); the solver diverged or received NaN/inf inputs.",
            )
        )
        return problems
    if not np.isfinite(step) and not (expect_positive_definite and curv < 0):
        problems.append(
            (
                SingularSystemError,
                "singular",
                f"solving with the {system} at the solution gave non-finite values (or an "
                f"iterative solver did not converge): the {system} is singular"
                + (
                    " or not positive definite (not a strict minimum)"
                    if expect_positive_definite
                    else ""
                )
                + f" (‖g(x, θ)‖ = {res:.3g}). Regularize the problem (e.g. add a small "
                "ridge term), or use linear_solver='lstsq' to get the minimum-norm derivative.",
            )
        )
        return problems
    if not np.isfinite(step):
        # A Cholesky factorization fails (NaN) on an indefinite Hessian: the certified
        # negative eigenvalue, checked below, is the cause to name.
        step = float("inf")
    if np.isfinite(cond) and cond > max_condition:
        problems.append(
            (
                SingularSystemError,
                # Beyond 1/eps (100× the default limit) the matrix is singular to working
                # precision; between the limit and there, merely too ill-conditioned.
                "singular" if cond > 100 * max_condition else "ill_conditioned",
                f"the {system} is nearly singular: its condition number is at least "
                f"{cond:.3g} (limit {max_condition:.3g}), so derivatives lose all accuracy. "
                "The optimum may not be unique (flat directions); regularize the problem or "
                "use linear_solver='lstsq' for the minimum-norm derivative.",
            )
        )
    if expect_positive_definite and np.isfinite(curv) and curv < 0:
        problems.append(
            (
                SingularSystemError,
                "not_minimum",
                f"the Hessian is not positive definite at x (its smallest eigenvalue is "
                f"{curv:.3g} or below): x is a saddle point or a maximum, not a minimum. Use "
                "dargmin.root with linear_solver='lu' if any stationary point will do.",
            )
        )
    if np.isfinite(step) and step > tol * scale:
        problems.append(
            (
                NonStationaryPointError,
                "not_stationary",
                f"x is not a stationary point: the residual is ‖g(x, θ)‖ = {res:.3g} and the "
                f"Newton step to the nearest root is ‖({system})⁻¹ g‖ = {step:.3g}, above "
                f"the tolerance {tol:.1g} × max(1, ‖x‖ = {xn:.3g}). The implicit derivative "
                "would be wrong by about that relative amount or more. Run the solver to "
                "convergence (or raise tol= if this accuracy is acceptable).",
            )
        )
    return problems


def report_implicit_check(
    residual_norm: Any,
    x_norm: Any,
    newton_norm: Any,
    condition: Any,
    curvature: Any,
    *,
    kind: str,
    mode: str,
    tol: float,
    max_condition: float,
    expect_positive_definite: bool,
    dtype: Any = None,
) -> np.ndarray:
    """Host-side half of the check made before every implicit derivative.

    Called through ``jax.pure_callback`` with the measured numbers (possibly batched by
    ``vmap``, with leading batch axes). Every batch member is judged on its own numbers —
    a member with a huge ``‖x‖`` must not loosen the tolerance of the others — and the
    batch fails if any member fails; the message names the failing members. Raises
    :class:`NonStationaryPointError` / :class:`SingularSystemError` or warns with
    :class:`DargminWarning`, according to ``mode``. Returns zeros of the batch shape (the
    caller adds them to the derivative, so the check is never dead code).
    """
    values = [
        np.asarray(v, dtype=float)
        for v in (residual_norm, x_norm, newton_norm, condition, curvature)
    ]
    batch_shape = np.broadcast_shapes(*(v.shape for v in values))
    # The output dtype is the one declared at trace time (x64 may be toggled locally).
    passed = np.zeros(batch_shape, dtype=dtype if dtype is not None else values[1].dtype)
    members = [np.broadcast_to(v, batch_shape).ravel() for v in values]
    system = "Hessian" if kind == "argmin" else "Jacobian ∂ₓg"
    failing: list[tuple[int, list[tuple[type[DargminError], str, str]]]] = []
    for i in range(int(np.prod(batch_shape, dtype=int))):
        found = _member_problems(
            *(float(m[i]) for m in members),
            system=system,
            tol=tol,
            max_condition=max_condition,
            expect_positive_definite=expect_positive_definite,
        )
        if found:
            failing.append((i, found))
    if not failing:
        return passed
    problems = failing[0][1]
    where = ""
    if batch_shape:
        bad = [np.unravel_index(i, batch_shape) for i, _ in failing]
        named = ", ".join(str(tuple(int(j) for j in b)) for b in bad[:10])
        where = (
            f" (batch member{'s' if len(bad) > 1 else ''} {named}"
            f"{' …' if len(bad) > 10 else ''} of a batch of shape {tuple(batch_shape)}; "
            f"numbers below are member {tuple(int(j) for j in bad[0])}'s)"
        )
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


@dataclass(frozen=True)
class OptimumReport:
    """What :func:`check_optimum` measured at ``x``.

    Attributes
    ----------
    kind
        ``"argmin"`` (``x`` minimizes an objective) or ``"root"``.
    residual_norm
        ``‖g(x, θ)‖₂`` (for an argmin, the gradient norm).
    relative_residual
        ``‖g‖ / (σ_max ‖x‖)``-style backward error: the residual relative to what a unit
        relative change of ``x`` would produce, ``‖g‖ / (σ_max · max(1, ‖x‖))``.
    newton_step
        ``‖(∂ₓg)⁻¹ g‖``: estimated distance from ``x`` to the nearest root.
    smallest_eigenvalue, largest_eigenvalue
        Extreme eigenvalues of the Hessian (argmin) or singular values of ``∂ₓg`` (root).
    condition_number
        ``|λ|_max / |λ|_min`` (``inf`` if singular).
    verdict
        ``"ok"``, ``"not_stationary"``, ``"singular"``, ``"ill_conditioned"`` or
        ``"not_minimum"``.
    message
        A sentence naming the numbers.
    """

    kind: str
    residual_norm: float
    relative_residual: float
    newton_step: float
    smallest_eigenvalue: float
    largest_eigenvalue: float
    condition_number: float
    verdict: str
    message: str

    @property
    def ok(self) -> bool:
        """Whether the IFT applies at ``x`` (verdict ``"ok"``)."""
        return self.verdict == "ok"

    def __str__(self) -> str:
        label = "eigenvalues of the Hessian" if self.kind == "argmin" else "singular values"
        return (
            f"OptimumReport ({self.kind}): {self.verdict}\n"
            f"  residual ‖g‖            {self.residual_norm:.3e}\n"
            f"  relative residual       {self.relative_residual:.3e}\n"
            f"  Newton step ‖A⁻¹g‖      {self.newton_step:.3e}\n"
            f"  extreme {label}  [{self.smallest_eigenvalue:.3e}, {self.largest_eigenvalue:.3e}]\n"
            f"  condition number        {self.condition_number:.3e}\n"
            f"  {self.message}"
        )


def check_optimum(
    fn: Callable[..., PyTree],
    x: PyTree,
    *params: PyTree,
    kind: str = "auto",
    tol: float | None = None,
    max_condition: float | None = None,
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "auto",
    dense_max_size: int = DENSE_MAX_SIZE_REUSED,
    lanczos_iterations: int = 60,
) -> OptimumReport:
    """Check whether the implicit function theorem applies at ``x``, and report the numbers.

    Measures exactly what the check before every derivative measures (the same
    :func:`measure`: residual, Newton step ``‖(∂ₓg)⁻¹g‖`` with the same linear solver,
    conditioning, definiteness), plus the extreme eigenvalues of the Hessian (``argmin``;
    dense up to ``dense_max_size`` unknowns, matrix-free Lanczos with Hessian-vector
    products beyond) or singular values of ``∂ₓg`` (``root``), and returns a verdict: the
    reason code the decorators would refuse with, ``"ill_conditioned"`` when derivatives
    lose more than half the digits, or ``"ok"``.

    Parameters
    ----------
    fn
        An objective ``f(x, *params) -> scalar`` (``kind="argmin"``) or an optimality
        function ``g(x, *params)`` returning a pytree shaped like ``x`` (``kind="root"``).
        ``kind="auto"`` decides from the output: a scalar for a non-scalar ``x`` is an
        objective, an output shaped like ``x`` a root; a scalar ``x`` with a scalar output is
        ambiguous and needs ``kind=``.
    x, *params
        The candidate solution and the parameters.
    tol, max_condition
        As in :class:`Check` (defaults ``1e-4``/``1e-3`` and ``0.01/eps``).
    linear_solver
        The strategy for the Newton step (as in :func:`dargmin.argmin`; ``"auto"``: dense
        up to ``dense_max_size`` unknowns).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x, a: 0.5 * jnp.sum(a * x**2)
    >>> check_optimum(f, jnp.zeros(3), jnp.array([1.0, 2.0, 4.0])).verdict
    'ok'
    >>> check_optimum(f, jnp.ones(3), jnp.array([1.0, 2.0, 4.0])).verdict
    'not_stationary'
    >>> check_optimum(lambda x, a: x**2 - a, 2.0, 4.0, kind="root").verdict
    'ok'
    """
    flat_x, unravel = ravel_pytree(x)
    n = flat_x.size
    out = jax.eval_shape(fn, x, *params)
    kind = _resolve_kind(kind, out, x, n)
    argmin_kind = kind == "argmin"
    if argmin_kind:

        def g(v):
            return ravel_pytree(jax.grad(lambda xx: fn(unravel(xx), *params))(v))[0]
    else:

        def g(v):
            return ravel_pytree(fn(unravel(v), *params))[0]

    check = Check(tol=tol, max_condition=max_condition)
    tol, max_condition = check.tolerances(flat_x.dtype)
    residual = g(flat_x)
    strategy = as_linear_solver(linear_solver)
    if isinstance(strategy, Auto):
        strategy = dataclasses.replace(strategy, dense_max_size=dense_max_size)
    strategy = strategy.resolve(n, symmetric=argmin_kind, positive_definite=argmin_kind)
    measurements = _measure_at(g, flat_x, residual, strategy, positive_definite=argmin_kind)
    residual_norm, x_norm, newton_step = (float(v) for v in measurements[:3])

    def matvec(v):
        return jax.jvp(g, (flat_x,), (v,))[1]

    if n <= dense_max_size:
        matrix = np.asarray(jax.jacfwd(g)(flat_x))
        with np.errstate(all="ignore"):
            finite = bool(np.all(np.isfinite(matrix)))
            if argmin_kind and finite:
                spectrum = np.linalg.eigvalsh(0.5 * (matrix + matrix.T))
                lo, hi = float(spectrum[0]), float(spectrum[-1])
                abs_spec = np.abs(spectrum)
            elif finite:
                abs_spec = np.linalg.svd(matrix, compute_uv=False)
                lo, hi = float(abs_spec[-1]), float(abs_spec[0])
            else:
                abs_spec = np.array([np.nan])
                lo = hi = float("nan")
        abs_min, abs_max = float(abs_spec.min()), float(abs_spec.max())
    else:
        from dargmin.curvature import lanczos_extreme_eigenvalues  # matrix-free path

        if argmin_kind:
            estimate = lanczos_extreme_eigenvalues(
                matvec, flat_x.at[:].set(1.0), k=1, num_iterations=lanczos_iterations
            )
            lo, hi = float(estimate.smallest[0]), float(estimate.largest[0])
            abs_min = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
            abs_max = max(abs(lo), abs(hi))
        else:

            def normal_matvec(v):
                _, vjp = jax.vjp(g, flat_x)
                return vjp(matvec(v))[0]

            estimate = lanczos_extreme_eigenvalues(
                normal_matvec, flat_x.at[:].set(1.0), k=1, num_iterations=lanczos_iterations
            )
            lo = float(np.sqrt(max(float(estimate.smallest[0]), 0.0)))
            hi = float(np.sqrt(max(float(estimate.largest[0]), 0.0)))
            abs_min, abs_max = lo, hi

    with np.errstate(all="ignore"):
        condition = abs_max / abs_min if abs_min > 0 else float("inf")
        relative_residual = residual_norm / (max(abs_max, np.finfo(float).tiny) * max(1.0, x_norm))
    system = "Hessian" if argmin_kind else "Jacobian ∂ₓg"
    # The verdict rules are the decorators' (one diagnosis); the spectrum measured here is
    # exact on the dense path, so it replaces the lower bound of the condition number.
    problems = _member_problems(
        residual_norm,
        x_norm,
        newton_step,
        condition if np.isfinite(condition) else float(measurements.condition),
        lo if argmin_kind else float("nan"),
        system=system,
        tol=tol,
        max_condition=max_condition,
        expect_positive_definite=argmin_kind,
    )
    if problems:
        verdict = problems[0][1]
        message = " Also, ".join(text[0].upper() + text[1:] for _, _, text in problems)
        if verdict == "ill_conditioned" and not np.isfinite(condition):
            verdict = "singular"
    elif condition > max_condition**0.5:
        verdict = "ill_conditioned"
        message = (
            f"The implicit function theorem applies but the {system} is ill-conditioned "
            f"(condition number {condition:.3g}): expect about {np.log10(condition):.0f} "
            "digits lost in the derivative."
        )
    else:
        verdict = "ok"
        message = (
            f"x is a stationary point (Newton step {newton_step:.2g}) and the {system} is "
            f"well conditioned (condition number {condition:.3g}): the implicit derivative "
            "is reliable."
        )
    return OptimumReport(
        kind=kind,
        residual_norm=residual_norm,
        relative_residual=float(relative_residual),
        newton_step=newton_step,
        smallest_eigenvalue=lo,
        largest_eigenvalue=hi,
        condition_number=float(condition),
        verdict=verdict,
        message=message,
    )


def _resolve_kind(kind: str, out: Any, x: PyTree, n: int) -> str:
    if kind in ("argmin", "root"):
        return kind
    if kind != "auto":
        raise ValueError(f"kind must be 'auto', 'argmin' or 'root', got {kind!r}.")
    scalar_out = getattr(out, "shape", None) == ()
    same_as_x = jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(x) and [
        leaf.shape for leaf in jax.tree_util.tree_leaves(out)
    ] == [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(x)]
    if scalar_out and same_as_x:
        raise ValueError(
            "check_optimum: x is a scalar and fn returns a scalar, so fn could be an objective "
            "(argmin) or an optimality function (root). Pass kind='argmin' or kind='root'."
        )
    if scalar_out and n >= 1:
        return "argmin"
    if same_as_x:
        return "root"
    raise ValueError(
        "check_optimum: fn must return a scalar (an objective) or a pytree shaped like x (an "
        f"optimality function); it returned {out}."
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


def _measure_at(
    g: Callable[[jax.Array], jax.Array],
    flat_x: jax.Array,
    residual: jax.Array,
    strategy: LinearSolver,
    *,
    positive_definite: bool,
) -> Measurements:
    tags = operator_tags(strategy, symmetric=positive_definite, positive_definite=positive_definite)
    operator = lx.JacobianLinearOperator(lambda v, _: g(v), flat_x, tags=tags)
    if strategy.dense:
        operator = lx.MatrixLinearOperator(operator.as_matrix(), tags)
    system = factorize(operator, strategy, context="check_optimum")
    return measure(
        residual,
        flat_x,
        system,
        strategy,
        positive_definite=positive_definite,
        newton_system=newton_system_for(system, strategy),
    )

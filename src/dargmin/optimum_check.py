"""``check_optimum``: diagnose a candidate solution before differentiating through it.

The same measurement (:func:`dargmin.diagnostics.measure`) and the same rules
(:mod:`dargmin.verdict`) as the check the decorators run before every derivative, returned
as an :class:`OptimumReport` instead of raised: for a user who wants to look at the numbers
(gradient norm, Newton step, extreme eigenvalues, condition number) first.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.diagnostics import Check, Measurements, measure, newton_system_for
from dargmin.linear_solvers import (
    DENSE_MAX_SIZE_REUSED,
    Auto,
    LinearSolver,
    as_linear_solver,
    factorize,
    operator_tags,
)
from dargmin.verdict import member_problems

PyTree = Any

__all__ = ["OptimumReport", "check_optimum"]


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
        # The spectrum is computed where the matrix lives; only four scalars reach the host
        # (on sharded problems the p × p matrix stays on the devices).
        bounds = _dense_spectrum_bounds(jax.jacfwd(g)(flat_x), symmetric=argmin_kind)
        lo, hi, abs_min, abs_max = (v.item() for v in jax.device_get(bounds))
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
    problems = member_problems(
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


@functools.partial(jax.jit, static_argnames=("symmetric",))
def _dense_spectrum_bounds(matrix: jax.Array, symmetric: bool) -> tuple[jax.Array, ...]:
    """``(lo, hi, min |λ|, max |λ|)`` of a dense system: the extreme eigenvalues of
    its symmetric part (``symmetric``) or its extreme singular values; NaN when the matrix
    holds NaN or inf (LAPACK's eigensolvers do not converge on those)."""
    finite = jnp.all(jnp.isfinite(matrix))
    safe = jnp.where(finite, matrix, jnp.eye(matrix.shape[0], dtype=matrix.dtype))
    if symmetric:
        spectrum = jnp.linalg.eigvalsh(0.5 * (safe + safe.T))
        lo, hi, magnitudes = spectrum[0], spectrum[-1], jnp.abs(spectrum)
    else:
        magnitudes = jnp.linalg.svd(safe, compute_uv=False)
        lo, hi = magnitudes[-1], magnitudes[0]
    values = (lo, hi, jnp.min(magnitudes), jnp.max(magnitudes))
    return tuple(jnp.where(finite, v, jnp.nan) for v in values)

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

import logging
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.linear_solvers import two_norm

PyTree = Any


class DargminError(ValueError):
    """Base class of dargmin's errors about the problem being differentiated.

    Attributes
    ----------
    reason
        A stable code for what went wrong: ``"nonfinite"``, ``"singular"``,
        ``"ill_conditioned"``, ``"not_minimum"``, ``"not_stationary"`` (or ``None``). Under
        ``jax.jit`` the error reaches the caller wrapped in a ``jax.errors.JaxRuntimeError``;
        :func:`failure_reason` reads the same code from either.
    """

    reason: str | None = None


class NonStationaryPointError(DargminError):
    """The solution is not a root of the optimality condition (not converged)."""


class SingularSystemError(DargminError):
    """``∂ₓg`` (the Hessian for an argmin) is singular, nearly singular or not definite."""


class DargminWarning(UserWarning):
    """Warning counterpart of :class:`DargminError` (``check="warn"``)."""


class _DropDargminCallbackTracebacks(logging.Filter):
    """JAX logs a traceback for every exception raised in a debug callback before it
    re-raises it; ours carry a complete message already, so the log would only repeat it."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, DargminError)


for _logger_name in ("jax._src.debugging", "jax._src.callback"):
    logging.getLogger(_logger_name).addFilter(_DropDargminCallbackTracebacks())


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
                "ill_conditioned",
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
                f"{curv:.3g} < 0): x is a saddle point or a maximum, not a minimum. Use "
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
    dense_max_size: int = 2000,
    lanczos_iterations: int = 60,
) -> OptimumReport:
    """Check whether the implicit function theorem applies at ``x``.

    Measures the residual of ``g(x, θ) = 0``, the Newton step ``‖(∂ₓg)⁻¹g‖``, the extreme
    eigenvalues of the Hessian (``argmin``; dense for small problems, matrix-free Lanczos
    with Hessian-vector products beyond ``dense_max_size`` unknowns) or singular values of
    ``∂ₓg`` (``root``), and the condition number, and returns a verdict.

    Parameters
    ----------
    fn
        An objective ``f(x, *params) -> scalar`` (``kind="argmin"``) or an optimality
        function ``g(x, *params)`` returning a pytree shaped like ``x`` (``kind="root"``).
        ``kind="auto"`` decides from the output shape (a scalar output means an objective).
    x, *params
        The candidate solution and the parameters.
    tol
        Accepted Newton step relative to ``max(1, ‖x‖)`` (``1e-4`` float64, ``1e-2`` float32).
    max_condition
        Largest accepted condition number (``0.01 / eps``).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x, a: 0.5 * jnp.sum(a * x**2)
    >>> check_optimum(f, jnp.zeros(3), jnp.array([1.0, 2.0, 4.0])).verdict
    'ok'
    >>> check_optimum(f, jnp.ones(3), jnp.array([1.0, 2.0, 4.0])).verdict
    'not_stationary'
    """
    flat_x, unravel = ravel_pytree(x)
    n = flat_x.size
    out = jax.eval_shape(fn, x, *params)
    if kind == "auto":
        kind = "argmin" if (getattr(out, "shape", None) == () and n >= 1) else "root"
    if kind == "argmin":

        def g(v):
            return ravel_pytree(jax.grad(lambda xx: fn(unravel(xx), *params))(v))[0]
    elif kind == "root":

        def g(v):
            return ravel_pytree(fn(unravel(v), *params))[0]
    else:
        raise ValueError(f"kind must be 'auto', 'argmin' or 'root', got {kind!r}.")

    eps = float(jnp.finfo(flat_x.dtype).eps)
    tol = tol if tol is not None else (1e-4 if eps < 1e-10 else 1e-2)
    max_condition = max_condition if max_condition is not None else 1e-2 / eps
    residual = g(flat_x)
    residual_norm = float(jnp.linalg.norm(residual))
    x_norm = float(jnp.linalg.norm(flat_x))

    def matvec(v):
        return jax.jvp(g, (flat_x,), (v,))[1]

    if n <= dense_max_size:
        matrix = jax.jacfwd(g)(flat_x)
        if kind == "argmin":
            spectrum = np.linalg.eigvalsh(np.asarray(0.5 * (matrix + matrix.T)))
            lo, hi = float(spectrum[0]), float(spectrum[-1])
            abs_spec = np.abs(spectrum)
        else:
            abs_spec = np.linalg.svd(np.asarray(matrix), compute_uv=False)
            lo, hi = float(abs_spec[-1]), float(abs_spec[0])
        with np.errstate(all="ignore"):
            newton = np.linalg.lstsq(np.asarray(matrix), np.asarray(residual), rcond=None)[0]
        newton_step = float(np.linalg.norm(newton))
        abs_min, abs_max = float(abs_spec.min()), float(abs_spec.max())
    else:
        from dargmin.curvature import lanczos_extreme_eigenvalues  # matrix-free path

        if kind == "argmin":
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
        op = lx.FunctionLinearOperator(matvec, jax.ShapeDtypeStruct(flat_x.shape, flat_x.dtype))
        newton = lx.linear_solve(
            op,
            residual,
            lx.GMRES(rtol=1e-8, atol=1e-12, norm=two_norm, max_steps=10 * n),
            throw=False,
        ).value
        newton_step = float(jnp.linalg.norm(newton))

    condition = abs_max / abs_min if abs_min > 0 else float("inf")
    relative_residual = residual_norm / (max(abs_max, np.finfo(float).tiny) * max(1.0, x_norm))
    system = "Hessian" if kind == "argmin" else "Jacobian ∂ₓg"
    if not np.isfinite(residual_norm):
        verdict, message = "not_stationary", "The residual is not finite (NaN/inf in x or θ)."
    elif condition > max_condition:
        verdict = "singular"
        message = (
            f"The {system} is singular or nearly so (condition number {condition:.3g} > "
            f"{max_condition:.3g}; smallest |eigenvalue| {abs_min:.3g}): the derivative of the "
            "solution is not defined or not accurate. Regularize, or use linear_solver='lstsq'."
        )
    elif newton_step > tol * max(1.0, x_norm):
        verdict = "not_stationary"
        message = (
            f"x is not a stationary point: ‖g‖ = {residual_norm:.3g}, Newton step to the root "
            f"{newton_step:.3g} > {tol:.1g} × max(1, ‖x‖ = {x_norm:.3g}). Converge the solver "
            "further before differentiating."
        )
    elif kind == "argmin" and lo <= 0:
        verdict = "not_minimum"
        message = (
            f"The Hessian has a non-positive eigenvalue {lo:.3g}: x is a saddle point or "
            "maximum, not a strict minimum."
        )
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


_ERROR_TYPES: dict[str, type[DargminError]] = {
    cls.__name__: cls for cls in (DargminError, NonStationaryPointError, SingularSystemError)
}


def reraise_typed(err: Exception) -> None:
    """Re-raise a dargmin error that surfaced as a ``JaxRuntimeError`` from compiled code.

    Checks run in a host callback; when they fail inside compiled code JAX wraps the
    exception. Where the caller is eager, the typed error (with its message) is restored so
    that ``except dargmin.NonStationaryPointError`` works. Returns if ``err`` is not ours.
    """
    text = str(err)
    match = re.search(r"(\w+Error): (dargmin\.\w+: cannot differentiate.*)", text, flags=re.S)
    if match and match.group(1) in _ERROR_TYPES:
        message = match.group(2).strip().splitlines()[0]
        error = _ERROR_TYPES[match.group(1)](message)
        error.reason = failure_reason(err)
        raise error from None


_REASON = re.compile(r"\[reason: (\w+)\]")


def failure_reason(err: BaseException) -> str | None:
    """The stable reason code of a dargmin refusal, typed or wrapped by JAX.

    Eagerly, dargmin raises :class:`NonStationaryPointError` / :class:`SingularSystemError`;
    inside ``jax.jit`` JAX wraps them in ``jax.errors.JaxRuntimeError``. Both carry the code
    ``[reason: …]`` at the end of dargmin's sentence; this returns it (``None`` if ``err``
    is not a dargmin refusal), so callers need no regular expression of their own.

    Examples
    --------
    >>> failure_reason(NonStationaryPointError("… [reason: not_stationary]"))
    'not_stationary'
    >>> failure_reason(RuntimeError("unrelated")) is None
    True
    """
    if isinstance(err, DargminError) and err.reason is not None:
        return err.reason
    match = _REASON.search(str(err))
    return match.group(1) if match else None

"""The host-side verdict of the diagnosis: which rule a measured point breaks, in a sentence.

:func:`dargmin.diagnostics.report` measures on the device and calls
:func:`report_implicit_check` on the host (through ``jax.pure_callback``) only when a batch
member may fail; :func:`dargmin.diagnostics.check_optimum` and eager callers use the same
rules (:func:`member_problems`), so every entry point words a failure the same way, with the
numbers. Plain floats in, exceptions or warnings out: no JAX here.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from dargmin.errors import (
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    SingularSystemError,
    refusal_from_callback,
)

__all__ = ["member_problems", "refuse_or_warn", "report_implicit_check"]


def member_problems(
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
        found = member_problems(
            *(float(m[i]) for m in members),
            system=system,
            tol=tol,
            max_condition=max_condition,
            expect_positive_definite=expect_positive_definite,
        )
        if found:
            failing.append((i, found))
    return refuse_or_warn(failing, passed, kind=kind, mode=mode)


Problems = list[tuple[type[DargminError], str, str]]


def refuse_or_warn(
    failing: list[tuple[int, Problems]], passed: np.ndarray, *, kind: str, mode: str
) -> np.ndarray:
    """The end of every host-side verdict (implicit and KKT checks): raise (or warn about)
    the first failing member's problems, naming the other failing members of the batch.

    ``failing`` holds ``(flat member index, problems)`` per failing member, in order;
    ``passed`` is the zeros of the batch shape returned when nothing fails or in
    ``mode="warn"``. In a process with several devices a refusal is a warning and NaN
    (see :func:`dargmin.errors.refusal_from_callback`): never a silent number.
    """
    if not failing:
        return passed
    batch_shape = passed.shape
    problems = failing[0][1]
    where = ""
    if batch_shape:
        bad = [tuple(int(j) for j in np.unravel_index(i, batch_shape)) for i, _ in failing]
        named = ", ".join(str(b) for b in bad[:10])
        where = (
            f" (batch member{'s' if len(bad) > 1 else ''} {named}"
            f"{' …' if len(bad) > 10 else ''} of a batch of shape {tuple(batch_shape)}; "
            f"numbers below are member {bad[0]}'s)"
        )
    message = (
        f"dargmin.{kind}: cannot differentiate the solution{where}: "
        + " Also, ".join(text for _, _, text in problems)
        + f" [reason: {problems[0][1]}]"
    )
    if mode == "raise":
        error = problems[0][0](message)
        error.reason = problems[0][1]
        return refusal_from_callback(error, batch_shape, passed.dtype)
    warnings.warn(message, DargminWarning, stacklevel=3)
    return passed

"""The host side of a checked linear solve: from the numbers a solve measured (lineax's
result code, finiteness, the true residual, steps, condition or rank estimates) to a
refusal or a warning that names them.

:class:`dargmin.linear_solvers.CheckedSolver` calls :func:`report_failed_solve` through a
host callback, only when some batch member looks suspicious on the device. Kept apart from
the solver so that the wording of every failure lives in one place.
"""

from __future__ import annotations

import warnings
from typing import Any

import lineax as lx
import numpy as np

from dargmin.errors import DargminWarning, SingularSystemError, refusal_from_callback

__all__ = ["report_failed_solve"]

_RESULT_NAMES = {
    int(lx.RESULTS.successful._value): "successful",
    int(lx.RESULTS.max_steps_reached._value): "max_steps_reached",
    int(lx.RESULTS.singular._value): "singular",
    int(lx.RESULTS.breakdown._value): "breakdown",
    int(lx.RESULTS.stagnation._value): "stagnation",
    int(lx.RESULTS.conlim._value): "conlim",
    int(lx.RESULTS.nonfinite_input._value): "nonfinite_input",
}


def report_failed_solve(
    code: Any,
    nonfinite: Any,
    stalled: Any,
    residual: Any,
    rhs_norm: Any,
    steps: Any,
    condition: Any,
    rank: Any,
    dropped: Any,
    *,
    solver_name: str,
    context: str,
    mode: str,
    size: int,
    dtype: Any,
    max_condition: float,
) -> np.ndarray:
    """Host side of :class:`CheckedSolver`: raise or warn, naming the numbers, per member."""
    arrays = [
        np.asarray(v, dtype=float)
        for v in (code, nonfinite, stalled, residual, rhs_norm, steps, condition, rank, dropped)
    ]
    shape = np.broadcast_shapes(*(a.shape for a in arrays))
    zeros = np.zeros(shape, dtype=dtype)
    members = [np.broadcast_to(a, shape).ravel() for a in arrays]
    first_warning: str | None = None
    for i in range(int(np.prod(shape, dtype=int))):
        c, bad, stall, res, bnorm, k, cond, r, drop = (float(m[i]) for m in members)
        message = _failed_solve_message(
            int(c),
            bool(bad),
            bool(stall),
            res,
            bnorm,
            k,
            cond,
            r,
            drop,
            solver_name,
            size,
            max_condition,
        )
        if message is None:
            continue
        text, reason, is_error = message
        member = tuple(int(j) for j in np.unravel_index(i, shape))
        where = f" (batch member {member} of {tuple(shape)})" if shape else ""
        full = f"dargmin.{context}: {text}{where} [reason: {reason}]"
        if is_error and mode != "warn":
            # Any member's failure refuses the batch, even after a member that only warns.
            error = SingularSystemError(full)
            error.reason = reason
            return refusal_from_callback(error, shape, zeros.dtype)
        first_warning = first_warning or full
    if first_warning is not None:
        warnings.warn(first_warning, DargminWarning, stacklevel=2)
    return zeros


def _failed_solve_message(
    code: int,
    nonfinite: bool,
    stalled: bool,
    residual: float,
    rhs_norm: float,
    steps: float,
    condition: float,
    rank: float,
    dropped: float,
    solver_name: str,
    size: int,
    max_condition: float = np.inf,
) -> tuple[str, str, bool] | None:
    result = _RESULT_NAMES.get(code, str(code))
    relative = residual / rhs_norm if rhs_norm > 0 else residual
    if result == "breakdown":
        return (
            f"the {solver_name} solve met a direction of non-positive curvature "
            f"pᵀAp/pᵀp = {condition:.3g} after {steps:.0f} steps: the matrix is not "
            "positive definite (a saddle point or a maximum, not a strict minimum). Use "
            "linear_solver='minres' or 'lu' if any stationary point will do.",
            "not_minimum",
            True,
        )
    if result == "singular" and not nonfinite and np.isfinite(condition):
        return (
            f"the {solver_name} solve met a direction of zero curvature pᵀAp/pᵀp = "
            f"{condition:.3g} (rounding level) after {steps:.0f} steps: the matrix is singular "
            "(positive semidefinite with a flat direction, so the solution is not unique). "
            "Regularize the problem, or use linear_solver='lstsq' for the minimum-norm "
            "solution.",
            "singular",
            True,
        )
    if nonfinite or result in ("singular", "nonfinite_input"):
        return (
            f"the {solver_name} solve returned non-finite values (lineax result "
            f"{result!r}): the system is singular (or, for a Cholesky factorization, not "
            "positive definite), or its inputs hold NaN/inf. Regularize the problem, or use "
            "linear_solver='lstsq' for the minimum-norm solution.",
            "singular",
            True,
        )
    if result in ("max_steps_reached", "stagnation", "conlim") or stalled:
        cond_text = (
            f"; the solver's condition estimate is {condition:.3g}"
            if np.isfinite(condition) and condition > 0
            else ""
        )
        return (
            f"the {solver_name} solve of a {size}-unknown system did not converge (lineax "
            f"result {result!r} after {steps:.0f} steps; relative residual "
            f"‖Ax − b‖/‖b‖ = {relative:.3g}{cond_text}). The system is ill-conditioned or "
            "singular, so a derivative from it would be wrong. Regularize the problem, use a "
            "dense solver ('lu'/'cholesky') to measure the conditioning, or raise max_steps.",
            "ill_conditioned",
            True,
        )
    if np.isfinite(condition) and condition > max_condition:
        return (
            f"the {solver_name} solve reports a condition number estimate of {condition:.3g} "
            f"(limit {max_condition:.3g}): the system is nearly singular and the solution "
            f"carries no reliable digits (relative residual {relative:.3g}). Regularize the "
            "problem, or use linear_solver='lstsq' for the minimum-norm solution.",
            "ill_conditioned",
            True,
        )
    if rank >= 0 and rank < size and dropped > 0:
        return (
            f"the least-squares (pseudo-inverse) solve used rank {rank:.0f} of {size} and "
            f"dropped a part of norm {dropped:.3g} of the right-hand side (relative "
            f"{dropped / rhs_norm if rhs_norm > 0 else dropped:.3g}): the result is the "
            "minimum-norm solution, a derivative only in the directions kept.",
            "singular",
            False,
        )
    return None

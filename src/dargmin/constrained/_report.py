"""An eager report of the KKT check (:func:`check_kkt`): the numbers, reasons and sentences."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.constrained._measure import (
    _FIELDS,
    _pieces,
    duals_and_mask,
    kkt_measure,
)
from dargmin.constrained._settings import ConstrainedProblem, Degenerate, KKTCheck, KKTSettings
from dargmin.constrained._verdict import kkt_problems
from dargmin.diagnostics import Check, CheckMode

PyTree = Any


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
    nu, lam, mask = duals_and_mask(pieces, eq_dual, ineq_dual, tolerances, settings.degenerate)
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

"""The verdict on a KKT point (host side): which rule it breaks, in a sentence with numbers.

:func:`kkt_problems` judges one member's measurements (plain floats), :func:`kkt_report`
measures on the device and calls the host (through ``jax.pure_callback``) only when some
batch member may fail, so the check costs one device-side reduction on a good batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.constrained._measure import _FIELDS, _Pieces, kkt_measure
from dargmin.constrained._settings import (
    ConstraintQualificationError,
    Degenerate,
    DegenerateActiveSetError,
    InfeasibleSolutionError,
    KKTSettings,
)
from dargmin.errors import DargminError, NonStationaryPointError
from dargmin.verdict import refuse_or_warn

PyTree = Any


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
                f"(largest constraint violation = "
                f"{max(m['eq_violation'], m['ineq_violation']):.3g}, ‖∇f + J_hᵀν + J_gᵀλ‖ = "
                f"{m['stationarity']:.3g}, smallest multiplier = {m['min_multiplier']:.3g}); "
                "the solver diverged or "
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
    return refuse_or_warn(failing, np.zeros(shape, dtype=dtype), kind=kind, mode=mode)


def kkt_report(
    parts: Callable[..., tuple],
    z: tuple[PyTree, jax.Array, jax.Array],
    mask: jax.Array,
    args: tuple,
    settings: KKTSettings,
    *,
    recovered: bool,
    pieces: _Pieces | None = None,
    licq_bound: jax.Array | None = None,
) -> jax.Array:
    """Measure the KKT point on the device and judge it on the host (only when some batch
    member may fail). Returns a zero scalar the derivative must depend on. ``pieces`` and
    ``licq_bound`` as in :func:`.kkt_measure`."""
    dtype = ravel_pytree(z[0])[0].dtype
    tolerances = settings.check.tolerances(dtype)
    values = jax.lax.stop_gradient(
        kkt_measure(parts, z, mask, args, tolerances, pieces=pieces, licq_bound=licq_bound)
    )
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

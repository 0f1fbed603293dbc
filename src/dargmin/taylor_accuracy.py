"""The accuracy of a truncated Taylor series against re-solved optima.

:meth:`dargmin.taylor.TaylorExpansion.check_accuracy` compares the partial sums
``S_k = Σ_{j≤k} x_j / j!`` with ``x*(θ₀ + Δ)`` re-solved by the caller; this module turns
those comparisons into an :class:`AccuracyReport` (errors by order, whether they fall, and a
crude radius of validity from the root and ratio tests).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["AccuracyReport"]


@dataclass(frozen=True)
class AccuracyReport:
    """Errors of the truncated series against re-solved solutions (see ``check_accuracy``).

    Attributes
    ----------
    delta_norms
        ``‖Δᵢ‖₂`` of each tested direction, shape ``(n,)``.
    errors
        ``errors[i, k] = ‖Σ_{j≤k} x_j/j! − x*(θ₀+Δᵢ)‖₂`` for orders ``k = 0..K``, shape
        ``(n, K+1)``.
    relative_errors
        ``errors`` divided by ``‖x*(θ₀+Δᵢ) − x₀‖₂`` (the order-0 error), so that column 0 is 1.
    decreasing
        Per direction: whether the error falls (or stays below ``floor``) at every order.
    radius
        Crude radius of validity per direction, in the units of ``θ``: ``‖Δᵢ‖`` times the
        root-test estimate ``min(‖c_K‖^{-1/K}, ‖c_{K-1}‖/‖c_K‖)`` with ``c_k = x_k / k!`` (the
        series coefficients in ``t``). Beyond it the series should not be trusted.
    floor
        Error level below which differences are attributed to the solver's accuracy.
    """

    delta_norms: np.ndarray
    errors: np.ndarray
    relative_errors: np.ndarray
    decreasing: np.ndarray
    radius: np.ndarray
    floor: float

    @property
    def ok(self) -> bool:
        """Whether the error fell with the order for every tested direction."""
        return bool(np.all(self.decreasing))

    def __str__(self) -> str:
        order = self.errors.shape[1] - 1
        head = "  ‖Δ‖      " + " ".join(f"{'order ' + str(k):>10}" for k in range(order + 1))
        rows = [
            f"  {n:<9.3g}" + " ".join(f"{e:>10.2e}" for e in errs) + ("" if ok else "  (!)")
            for n, errs, ok in zip(self.delta_norms, self.errors, self.decreasing, strict=True)
        ]
        return (
            "AccuracyReport: ‖series − re-solved x*‖ by order\n"
            + head
            + "\n"
            + "\n".join(rows)
            + f"\n  errors fall with order: {self.ok}; crude radius of validity (‖Δ‖ units): "
            + ", ".join(f"{r:.3g}" for r in self.radius)
        )


def _radius_estimate(coeffs: Sequence[float]) -> float:
    """Radius of convergence in ``t`` from ``‖c_k‖``: min of the root and ratio tests at K."""
    last = coeffs[-1]
    if last == 0.0 or not np.isfinite(last):
        return float("inf")
    root = last ** (-1.0 / len(coeffs))
    ratio = coeffs[-2] / last if len(coeffs) >= 2 and coeffs[-2] > 0 else float("inf")
    return float(min(root, ratio))


def _accuracy_report(
    x0: jax.Array,
    cases: Sequence[tuple[jax.Array, Sequence[jax.Array], jax.Array]],
    floor: float | None,
) -> AccuracyReport:
    """Assemble the report from ``(flat Δ, [x_1..x_K] flat, re-solved x*(θ₀+Δ) flat)`` cases."""
    eps = float(jnp.finfo(x0.dtype).eps)
    errors, norms, radii, decreasing, floors = [], [], [], [], []
    for flat_delta, xs, truth in cases:
        partial = x0
        errs = [float(jnp.linalg.norm(partial - truth))]
        for k, xk in enumerate(xs, start=1):
            partial = partial + xk / math.factorial(k)
            errs.append(float(jnp.linalg.norm(partial - truth)))
        level = floor if floor is not None else 100 * eps * max(1.0, float(jnp.linalg.norm(truth)))
        errs_arr = np.array(errs)
        falls = (errs_arr[1:] <= errs_arr[:-1]) | (errs_arr[1:] <= level)
        coeffs = [float(jnp.linalg.norm(xk)) / math.factorial(k) for k, xk in enumerate(xs, 1)]
        dnorm = float(jnp.linalg.norm(flat_delta))
        errors.append(errs_arr)
        norms.append(dnorm)
        radii.append(_radius_estimate(coeffs) * dnorm)
        decreasing.append(bool(np.all(falls)))
        floors.append(level)
    errors_arr = np.array(errors)
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = errors_arr / errors_arr[:, :1]
    return AccuracyReport(
        delta_norms=np.array(norms),
        errors=errors_arr,
        relative_errors=relative,
        decreasing=np.array(decreasing),
        radius=np.array(radii),
        floor=float(max(floors)) if floors else 0.0,
    )

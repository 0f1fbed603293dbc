"""Sensitivity of an M-estimator to its training data: influence functions and approximate
leave-one-out (infinitesimal jackknife, one-Newton-step ALO, approximate cross-validation).

Setting. The fitted parameters are a weighted M-estimator evaluated at unit weights,

.. math::

    \\hat\\theta(w) = \\arg\\min_\\theta \\; F(\\theta, w), \\qquad
    F(\\theta, w) = \\sum_{i=1}^n w_i\\, \\ell(\\theta, z_i) + r(\\theta), \\qquad w = \\mathbf 1,

with a per-example loss ``loss(params, example)``, an optional ``regularizer(params)`` and
``data`` a pytree of arrays whose leading axis indexes the ``n`` examples. ``params`` may come
from any solver; only the optimality ``∇θF(θ̂, 1) = 0`` is used (and checked). Write
``g_i = ∇θℓ(θ̂, z_i)``, ``H_i = ∇²θℓ(θ̂, z_i)`` and ``H = Σ_i H_i + ∇²r(θ̂)``. The implicit
function theorem gives the influence of example ``i`` (the derivative in its weight)

.. math:: \\frac{\\partial \\hat\\theta}{\\partial w_i} = -H^{-1} g_i ,

from which this module derives:

* :func:`influence_on_params` — all ``n`` influences, one Hessian factorization (dense) or
  ``n`` batched conjugate-gradient solves with Hessian-vector products (matrix-free);
* :func:`influence_on_function` — ``d f(θ̂)/dw_i = -∇fᵀH⁻¹g_i`` for a test loss or a
  prediction ``f`` (Koh & Liang, 2017), with one solve per output of ``f``;
* :func:`infinitesimal_jackknife` — ``θ̂₋ᵢ ≈ θ̂ + H⁻¹g_i`` (Giordano et al., 2019);
* :func:`approximate_leave_one_out` — the jackknife, or one Newton step on the leave-``i``-out
  objective, ``θ̂₋ᵢ ≈ θ̂ + (H - H_i)⁻¹ g_i`` (Beirami et al., 2017; Rad & Maleki, 2020), which
  is exact for quadratic losses (ridge regression);
* :func:`approximate_cv_error` — the leave-one-out cross-validation error without refits;
* :func:`jackknife_variance` — the infinitesimal-jackknife (sandwich) variance.

Every function first checks with :func:`dargmin.check_optimum` that ``params`` is a
stationary point with a non-singular Hessian, and raises
:class:`dargmin.NonStationaryPointError` / :class:`dargmin.SingularSystemError` otherwise:
the influence of an unconverged fit is not the derivative of anything. NaN or inf in
``params`` or ``data`` (or a loss whose derivatives are not finite there) raises an error
that names the leaves and examples holding them (``[reason: nonfinite]``), never a NaN
result. pandas ``DataFrame`` / ``Series`` leaves of ``data`` are converted with
``.to_numpy()`` (non-numeric columns are refused).

``data`` may be row-sharded over several devices (``jax.device_put`` with a
``NamedSharding`` that splits the example axis): the Hessian and the gradients' sums are
reduced across the devices, per-example results come back sharded like the data, and neither
the data nor anything with one entry per example is gathered onto one device or brought to
the host — only scalars, a few example indices for error messages, and the ``p × p`` Hessian
of the stationarity check (tested on 8 simulated devices in ``tests/test_sharding.py``).

The compiled code is cached per ``loss`` / ``regularizer`` and holds them only weakly: a
loss that the caller drops is garbage-collected together with its compiled code.
"""

# The modules, in the order a call flows through them: the inputs (_inputs) → the compiled
# kernels (_kernels, cached through _weak_cache) → the stationarity and finiteness checks
# (_checks) → the solves with the Hessian (_hessian_solves) → the public functions
# (_influence, _leave_one_out).
from dargmin.sensitivity._influence import (
    infinitesimal_jackknife,
    influence_on_function,
    influence_on_params,
    jackknife_variance,
)
from dargmin.sensitivity._inputs import CheckMode as CheckMode  # type aliases, still importable
from dargmin.sensitivity._inputs import LinearSolver as LinearSolver
from dargmin.sensitivity._inputs import Loss as Loss
from dargmin.sensitivity._inputs import PyTree as PyTree
from dargmin.sensitivity._inputs import Regularizer as Regularizer
from dargmin.sensitivity._leave_one_out import approximate_cv_error, approximate_leave_one_out

__all__ = [
    "approximate_cv_error",
    "approximate_leave_one_out",
    "infinitesimal_jackknife",
    "influence_on_function",
    "influence_on_params",
    "jackknife_variance",
]

"""The checks of :mod:`dargmin.sensitivity`: is ``params`` a strict, well-posed minimum, and
which inputs make the derivatives non-finite.

The influence of an unconverged fit is not the derivative of anything: every function first
checks stationarity with :func:`dargmin.check_optimum`, and anything that comes out
non-finite is traced back to the leaves and examples of ``params`` / ``data`` that cause it.
"""

from __future__ import annotations

import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.diagnostics import (
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    SingularSystemError,
    check_optimum,
)
from dargmin.linear_solvers import DENSE_MAX_SIZE
from dargmin.sensitivity._inputs import (
    CheckMode,
    PyTree,
    _as_arrays,
    _first_rows,
    _nonfinite_leaves,
    _num_examples,
    _refusal,
)
from dargmin.sensitivity._kernels import _Kernels, _kernels


def _raise_if_nonfinite(
    kernels: _Kernels,
    params: PyTree,
    data: PyTree,
    *,
    caller: str,
    hessian: jax.Array | None = None,
) -> None:
    """Raise a ``[reason: nonfinite]`` error if the gradients or the Hessian at ``params``
    hold NaN / inf, naming what is not finite and the inputs that cause it.

    Called only where something downstream came out non-finite (the checks cost nothing
    when all is well), so NaN in a leaf of ``data`` that the loss never reads is no error.
    """
    flat, unravel = ravel_pytree(params)
    problems = []
    gradients = kernels.example_gradients(params, data)
    # Counted where the gradients are (row-sharded with the data): only integers come back.
    bad, first = _first_rows(~jnp.all(jnp.isfinite(gradients), axis=1))
    if bad:
        problems.append(
            f"the gradient of the loss is not finite for {bad} of {gradients.shape[0]} "
            f"examples (first: {first})"
        )
    regularizer = kernels.regularizer
    reg_bad = 0
    if regularizer is not None:
        reg_gradient = jax.grad(lambda t: regularizer(unravel(t)))(flat)
        reg_bad = int(jnp.count_nonzero(~jnp.isfinite(reg_gradient)))  # counted on device
        if reg_bad:
            problems.append(
                f"the gradient of the regularizer has {reg_bad} non-finite "
                f"entr{'ies' if reg_bad > 1 else 'y'} of {reg_gradient.size}"
            )
    gradient_problem = bool(problems)
    if hessian is None and flat.size <= DENSE_MAX_SIZE:
        hessian = kernels.total_hessian(params, data)
    if hessian is not None:
        count = int(jnp.sum(~jnp.isfinite(hessian)))
        if count:
            problems.append(
                f"the Hessian of the objective has {count} non-finite "
                f"entr{'ies' if count > 1 else 'y'} of {np.size(hessian)}"
            )
    else:  # too large to build: one Hessian-vector product with a vector of ones
        hvp = jax.jvp(
            jax.grad(lambda t: kernels.total_objective(unravel(t), data)),
            (flat,),
            (jnp.ones_like(flat),),
        )[1]
        if not bool(jnp.all(jnp.isfinite(hvp))):
            problems.append("a Hessian-vector product of the objective is not finite")
    if not problems:
        return
    causes = _nonfinite_leaves(params, "params", False) + _nonfinite_leaves(data, "data", True)
    if causes:
        cause = (
            "NaN/inf in the inputs: "
            + "; ".join(causes)
            + ". Remove or impute them (or fix the fit that produced these params)."
        )
    else:
        if reg_bad and not bad:
            culprit = "the regularizer"
        elif (bad and not reg_bad) or regularizer is None:
            culprit = "the loss"
        else:
            culprit = "the loss or the regularizer"
        cause = (
            f"Every input is finite: {culprit} itself has non-finite derivatives at these "
            "params (e.g. the log or square root of a non-positive number, a division by "
            "zero, or an overflow)."
        )
    # As in dargmin.diagnostics: a non-finite residual is "not stationary"; a non-finite
    # Hessian at a finite gradient is a broken system to solve.
    error = NonStationaryPointError if gradient_problem or causes else SingularSystemError
    raise _refusal(
        error,
        "nonfinite",
        f"dargmin.sensitivity.{caller}: cannot compute the influence of the data: "
        f"{'; '.join(problems)}. {cause}",
    )


def _check_stationary(
    kernels: _Kernels,
    params: PyTree,
    data: PyTree,
    *,
    check: CheckMode,
    tol: float | None,
    caller: str,
) -> None:
    """Raise (or warn) unless ``params`` is a strict, well-posed minimum of ``F(·, 1)``."""
    if check not in ("raise", "warn", "ignore"):
        raise ValueError(f"check must be 'raise', 'warn' or 'ignore', got {check!r}.")
    if check == "ignore":
        return
    report = check_optimum(
        lambda theta, d: kernels.total_objective(theta, d),
        params,
        data,
        kind="argmin",
        tol=tol,
    )
    measured = (report.residual_norm, report.smallest_eigenvalue, report.largest_eigenvalue)
    # A Hessian holding NaN/inf gives NaN eigenvalues (check_optimum computes them on
    # device, guarded): say where the non-finite values are.
    if not np.all(np.isfinite(measured)):
        _raise_if_nonfinite(kernels, params, data, caller=caller)
    # check_optimum's default limit of the condition number: beyond it the verdict may read
    # "ill_conditioned" (named first), but the Hessian is numerically singular.
    max_condition = 1e-2 / float(jnp.finfo(ravel_pytree(params)[0].dtype).eps)
    error: type[DargminError] | None = None
    if report.verdict in ("not_stationary", "nonfinite"):
        error = NonStationaryPointError
    elif report.verdict in ("singular", "not_minimum") or (
        report.verdict == "ill_conditioned" and not report.condition_number <= max_condition
    ):
        # Not a strict minimum: the influence (a derivative of the argmin) is undefined or
        # meaningless, exactly as dargmin.argmin refuses to differentiate there.
        error = SingularSystemError
    if error is None:
        return
    message = (
        f"dargmin.sensitivity.{caller}: cannot compute the influence of the data at these "
        f"params: {report.message} (gradient norm {report.residual_norm:.3g}, Hessian "
        f"eigenvalues in [{report.smallest_eigenvalue:.3g}, {report.largest_eigenvalue:.3g}])."
    )
    if check == "raise":
        raise _refusal(error, report.verdict, message)
    warnings.warn(f"{message} [reason: {report.verdict}]", DargminWarning, stacklevel=3)


def _check_gradients(
    kernels: _Kernels, params: PyTree, data: PyTree, gradients: jax.Array, caller: str
) -> None:
    """The per-example gradients are the right-hand sides of every solve: refuse NaN/inf."""
    if not bool(jnp.all(jnp.isfinite(gradients))):
        _raise_if_nonfinite(kernels, params, data, caller=caller)


def _prepared_fit(
    loss: Any,
    regularizer: Any,
    params: PyTree,
    data: PyTree,
    *,
    check: CheckMode,
    tol: float | None,
    caller: str,
) -> tuple[PyTree, PyTree, int, _Kernels]:
    """The preamble every sensitivity function shares: convert ``params``/``data`` (or refuse
    them with their names), count the examples, build the loss kernels and check that
    ``params`` is a strict minimum. Returns ``(params, data, n, kernels)``."""
    params, data = _as_arrays(params, "params", caller), _as_arrays(data, "data", caller)
    n = _num_examples(data)
    kernels = _kernels(loss, regularizer)
    _check_stationary(kernels, params, data, check=check, tol=tol, caller=caller)
    return params, data, n, kernels

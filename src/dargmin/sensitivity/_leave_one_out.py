"""Approximate leave-one-out without refits: one Newton step on each leave-``i``-out
objective, ``θ̂₋ᵢ ≈ θ̂ + (H - Hᵢ)⁻¹gᵢ`` (or the infinitesimal jackknife), and the
leave-one-out cross-validation error that follows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dargmin.diagnostics import (
    SingularSystemError,
)
from dargmin.sensitivity._checks import _prepared_fit, _raise_if_nonfinite
from dargmin.sensitivity._hessian_solves import (
    _CG_BATCH,
    _default_rtol,
    _resolve_solver,
    _rows_not_finite,
)
from dargmin.sensitivity._influence import infinitesimal_jackknife
from dargmin.sensitivity._inputs import (
    CheckMode,
    LinearSolver,
    Loss,
    PyTree,
    Regularizer,
    _as_arrays,
    _first_rows,
    _refusal,
)
from dargmin.sensitivity._kernels import _Kernels, _row_layout

# Per-example Hessians are built this many at a time by the dense one-Newton-step ALO, so
# memory stays at batch × p² instead of n × p². The Woodbury path needs only p × rank per
# example and batches more.
_HESSIAN_BATCH = 64
_WOODBURY_BATCH = 1024


def approximate_leave_one_out(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    method: Literal["ij", "newton"] = "newton",
    linear_solver: LinearSolver = "auto",
    hessian_rank: int | None = None,
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> PyTree:
    r"""Approximate the ``n`` leave-one-out fits :math:`\hat\theta_{-i}` without refitting.

    ``method="ij"`` is the infinitesimal jackknife :math:`\hat\theta + H^{-1} g_i`
    (:func:`infinitesimal_jackknife`). ``method="newton"`` (default) takes one Newton step
    from :math:`\hat\theta` on the leave-``i``-out objective
    :math:`F_{-i}(\theta) = F(\theta) - \ell(\theta, z_i)`, whose gradient at
    :math:`\hat\theta` is :math:`-g_i` and Hessian :math:`H - H_i`:

    .. math::

        \hat\theta_{-i} \approx \hat\theta + (H - H_i)^{-1} g_i, \qquad
        H_i = \nabla^2_\theta \ell(\hat\theta, z_i)

    (Beirami et al., 2017; Rad & Maleki, 2020, "ALO"). It is exact when the loss is quadratic
    in :math:`\theta` (least squares, ridge) and has error :math:`O(1/n^2)` relative to the
    jackknife's :math:`O(1/n)` relative error otherwise.

    How the Newton steps are solved:

    * ``hessian_rank=k`` given (e.g. ``1`` for generalized linear models, where
      :math:`H_i = \psi''\,x_i x_i^\top`; the number of outputs for multi-output models):
      Sherman–Morrison–Woodbury from one Cholesky factorization of ``H``, with ``H_i``
      recovered by ``2k`` Hessian-vector products of example ``i`` (a randomized range
      finder, checked on a spare probe). Cost ``O(p² k)`` per example.
    * otherwise, dense (``p ≤ 200`` or ``linear_solver`` ``"cholesky"``/``"lu"``): the
      ``p × p`` matrix ``H - H_i`` is built and solved per example (``O(p³)`` each, batched);
    * ``linear_solver="cg"`` (or ``p > 200``): CG with Hessian-vector products of
      ``H - H_i``, batched over examples.

    Parameters
    ----------
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.
    method
        ``"newton"`` or ``"ij"``.
    hessian_rank
        Upper bound on the rank of every per-example Hessian; enables the Woodbury path.
        A bound that is too small is detected and raises ``ValueError``.
    seed
        Seed of the random probes of the Woodbury path.

    Returns
    -------
    PyTree
        Pytree like ``params`` with a leading axis of length ``n``: approximations of the
        leave-one-out parameters.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2           # quadratic: Newton is exact
    >>> approximate_leave_one_out(loss, jnp.mean(data), data)
    Array([3. , 2.5, 0.5], dtype=float32)
    """
    common: dict[str, Any] = {
        "regularizer": regularizer,
        "linear_solver": linear_solver,
        "check": check,
        "tol": tol,
        "solve_rtol": solve_rtol,
        "max_steps": max_steps,
    }
    if method == "ij":
        return infinitesimal_jackknife(loss, params, data, **common)
    if method != "newton":
        raise ValueError(f"method must be 'ij' or 'newton', got {method!r}.")
    name = "approximate_leave_one_out"
    params, data, n, kernels = _prepared_fit(
        loss, regularizer, params, data, check=check, tol=tol, caller=name
    )
    flat, unravel = ravel_pytree(params)
    p = flat.size
    caller = f"dargmin.sensitivity.{name}"
    if hessian_rank is not None:
        rank = int(hessian_rank)
        if not 1 <= rank <= p:
            raise ValueError(f"hessian_rank must be in [1, {p}], got {hessian_rank!r}.")
        steps, mismatch = kernels.newton_woodbury(
            params, data, rank, _row_layout(data, _WOODBURY_BATCH), jax.random.key(seed)
        )
        eps = float(jnp.finfo(flat.dtype).eps)
        worst = int(jnp.argmax(mismatch))
        if float(mismatch[worst]) > 1e3 * eps**0.5:
            raise ValueError(
                f"{caller}: hessian_rank={rank} is smaller than the rank of the per-example "
                f"Hessians: for example {worst}, a rank-{rank} representation misses "
                f"{float(mismatch[worst]):.2g} of a Hessian-vector product. Pass a larger "
                "hessian_rank or leave it None."
            )
    elif _resolve_solver(linear_solver, p) in ("cholesky", "lu"):
        steps = kernels.newton_dense(params, data, _row_layout(data, _HESSIAN_BATCH))
    else:
        rtol = float(solve_rtol) if solve_rtol is not None else _default_rtol(flat.dtype)
        steps_cap = max_steps if max_steps is not None else max(10 * p, 100)
        layout = _row_layout(data, _CG_BATCH, whole_if_unsharded=True)
        steps, converged = kernels.newton_cg(params, data, steps_cap, rtol, layout)
        failed, first = _first_rows(~converged)
        if failed:
            _raise_if_nonfinite(kernels, params, data, caller=name)
            raise _refusal(
                SingularSystemError,
                "singular",
                f"{caller}: conjugate gradients on the leave-one-out Hessians H - H_i did not "
                f"converge within {steps_cap} steps for {failed} of {n} examples (first: "
                f"{first}); removing those examples may leave a singular "
                "problem. Add a regularizer or raise max_steps.",
            )
    # Counted where the steps are (row-sharded with the data): only integers come back.
    bad, first = _first_rows(_rows_not_finite(steps))
    if bad:
        _raise_if_nonfinite(kernels, params, data, caller=name)
        if hessian_rank is not None:
            _check_cholesky(kernels, params, data, caller)
        raise _refusal(
            SingularSystemError,
            "singular",
            f"{caller}: the leave-one-out Hessian H - H_i is singular for {bad} of {n} "
            f"examples (first: {first}): without them the problem has no unique "
            "minimizer. Add a regularizer, or use method='ij'.",
        )
    return jax.vmap(lambda s: unravel(flat + s))(steps)


def _check_cholesky(kernels: _Kernels, params: PyTree, data: PyTree, caller: str) -> None:
    """The Woodbury path factorizes ``H`` by Cholesky: refuse, with its eigenvalues, an ``H``
    that is not positive definite (a saddle or a singular fit let through by ``check``)."""
    # Eigenvalues on the device: two scalars come back, not the p × p Hessian.
    spectrum = jnp.linalg.eigvalsh(kernels.total_hessian(params, data))
    lo, hi = float(spectrum[0]), float(spectrum[-1])
    eps = float(jnp.finfo(spectrum.dtype).eps)
    if lo > spectrum.size * eps * max(abs(hi), float(jnp.finfo(spectrum.dtype).tiny)):
        return
    reason, what = (
        ("not_minimum", "not positive definite: params is not a minimum")
        if lo < 0
        else ("singular", "singular: the minimum is not unique")
    )
    raise _refusal(
        SingularSystemError,
        reason,
        f"{caller}: the Hessian H is {what} (its eigenvalues lie in [{lo:.3g}, {hi:.3g}]), "
        "and the Woodbury updates of hessian_rank= need its Cholesky factorization. Add a "
        "regularizer, or leave hessian_rank=None (dense LU per example).",
    )


def approximate_cv_error(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    metric: Callable[[PyTree, PyTree], jax.Array] | None = None,
    regularizer: Regularizer = None,
    method: Literal["ij", "newton"] = "newton",
    linear_solver: LinearSolver = "auto",
    hessian_rank: int | None = None,
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
    seed: int = 0,
) -> jax.Array:
    r"""Leave-one-out cross-validation error without refitting.

    .. math::

        \mathrm{CV} = \frac1n \sum_{i=1}^n m(\hat\theta_{-i}, z_i),

    with :math:`\hat\theta_{-i}` from :func:`approximate_leave_one_out` and the metric
    :math:`m` defaulting to the training loss (``metric=None``). With ``method="newton"``
    and a quadratic loss this equals exact leave-one-out cross-validation.

    Parameters
    ----------
    loss, params, data, regularizer, method, linear_solver, hessian_rank, check, tol, \
solve_rtol, max_steps, seed
        As in :func:`approximate_leave_one_out`.
    metric
        ``metric(params, example) -> scalar`` evaluated on the held-out example (e.g. a
        0-1 error or the squared error); ``None`` uses ``loss``.

    Returns
    -------
    jax.Array
        The scalar cross-validation estimate.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2
    >>> approximate_cv_error(loss, jnp.mean(data), data)  # (4.5 + 1.125 + 10.125) / 3
    Array(5.25, dtype=float32)
    """
    metric = loss if metric is None else metric
    params = _as_arrays(params, "params", "approximate_cv_error")
    data = _as_arrays(data, "data", "approximate_cv_error")
    left_out = approximate_leave_one_out(
        loss,
        params,
        data,
        regularizer=regularizer,
        method=method,
        linear_solver=linear_solver,
        hessian_rank=hessian_rank,
        check=check,
        tol=tol,
        solve_rtol=solve_rtol,
        max_steps=max_steps,
        seed=seed,
    )
    # Each held-out example is scored by the fit that did not see it.
    return jnp.mean(jax.vmap(metric)(left_out, data))

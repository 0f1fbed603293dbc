"""Influence functions: the derivatives ``∂θ̂/∂wᵢ = -H⁻¹gᵢ`` of the fit in the example
weights, of a function of the fit, and what follows from them to first order (the
infinitesimal jackknife and its variance)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from dargmin.diagnostics import (
    DargminError,
)
from dargmin.sensitivity._checks import _check_gradients, _prepared_fit
from dargmin.sensitivity._hessian_solves import _resolve_solver, _solve_hessian
from dargmin.sensitivity._inputs import (
    CheckMode,
    LinearSolver,
    Loss,
    PyTree,
    Regularizer,
    _nonfinite_leaves,
    _refusal,
)


def influence_on_params(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Influence of each training example on the fitted parameters, ∂θ̂/∂wᵢ.

    For :math:`\hat\theta(w) = \arg\min_\theta \sum_i w_i \ell(\theta, z_i) + r(\theta)` at
    :math:`w = \mathbf 1`, the implicit function theorem applied to
    :math:`\nabla_\theta F(\hat\theta(w), w) = 0` gives

    .. math::

        \frac{\partial \hat\theta}{\partial w_i} = -H^{-1} \nabla_\theta \ell(\hat\theta, z_i),
        \qquad H = \sum_j \nabla^2_\theta \ell(\hat\theta, z_j) + \nabla^2 r(\hat\theta).

    Removing example ``i`` changes ``w_i`` by ``-1``, so ``-influence[i]`` is the
    first-order change of the parameters when ``i`` is dropped
    (see :func:`infinitesimal_jackknife`).

    Parameters
    ----------
    loss
        ``loss(params, example) -> scalar``: the loss of ONE example, a JAX function.
        ``example`` is ``data`` indexed at ``i`` along the leading axis of every leaf.
    params
        Fitted parameters :math:`\hat\theta` (any pytree of float arrays), from any solver.
    data
        Pytree of arrays whose leaves share the leading axis of length ``n``.
    regularizer
        Optional ``regularizer(params) -> scalar`` :math:`r(\theta)`, not weighted.
    linear_solver
        ``"cholesky"``: build the ``p × p`` Hessian once, factorize it (LU fallback if not
        positive definite) and solve for all ``n`` gradients at once; ``"lu"``: the same
        with LU; ``"cg"``: matrix-free conjugate gradients with Hessian-vector products,
        batched over examples (memory ``O(n p)``, never ``p²``); ``"auto"``: Cholesky up to
        200 parameters, CG beyond.
    check
        ``"raise"`` (default), ``"warn"`` or ``"ignore"`` when ``params`` is not a
        stationary point or the Hessian is singular / not positive definite
        (:func:`dargmin.check_optimum`).
    tol
        Accepted Newton step of the stationarity check, relative to ``max(1, ‖θ̂‖)``.
    solve_rtol, max_steps
        Tolerance and iteration cap of CG (default ``0.1·sqrt(eps)``, ``10 p`` steps).

    Returns
    -------
    PyTree
        Pytree like ``params`` whose leaves have a leading axis of length ``n``: entry ``i``
        is :math:`\partial\hat\theta/\partial w_i`.

    Raises
    ------
    dargmin.NonStationaryPointError
        ``params`` is not a minimizer (the fit has not converged), or NaN / inf in
        ``params``, ``data`` or the gradients (``[reason: nonfinite]``, naming the leaves
        and examples that hold them).
    dargmin.SingularSystemError
        The Hessian is singular, not positive definite or not finite, or CG did not
        converge.
    TypeError
        A leaf of ``data`` is not numeric (strings, objects, dates). pandas ``DataFrame`` /
        ``Series`` leaves are converted with ``.to_numpy()``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2          # the mean is the M-estimator
    >>> influence_on_params(loss, jnp.mean(data), data).tolist()  # (z_i - mean) / n
    [-0.667, -0.333, 1.0]
    """
    caller = "influence_on_params"
    _resolve_solver(linear_solver, 1)  # reject a bad name before the (costly) check
    params, data, _, kernels = _prepared_fit(
        loss, regularizer, params, data, check=check, tol=tol, caller=caller
    )
    gradients = kernels.example_gradients(params, data)
    solved = _solve_hessian(
        kernels,
        params,
        data,
        gradients,
        linear_solver=linear_solver,
        rtol=solve_rtol,
        max_steps=max_steps,
        caller=caller,
    )
    unravel = ravel_pytree(params)[1]
    return jax.vmap(unravel)(-solved)


def influence_on_function(
    fn: Callable[[PyTree], PyTree],
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Influence of each training example on a function of the fitted parameters.

    For a quantity :math:`f(\hat\theta)` — a test loss, a prediction, a contrast — the chain
    rule and :func:`influence_on_params` give (Koh & Liang, 2017)

    .. math::

        \frac{d f(\hat\theta)}{d w_i} = -\nabla f(\hat\theta)^\top H^{-1}
        \nabla_\theta \ell(\hat\theta, z_i).

    For a scalar ``f`` this costs ONE solve :math:`s = H^{-1}\nabla f` (reverse mode)
    followed by ``n`` dot products :math:`-s^\top g_i`, instead of ``n`` solves. For an
    ``m``-dimensional ``f`` it uses ``min(m, n)`` solves: ``m`` reverse solves
    :math:`H^{-1}\nabla f_k` when ``m ≤ n``, otherwise the ``n`` parameter influences
    contracted with the Jacobian of ``f``.

    Parameters
    ----------
    fn
        ``fn(params) -> pytree of arrays``, differentiable by JAX. It may close over test
        data.
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.

    Returns
    -------
    PyTree
        Like ``fn(params)`` with a new leading axis of length ``n``: entry ``i`` is
        :math:`d f(\hat\theta)/d w_i`. A scalar ``fn`` gives an array of shape ``(n,)``.
        Removing example ``i`` changes ``f`` by about ``-result[i]``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2
    >>> test_loss = lambda mu: 0.5 * (mu - 1.0) ** 2       # ∇f = mean - 1 = 1
    >>> influence_on_function(test_loss, loss, jnp.mean(data), data).tolist()
    [-0.667, -0.333, 1.0]
    """
    caller = "influence_on_function"
    params, data, n, kernels = _prepared_fit(
        loss, regularizer, params, data, check=check, tol=tol, caller=caller
    )
    flat, unravel = ravel_pytree(params)
    # One evaluation of fn (cheap next to the solves) gives the output layout to rebuild.
    out_flat, unravel_out = ravel_pytree(fn(params))
    m = out_flat.size

    def flat_fn(theta: jax.Array) -> jax.Array:
        return ravel_pytree(fn(unravel(theta)))[0]

    gradients = kernels.example_gradients(params, data)
    _check_gradients(kernels, params, data, gradients, caller)
    solve = functools.partial(
        _solve_hessian,
        kernels,
        params,
        data,
        linear_solver=linear_solver,
        rtol=solve_rtol,
        max_steps=max_steps,
        caller=caller,
    )
    # Reverse (m ≤ n): m solves with the rows of the Jacobian of f (H is symmetric, so
    # ∇fₖᵀH⁻¹gᵢ = (H⁻¹∇fₖ)ᵀgᵢ), then an (n × p)(p × m) product. Forward: the n parameter
    # influences pushed through the Jacobian of f.
    jacobian = jax.jacrev if m <= n else jax.jacfwd
    jac = jacobian(flat_fn)(flat).reshape(m, flat.size)
    count = int(jnp.sum(~jnp.isfinite(jac)))
    if count:
        causes = _nonfinite_leaves(params, "params", False)
        raise _refusal(
            DargminError,
            "nonfinite",
            f"dargmin.sensitivity.{caller}: the Jacobian of fn at params has {count} "
            f"non-finite entr{'ies' if count > 1 else 'y'} of {jac.size}: "
            + ("; ".join(causes) + "." if causes else "fn's derivative is not finite there."),
        )
    result = -gradients @ solve(jac).T if m <= n else -solve(gradients) @ jac.T
    return jax.vmap(unravel_out)(result)


def infinitesimal_jackknife(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Approximate leave-one-out parameters by the infinitesimal jackknife.

    Dropping example ``i`` sets :math:`w_i = 0`; a first-order Taylor expansion of
    :math:`\hat\theta(w)` around :math:`w = \mathbf 1` (Giordano et al., 2019, "A Swiss army
    infinitesimal jackknife") gives

    .. math::

        \hat\theta_{-i} \approx \hat\theta - \frac{\partial\hat\theta}{\partial w_i}
        = \hat\theta + H^{-1}\nabla_\theta \ell(\hat\theta, z_i).

    The error is :math:`O(1/n^2)` per parameter for smooth, well-conditioned problems
    (the change itself is :math:`O(1/n)`). :func:`approximate_leave_one_out` with
    ``method="newton"`` is more accurate at a higher cost.

    Parameters
    ----------
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.

    Returns
    -------
    PyTree
        Pytree like ``params`` with a leading axis of length ``n``: entry ``i``
        approximates the parameters refitted without example ``i``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2
    >>> infinitesimal_jackknife(loss, jnp.mean(data), data)  # exact LOO means: 3, 2.5, 0.5
    Array([2.666..., 2.333..., 1.   ...], dtype=float32)
    """
    influence = influence_on_params(
        loss,
        params,
        data,
        regularizer=regularizer,
        linear_solver=linear_solver,
        check=check,
        tol=tol,
        solve_rtol=solve_rtol,
        max_steps=max_steps,
    )
    return jax.tree_util.tree_map(lambda p, d: p[None] - d, params, influence)


def jackknife_variance(
    loss: Loss,
    params: PyTree,
    data: PyTree,
    *,
    regularizer: Regularizer = None,
    linear_solver: LinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    solve_rtol: float | None = None,
    max_steps: int | None = None,
) -> PyTree:
    r"""Infinitesimal-jackknife variance of the fitted parameters (the sandwich diagonal).

    .. math::

        \widehat{\mathrm{Var}}_{IJ}(\hat\theta) = \sum_{i=1}^n
        \Big(\frac{\partial\hat\theta}{\partial w_i}\Big)^2
        = \operatorname{diag}\Big(H^{-1} \Big(\sum_i g_i g_i^\top\Big) H^{-1}\Big),

    the diagonal of the sandwich (Huber–White) covariance of an M-estimator with summed
    loss, robust to model misspecification. Uses :func:`influence_on_params`, so never forms
    the ``p × p`` covariance.

    Parameters
    ----------
    loss, params, data, regularizer, linear_solver, check, tol, solve_rtol, max_steps
        As in :func:`influence_on_params`.

    Returns
    -------
    PyTree
        Like ``params``: the estimated variance of each parameter.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2           # Σ(z - z̄)²/n²
    >>> jackknife_variance(loss, jnp.mean(data), data)
    Array(1.555..., dtype=float32)
    """
    influence = influence_on_params(
        loss,
        params,
        data,
        regularizer=regularizer,
        linear_solver=linear_solver,
        check=check,
        tol=tol,
        solve_rtol=solve_rtol,
        max_steps=max_steps,
    )
    return jax.tree_util.tree_map(lambda d: jnp.sum(d**2, axis=0), influence)

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
the influence of an unconverged fit is not the derivative of anything.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin.derivatives import solve_cg_with_info
from dargmin.diagnostics import (
    DargminError,
    DargminWarning,
    NonStationaryPointError,
    SingularSystemError,
    check_optimum,
)
from dargmin.linear_solvers import DENSE_MAX_SIZE

__all__ = [
    "approximate_cv_error",
    "approximate_leave_one_out",
    "infinitesimal_jackknife",
    "influence_on_function",
    "influence_on_params",
    "jackknife_variance",
]

PyTree = Any
Loss = Callable[[PyTree, PyTree], jax.Array]
Regularizer = Callable[[PyTree], jax.Array] | None
LinearSolver = Literal["auto", "cholesky", "lu", "cg"]
CheckMode = Literal["raise", "warn", "ignore"]

# Per-example Hessians are built this many at a time by the dense one-Newton-step ALO, so
# memory stays at batch × p² instead of n × p². The Woodbury path needs only p × rank per
# example and batches more.
_HESSIAN_BATCH = 64
_WOODBURY_BATCH = 1024


# ----------------------------------------------------------------------------- the problem


def _num_examples(data: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError("data must be a pytree with at least one array leaf.")
    sizes = {int(jnp.shape(leaf)[0]) if jnp.ndim(leaf) > 0 else -1 for leaf in leaves}
    if len(sizes) != 1 or -1 in sizes:
        shapes = [jnp.shape(leaf) for leaf in leaves]
        raise ValueError(
            "Every leaf of data must have the same leading (example) axis; got leaves of "
            f"shapes {shapes}."
        )
    n = sizes.pop()
    if n < 1:
        raise ValueError("data holds no examples (leading axis of size 0).")
    return n


def _flat_problem(loss: Loss, regularizer: Regularizer, params: PyTree):
    """Flat views of the problem: ``θ ↦ ℓ(θ, z)`` and ``θ ↦ F(θ, 1)`` on a 1-D ``θ``.

    Working on the raveled parameters lets every solve be a plain matrix / vector one; the
    caller unravels the results back to the structure of ``params``.
    """
    flat, unravel = ravel_pytree(params)

    def example_loss(theta: jax.Array, example: PyTree) -> jax.Array:
        return loss(unravel(theta), example)

    def objective(theta: jax.Array, data: PyTree) -> jax.Array:
        total = jnp.sum(jax.vmap(example_loss, in_axes=(None, 0))(theta, data))
        if regularizer is not None:
            total = total + regularizer(unravel(theta))
        return total

    return flat, unravel, example_loss, objective


# The kernels below are jitted with the user's functions as static arguments, so repeated
# calls with the same ``loss`` (the usual case: a module-level function) reuse the compiled
# code instead of re-tracing, and nothing runs op by op.


@functools.partial(jax.jit, static_argnums=(0, 1))
def _total_objective(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    return _flat_problem(loss, regularizer, params)[3](ravel_pytree(params)[0], data)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _example_gradients(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    flat, _, example_loss, _ = _flat_problem(loss, regularizer, params)
    return jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(flat, data)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _total_hessian(loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree):
    flat, _, _, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)
    # Symmetrize: forward-over-reverse is symmetric only to round-off, and Cholesky reads
    # one triangle.
    return 0.5 * (hessian + hessian.T)


@jax.jit
def _cholesky_solve(hessian: jax.Array, rhs: jax.Array) -> jax.Array:
    """Solve ``H X = B`` for all columns of ``B`` with one Cholesky factorization.

    Non-finite entries in the result mean that ``H`` is not positive definite.
    """
    return jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian, lower=True), rhs)


@jax.jit
def _lu_solve(hessian: jax.Array, rhs: jax.Array) -> jax.Array:
    return jax.scipy.linalg.lu_solve(jax.scipy.linalg.lu_factor(hessian), rhs)


@functools.partial(jax.jit, static_argnums=(0, 1, 5, 6))
def _solve_cg_batch(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    rhs: jax.Array,
    max_steps: int,
    rtol: float,
):
    """Solve ``H x_j = b_j`` for every row ``b_j`` of ``rhs`` by CG, never forming ``H``."""
    flat, _, _, objective = _flat_problem(loss, regularizer, params)

    def hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(lambda t: jax.grad(objective)(t, data), (flat,), (v,))[1]

    def solve_one(b: jax.Array):
        solution = solve_cg_with_info(hvp, b, rtol=rtol, max_steps=max_steps)
        return solution.value, solution.converged

    # vmap batches the right-hand sides through one CG loop: each iteration is one
    # batched Hessian-vector product instead of n separate ones.
    return jax.vmap(solve_one)(rhs)


def _map_examples(fn: Callable[[PyTree], PyTree], data: PyTree, batch_size: int) -> PyTree:
    """``vmap`` of ``fn`` over the examples, in sequential batches when there are many.

    A single ``vmap`` when everything fits one batch: ``lax.map(batch_size=...)`` would
    compile a loop plus a remainder for nothing.
    """
    if _num_examples(data) <= batch_size:
        return jax.vmap(fn)(data)
    return jax.lax.map(fn, data, batch_size=batch_size)


# ----------------------------------------------------------------------------- checks


def _check_stationary(
    loss: Loss,
    regularizer: Regularizer,
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
        lambda theta, d: _total_objective(loss, regularizer, theta, d),
        params,
        data,
        kind="argmin",
        tol=tol,
    )
    error: type[DargminError] | None = None
    if report.verdict == "not_stationary":
        error = NonStationaryPointError
    elif report.verdict in ("singular", "not_minimum"):
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
        raise error(message)
    warnings.warn(message, DargminWarning, stacklevel=3)


def _default_rtol(dtype: Any) -> float:
    # A tenth of sqrt(eps): ~1.5e-9 in float64, ~3e-5 in float32 — CG's residual test is
    # relative, and float32 stalls well before eps.
    return 0.1 * float(jnp.finfo(dtype).eps) ** 0.5


def _resolve_solver(linear_solver: str, size: int) -> str:
    if linear_solver not in ("auto", "cholesky", "lu", "cg"):
        raise ValueError(
            f"linear_solver must be 'auto', 'cholesky', 'lu' or 'cg', got {linear_solver!r}."
        )
    if linear_solver == "auto":
        # Building the Hessian costs p Hessian-vector products and p² memory: worth it (one
        # factorization shared by all n solves) only while p is moderate.
        return "cholesky" if size <= DENSE_MAX_SIZE else "cg"
    return linear_solver


def _solve_hessian(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    rhs: jax.Array,
    *,
    linear_solver: str,
    rtol: float | None,
    max_steps: int | None,
    caller: str,
) -> jax.Array:
    """``H⁻¹ b_j`` for every row ``b_j`` of ``rhs`` (shape ``(m, p)``); returns ``(m, p)``."""
    size = rhs.shape[1]
    method = _resolve_solver(linear_solver, size)
    if method in ("cholesky", "lu"):
        hessian = _total_hessian(loss, regularizer, params, data)
        solution = _cholesky_solve(hessian, rhs.T) if method == "cholesky" else None
        if solution is None or not bool(jnp.all(jnp.isfinite(solution))):
            # Cholesky failed (H not positive definite: a saddle accepted with
            # check="warn"/"ignore"): LU only needs H non-singular. Decided here rather
            # than with lax.cond so that the common case never compiles the LU branch.
            solution = _lu_solve(hessian, rhs.T)
        if not bool(jnp.all(jnp.isfinite(solution))):
            spectrum = np.linalg.eigvalsh(np.asarray(hessian))
            raise SingularSystemError(
                f"dargmin.sensitivity.{caller}: solving with the Hessian gave non-finite "
                f"values: its eigenvalues lie in [{spectrum[0]:.3g}, {spectrum[-1]:.3g}], so "
                "it is singular. Add a regularizer (e.g. a small ridge term)."
            )
        return solution.T
    rtol = float(rtol) if rtol is not None else _default_rtol(rhs.dtype)
    max_steps = max_steps if max_steps is not None else max(10 * size, 100)
    solution, converged = _solve_cg_batch(loss, regularizer, params, data, rhs, max_steps, rtol)
    failed = np.flatnonzero(~np.asarray(converged))
    if failed.size:
        raise SingularSystemError(
            f"dargmin.sensitivity.{caller}: conjugate gradients on the Hessian did not reach "
            f"rtol={rtol:.2g} within max_steps={max_steps} for {failed.size} of "
            f"{converged.shape[0]} right-hand sides (first: {failed[:5].tolist()}): the "
            "Hessian is ill-conditioned or not positive definite. Raise max_steps, add a "
            "regularizer, or use linear_solver='cholesky'."
        )
    return solution


# ----------------------------------------------------------------------------- influence


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
        ``params`` is not a minimizer (the fit has not converged).
    dargmin.SingularSystemError
        The Hessian is singular or not positive definite, or CG did not converge.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> data = jnp.array([0.0, 1.0, 5.0])
    >>> loss = lambda mu, z: 0.5 * (mu - z) ** 2          # the mean is the M-estimator
    >>> influence_on_params(loss, jnp.mean(data), data).tolist()  # (z_i - mean) / n
    [-0.667, -0.333, 1.0]
    """
    _num_examples(data)
    _resolve_solver(linear_solver, 1)  # reject a bad name before the (costly) check
    _check_stationary(
        loss, regularizer, params, data, check=check, tol=tol, caller="influence_on_params"
    )
    gradients = _example_gradients(loss, regularizer, params, data)
    solved = _solve_hessian(
        loss,
        regularizer,
        params,
        data,
        gradients,
        linear_solver=linear_solver,
        rtol=solve_rtol,
        max_steps=max_steps,
        caller="influence_on_params",
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
    n = _num_examples(data)
    _check_stationary(
        loss, regularizer, params, data, check=check, tol=tol, caller="influence_on_function"
    )
    flat, unravel = ravel_pytree(params)
    # One evaluation of fn (cheap next to the solves) gives the output layout to rebuild.
    out_flat, unravel_out = ravel_pytree(fn(params))
    m = out_flat.size

    def flat_fn(theta: jax.Array) -> jax.Array:
        return ravel_pytree(fn(unravel(theta)))[0]

    gradients = _example_gradients(loss, regularizer, params, data)
    solve = functools.partial(
        _solve_hessian,
        loss,
        regularizer,
        params,
        data,
        linear_solver=linear_solver,
        rtol=solve_rtol,
        max_steps=max_steps,
        caller="influence_on_function",
    )
    if m <= n:
        # Reverse: m solves with the rows of the Jacobian of f (H is symmetric, so
        # ∇fₖᵀH⁻¹gᵢ = (H⁻¹∇fₖ)ᵀgᵢ), then an (n × p)(p × m) product.
        jac = jax.jacrev(flat_fn)(flat).reshape(m, flat.size)
        result = -gradients @ solve(jac).T
    else:
        # Forward: the n parameter influences pushed through the Jacobian of f.
        jac = jax.jacfwd(flat_fn)(flat).reshape(m, flat.size)
        result = -solve(gradients) @ jac.T
    return jax.vmap(unravel_out)(result)


# ----------------------------------------------------------------------------- leave-one-out


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


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _newton_dense(
    loss: Loss, regularizer: Regularizer, params: PyTree, data: PyTree, batch_size: int
):
    """``(H - H_i)⁻¹ g_i`` for every ``i`` with per-example dense Hessians."""
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)

    def one(example: PyTree) -> jax.Array:
        g = jax.grad(example_loss)(flat, example)
        h = jax.hessian(example_loss)(flat, example)
        # The leave-i-out Hessian is a general (possibly indefinite when the model is not
        # convex) non-singular matrix: LU does not need positive definiteness.
        return jnp.linalg.solve(hessian - h, g)

    # Batches keep only batch_size per-example Hessians (p² each) alive.
    return _map_examples(one, data, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def _newton_woodbury(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    rank: int,
    batch_size: int,
    key: jax.Array,
):
    """``(H - H_i)⁻¹ g_i`` by Sherman–Morrison–Woodbury from one factorization of ``H``.

    A randomized range finder recovers ``H_i = Q B Qᵀ`` exactly when ``rank(H_i) ≤ rank``
    (``Q`` spans ``H_i Ω`` for a Gaussian ``Ω``; ``B = Qᵀ H_i Q``). Then, with
    ``C = H⁻¹Q`` and ``u = H⁻¹g_i``, the form of Woodbury that tolerates a singular ``B``,

        (H - QBQᵀ)⁻¹ g = u + C (I - B QᵀC)⁻¹ B Qᵀ u,

    costs ``2·rank`` Hessian-vector products of one example and a ``rank × rank`` solve,
    instead of a ``p × p`` factorization per example. Returns the steps and, per example,
    the relative error of the low-rank representation on a fresh probe.
    """
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)
    hessian = jax.hessian(objective)(flat, data)
    factor = jax.scipy.linalg.cho_factor(hessian, lower=True)
    p = flat.size
    probes = jax.random.normal(key, (p, rank + 1), dtype=flat.dtype)

    def one(example: PyTree):
        g = jax.grad(example_loss)(flat, example)

        def example_hvp(v: jax.Array) -> jax.Array:
            return jax.jvp(lambda t: jax.grad(example_loss)(t, example), (flat,), (v,))[1]

        hvps = jax.vmap(example_hvp, in_axes=1, out_axes=1)
        sketch = hvps(probes)  # H_i Ω, plus one probe kept aside to validate the rank
        q, _ = jnp.linalg.qr(sketch[:, :rank])
        b = q.T @ hvps(q)
        b = 0.5 * (b + b.T)
        # Validation: H_i ω for the spare probe must lie in span(Q) with the same action.
        spare = probes[:, rank]
        reconstructed = q @ (b @ (q.T @ spare))
        scale = jnp.linalg.norm(sketch[:, rank]) + jnp.finfo(flat.dtype).tiny
        mismatch = jnp.linalg.norm(sketch[:, rank] - reconstructed) / scale
        u = jax.scipy.linalg.cho_solve(factor, g)
        c = jax.scipy.linalg.cho_solve(factor, q)
        small = jnp.eye(rank, dtype=flat.dtype) - b @ (q.T @ c)
        step = u + c @ jnp.linalg.solve(small, b @ (q.T @ u))
        # An exactly zero H_i (e.g. a hinge-like flat loss) makes the mismatch 0/0-like:
        # scale is then ~tiny and the reconstruction 0, which is exact.
        mismatch = jnp.where(jnp.linalg.norm(sketch[:, rank]) == 0, 0.0, mismatch)
        return step, mismatch

    return _map_examples(one, data, batch_size)


@functools.partial(jax.jit, static_argnums=(0, 1, 4, 5))
def _newton_cg(
    loss: Loss,
    regularizer: Regularizer,
    params: PyTree,
    data: PyTree,
    max_steps: int,
    rtol: float,
):
    """``(H - H_i)⁻¹ g_i`` by CG on ``v ↦ Hv - H_i v``, batched over examples."""
    flat, _, example_loss, objective = _flat_problem(loss, regularizer, params)

    def total_hvp(v: jax.Array) -> jax.Array:
        return jax.jvp(lambda t: jax.grad(objective)(t, data), (flat,), (v,))[1]

    def one(example: PyTree):
        g = jax.grad(example_loss)(flat, example)

        def leave_out_hvp(v: jax.Array) -> jax.Array:
            example_hvp = jax.jvp(lambda t: jax.grad(example_loss)(t, example), (flat,), (v,))
            return total_hvp(v) - example_hvp[1]

        solution = solve_cg_with_info(leave_out_hvp, g, rtol=rtol, max_steps=max_steps)
        return solution.value, solution.converged

    return jax.vmap(one)(data)


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
    common = {
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
    n = _num_examples(data)
    _check_stationary(
        loss, regularizer, params, data, check=check, tol=tol, caller="approximate_leave_one_out"
    )
    flat, unravel = ravel_pytree(params)
    p = flat.size
    caller = "dargmin.sensitivity.approximate_leave_one_out"
    if hessian_rank is not None:
        rank = int(hessian_rank)
        if not 1 <= rank <= p:
            raise ValueError(f"hessian_rank must be in [1, {p}], got {hessian_rank!r}.")
        steps, mismatch = _newton_woodbury(
            loss, regularizer, params, data, rank, _WOODBURY_BATCH, jax.random.key(seed)
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
        steps = _newton_dense(loss, regularizer, params, data, _HESSIAN_BATCH)
    else:
        rtol = float(solve_rtol) if solve_rtol is not None else _default_rtol(flat.dtype)
        steps_cap = max_steps if max_steps is not None else max(10 * p, 100)
        steps, converged = _newton_cg(loss, regularizer, params, data, steps_cap, rtol)
        failed = np.flatnonzero(~np.asarray(converged))
        if failed.size:
            raise SingularSystemError(
                f"{caller}: conjugate gradients on the leave-one-out Hessians H - H_i did not "
                f"converge within {steps_cap} steps for {failed.size} of {n} examples (first: "
                f"{failed[:5].tolist()}); removing those examples may leave a singular "
                "problem. Add a regularizer or raise max_steps."
            )
    bad = np.flatnonzero(~np.all(np.isfinite(np.asarray(steps)), axis=1))
    if bad.size:
        raise SingularSystemError(
            f"{caller}: the leave-one-out Hessian H - H_i is singular for {bad.size} of {n} "
            f"examples (first: {bad[:5].tolist()}): without them the problem has no unique "
            "minimizer. Add a regularizer, or use method='ij'."
        )
    return jax.vmap(lambda s: unravel(flat + s))(steps)


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

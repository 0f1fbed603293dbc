"""Derivative building blocks that JAX does not ship as single functions.

Everything here is a thin, jit-compatible composition of ``jax.jvp``, ``jax.vjp``,
``jax.grad`` and ``lineax``: Hessian-vector and Gauss-Newton-vector products, a Jacobian
that picks forward or reverse mode from the input/output sizes, the double-VJP trick,
Rayleigh quotients and conjugate gradients on pytrees.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree

from dargmin.linear_solvers import two_norm
from dargmin.typing import BoolScalar, IntScalar, Matvec, PyTree, Scalar

__all__ = [
    "CGSolution",
    "gauss_newton_vector_product",
    "hessian_vector_product",
    "jacobian",
    "jvp_from_vjps",
    "rayleigh_quotient",
    "solve_cg",
]

JacobianMode = Literal["auto", "forward", "reverse"]


def hessian_vector_product(f: Callable[..., Scalar], x: PyTree, v: PyTree, *args: PyTree) -> PyTree:
    r"""Hessian-vector product :math:`\nabla^2_x f(x, *args)\, v` by forward-over-reverse.

    Computes :math:`\frac{d}{dt} \nabla_x f(x + t v, *args)\big|_{t=0}` with one ``jax.jvp``
    of ``jax.grad(f)``; the Hessian is never formed, so the cost is a small constant times
    one gradient evaluation.

    Parameters
    ----------
    f
        Scalar-valued function ``f(x, *args)``.
    x
        Point (pytree) at which the Hessian is taken.
    v
        Direction, a pytree with the same structure, shapes and dtypes as ``x``.
    *args
        Extra arguments passed to ``f``; not differentiated.

    Returns
    -------
    PyTree
        :math:`H v`, with the structure of ``x``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> f = lambda x: 0.5 * jnp.sum(x**2 * jnp.arange(1.0, 4.0))
    >>> hessian_vector_product(f, jnp.ones(3), jnp.ones(3))
    Array([1., 2., 3.], dtype=float32)
    """

    def gradient_at(point: PyTree) -> PyTree:
        return jax.grad(f)(point, *args)

    return jax.jvp(gradient_at, (x,), (v,))[1]


def gauss_newton_vector_product(
    f: Callable[[PyTree], PyTree],
    loss: Callable[[PyTree], Scalar],
    w: PyTree,
    v: PyTree,
) -> PyTree:
    r"""Generalized Gauss-Newton product :math:`J^\top H_z J v` for ``loss(f(w))``.

    With model output :math:`z = f(w)`, Jacobian :math:`J = \partial f / \partial w` and loss
    Hessian :math:`H_z = \nabla^2 \ell(z)`, the Gauss-Newton matrix
    :math:`G = J^\top H_z J` drops the term :math:`\sum_i \partial_{z_i}\ell\, \nabla^2 f_i`
    of the full Hessian; it is positive semidefinite whenever :math:`\ell` is convex.
    The product is computed as a JVP of ``f`` (:math:`u = J v`), a Hessian-vector product
    of ``loss`` at ``z`` (:math:`H_z u`) and a VJP of ``f`` (:math:`J^\top H_z u`).

    Parameters
    ----------
    f
        Model ``w -> z`` between pytrees.
    loss
        Scalar-valued loss of the model output ``z``.
    w
        Parameters (pytree) at which :math:`G` is taken.
    v
        Direction with the structure of ``w``.

    Returns
    -------
    PyTree
        :math:`G v`, with the structure of ``w``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = jnp.array([[1.0, 2.0], [0.0, 1.0]])
    >>> f = lambda w: A @ w
    >>> loss = lambda z: 0.5 * jnp.sum(z**2)
    >>> gauss_newton_vector_product(f, loss, jnp.zeros(2), jnp.array([1.0, 0.0]))
    Array([1., 2.], dtype=float32)
    """
    z, jacobian_times_v = jax.jvp(f, (w,), (v,))
    loss_hessian_times_jv = hessian_vector_product(loss, z, jacobian_times_v)
    _, f_vjp = jax.vjp(f, w)
    return f_vjp(loss_hessian_times_jv)[0]


def _pytree_size(tree: PyTree) -> int:
    return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def jacobian(f: Callable[[PyTree], PyTree], x: PyTree, mode: JacobianMode = "auto") -> PyTree:
    r"""Jacobian :math:`\partial f(x) / \partial x` with forward, reverse or automatic mode.

    Forward mode (``jax.jacfwd``) costs one JVP per input entry, reverse mode
    (``jax.jacrev``) one VJP per output entry. ``mode="auto"`` counts entries over all
    leaves and uses forward mode when :math:`\dim(x) \le \dim(f(x))`, reverse otherwise.
    The output shapes are only traced (``jax.eval_shape``), not computed.

    Parameters
    ----------
    f
        Function between pytrees of arrays.
    x
        Point (pytree) at which the Jacobian is taken.
    mode
        ``"forward"``, ``"reverse"`` or ``"auto"``.

    Returns
    -------
    PyTree
        Same layout as ``jax.jacfwd(f)(x)``: the output structure, each leaf replaced by the
        input structure, leaf shapes ``out_leaf.shape + in_leaf.shape``.

    Raises
    ------
    ValueError
        If ``mode`` is not one of the three names.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> jacobian(lambda x: jnp.array([x[0] * x[1], x[0]]), jnp.array([2.0, 3.0]))
    Array([[3., 2.],
           [1., 0.]], dtype=float32)
    """
    if mode == "auto":
        input_size = _pytree_size(x)
        output_size = _pytree_size(jax.eval_shape(f, x))
        mode = "forward" if input_size <= output_size else "reverse"
    if mode == "forward":
        return jax.jacfwd(f)(x)
    if mode == "reverse":
        return jax.jacrev(f)(x)
    raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}.")


def jvp_from_vjps(f: Callable[[PyTree], PyTree], x: PyTree, v: PyTree) -> tuple[PyTree, PyTree]:
    r"""Jacobian-vector product computed with two VJPs (the "double-VJP trick").

    The VJP map :math:`u \mapsto J^\top u` is linear in :math:`u`; its own VJP with
    cotangent :math:`v` is :math:`(J^\top)^\top v = J v`. This gives forward-mode products
    in systems that only provide reverse mode, and is a useful cross-check of ``jax.jvp``.
    The linearization point :math:`u = 0` is arbitrary because the map is linear.

    Parameters
    ----------
    f
        Function between pytrees of floating arrays.
    x
        Primal point.
    v
        Tangent with the structure of ``x``.

    Returns
    -------
    tuple
        ``(f(x), J v)``, like ``jax.jvp(f, (x,), (v,))``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> y, jv = jvp_from_vjps(jnp.sin, jnp.array([0.0, 1.0]), jnp.array([1.0, 1.0]))
    >>> jv
    Array([1.       , 0.5403023], dtype=float32)
    """
    y, f_vjp = jax.vjp(f, x)

    def transpose_jacobian_times(u: PyTree) -> PyTree:
        return f_vjp(u)[0]

    zero_cotangent = jax.tree_util.tree_map(jnp.zeros_like, y)
    _, vjp_of_vjp = jax.vjp(transpose_jacobian_times, zero_cotangent)
    return y, vjp_of_vjp(v)[0]


def rayleigh_quotient(matvec: Matvec, v: PyTree) -> Scalar:
    r"""Rayleigh quotient :math:`\rho(v) = \dfrac{v^\top A v}{v^\top v}`.

    For symmetric :math:`A` it lies in :math:`[\lambda_{\min}, \lambda_{\max}]` and equals
    :math:`\lambda` when :math:`v` is an eigenvector with eigenvalue :math:`\lambda`.
    Pytrees are flattened with ``ravel_pytree`` so the inner products run over all leaves.

    Parameters
    ----------
    matvec
        :math:`v \mapsto A v` on pytrees with the structure of ``v``.
    v
        Nonzero vector (array or pytree).

    Returns
    -------
    jax.Array
        Scalar :math:`\rho(v)`.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = jnp.diag(jnp.array([1.0, 5.0]))
    >>> rayleigh_quotient(lambda v: A @ v, jnp.array([0.0, 2.0]))
    Array(5., dtype=float32)
    """
    flat_v, _ = ravel_pytree(v)
    flat_av, _ = ravel_pytree(matvec(v))
    return jnp.vdot(flat_v, flat_av) / jnp.vdot(flat_v, flat_v)


class CGSolution(NamedTuple):
    """Result of :func:`solve_cg` with ``throw=False``.

    Attributes
    ----------
    value
        Approximate solution :math:`x` of :math:`A x = b` (structure of ``b``).
    converged
        Boolean scalar: whether the residual test was met within ``max_steps``.
    num_steps
        Number of CG iterations performed.
    """

    value: PyTree
    converged: BoolScalar
    num_steps: IntScalar


def _default_rtol(b: PyTree) -> float:
    flat_b, _ = ravel_pytree(b)
    # 1e-10 is reachable in float64 but far below float32 round-off (~1e-7), where CG would
    # stall and report non-convergence; 1e-5 is a few hundred ulps in float32.
    return 1e-10 if jnp.finfo(flat_b.dtype).bits >= 64 else 1e-5


def solve_cg_with_info(
    matvec: Matvec,
    b: PyTree,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    max_steps: int | None = None,
    x0: PyTree | None = None,
) -> CGSolution:
    """Deprecated: use ``solve_cg(..., throw=False)``, which returns the same
    :class:`CGSolution` (one function with lineax's ``throw`` flag instead of two)."""
    warnings.warn(
        "solve_cg_with_info is deprecated and will be removed in dargmin 0.3; use "
        "solve_cg(matvec, b, throw=False), which returns the same CGSolution.",
        DeprecationWarning,
        stacklevel=2,
    )
    return _solve_cg_flagged(matvec, b, rtol=rtol, atol=atol, max_steps=max_steps, x0=x0)


def _solve_cg_flagged(
    matvec: Matvec,
    b: PyTree,
    *,
    rtol: float | None,
    atol: float,
    max_steps: int | None,
    x0: PyTree | None,
) -> CGSolution:
    if rtol is None:
        rtol = _default_rtol(b)
    operator = lx.FunctionLinearOperator(
        matvec,
        jax.eval_shape(lambda: b),
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    solver = lx.CG(rtol=rtol, atol=atol, norm=two_norm, max_steps=max_steps)
    options = None if x0 is None else {"y0": x0}
    solution = lx.linear_solve(operator, b, solver, options=options, throw=False)
    converged = solution.result == lx.RESULTS.successful
    return CGSolution(solution.value, converged, solution.stats["num_steps"])


def solve_cg(
    matvec: Matvec,
    b: PyTree,
    *,
    rtol: float | None = None,
    atol: float = 0.0,
    max_steps: int | None = None,
    x0: PyTree | None = None,
    throw: bool = True,
) -> PyTree | CGSolution:
    r"""Solve :math:`A x = b` for symmetric positive definite :math:`A` given as a matvec.

    Runs ``lineax.CG`` on a ``lineax.FunctionLinearOperator`` tagged symmetric and positive
    semidefinite. CG minimizes :math:`\tfrac12 x^\top A x - b^\top x` over growing Krylov
    spaces and stops when :math:`\|b - A x\|_2 \le \mathrm{atol} +
    \mathrm{rtol}\,\|b\|_2` (:func:`dargmin.linear_solvers.two_norm`, the stopping norm of all
    of dargmin's Krylov solves). Works on pytrees, under ``jax.jit``, and is
    differentiable through ``lineax``'s implicit rules.

    Parameters
    ----------
    matvec
        :math:`x \mapsto A x` on pytrees with the structure of ``b``; must be linear,
        symmetric and positive definite (not checked).
    b
        Right-hand side (array or pytree).
    rtol
        Relative tolerance; ``None`` means ``1e-10`` in float64 and ``1e-5`` in float32.
    atol
        Absolute tolerance.
    max_steps
        Iteration cap; ``None`` lets ``lineax`` use ``10 * dim(b)``.
    x0
        Initial guess (structure of ``b``); zeros when ``None``.
    throw
        ``True`` (default): return the solution and raise if CG did not converge.
        ``False``: return a :class:`CGSolution` ``(value, converged, num_steps)`` instead
        of raising, for loops where non-convergence is handled by the caller.

    Returns
    -------
    PyTree or CGSolution
        The solution :math:`x` (structure of ``b``), or a :class:`CGSolution` with
        ``throw=False``.

    Raises
    ------
    equinox.EquinoxRuntimeError
        With ``throw=True``, when the tolerance is not met within ``max_steps`` (also under
        ``jax.jit``). The message says what to change.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
    >>> x = solve_cg(lambda x: A @ x, jnp.array([1.0, 2.0]))
    >>> bool(jnp.allclose(A @ x, jnp.array([1.0, 2.0]), atol=1e-5))
    True
    >>> bool(solve_cg(lambda x: A @ x, jnp.array([1.0, 2.0]), throw=False).converged)
    True
    """
    solution = _solve_cg_flagged(matvec, b, rtol=rtol, atol=atol, max_steps=max_steps, x0=x0)
    if not throw:
        return solution
    return eqx.error_if(
        solution.value,
        jnp.logical_not(solution.converged),
        "solve_cg: conjugate gradients did not reach the requested tolerance within "
        "max_steps. Increase max_steps, loosen rtol/atol (float32 cannot reach ~1e-7 "
        "relative), check that the operator is symmetric positive definite, or "
        "precondition / regularize it (e.g. add a damping term lambda * x to the matvec).",
    )

"""Implicit differentiation of the solution of a root, argmin or fixed-point problem.

Given a solver ``solve(init, *params) -> x`` whose output satisfies ``g(x, *params) = 0``,
the implicit function theorem gives the derivative of the solution map

.. math::

    \\partial_x g(x^*, \\theta)\\,\\dot x = -\\partial_\\theta g(x^*, \\theta)\\,\\dot\\theta .

The decorators below make any such solver differentiable in ``params``:

* the derivative rule is a ``jax.custom_jvp`` (forward mode); the tangent is obtained by a
  lineax linear solve, which is linear and transposable in its right-hand side, so reverse
  mode (``jax.grad``, ``jax.vjp``, ``jax.jacrev``) comes from JAX transposing the rule;
* the rule calls the decorated solution map again ("re-entry") instead of using a constant
  ``x``, so differentiating the rule differentiates ``x`` as well: Hessians and higher
  derivatives of the solution map are exact (to the accuracy of the solution);
* the solver is run once, on ``stop_gradient``-ed parameters: it need not be differentiable
  (a SciPy solver behind ``jax.pure_callback`` works), and its iterations are never unrolled;
* arrays that ``g`` closes over are hoisted with ``jax.closure_convert`` and differentiated
  too, so ``jax.grad`` with respect to data captured by the optimality function works;
* before a derivative is returned, the solution is checked (see :mod:`dargmin.diagnostics`):
  a point that is not stationary or a singular system raises an error naming the numbers,
  under ``jax.jit`` as well.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from dargmin import diagnostics
from dargmin.linear_solvers import make_linear_solver, needs_spd_tags, needs_symmetric_tag

CheckMode = Literal["raise", "warn", "ignore"]
PyTree = Any


@dataclass(frozen=True)
class ImplicitConfig:
    """Static configuration of an implicitly differentiated solution map.

    Attributes
    ----------
    linear_solver
        Name understood by :func:`dargmin.linear_solvers.make_linear_solver` or a lineax
        solver instance.
    symmetric
        Whether ``∂ₓg`` is symmetric (true for ``argmin``: it is a Hessian).
    positive_definite
        Whether ``∂ₓg`` is expected to be positive definite (true for ``argmin``: at a strict
        minimum the Hessian is positive definite).
    check
        ``"raise"`` (default), ``"warn"`` or ``"ignore"``: what to do when the solution is not
        stationary, the system is singular or the linear solve fails.
    tol
        Largest accepted Newton step ``‖(∂ₓg)⁻¹ g‖ / max(1, ‖x‖)`` at the solution (default
        ``1e-4`` in float64, ``1e-2`` in float32). The Newton step estimates the distance from
        ``x`` to the true root and so the error the IFT inherits.
    max_condition
        Largest accepted estimate of the condition number of ``∂ₓg`` (default ``0.01 / eps``).
    solve_rtol, solve_atol
        Tolerances of iterative linear solvers (defaults ``0.1·sqrt(eps)``, i.e. 1.5e-9 in
        float64, and ``1e-3 · solve_rtol``); Krylov solvers stop on the 2-norm of the
        residual.

    Examples
    --------
    >>> ImplicitConfig.for_argmin(linear_solver="cg").positive_definite
    True
    """

    linear_solver: str | lx.AbstractLinearSolver = "auto"
    symmetric: bool = False
    positive_definite: bool = False
    check: CheckMode = "raise"
    tol: float | None = None
    max_condition: float | None = None
    solve_rtol: float | None = None
    solve_atol: float | None = None
    kind: str = "root"

    def __post_init__(self) -> None:
        if self.check not in ("raise", "warn", "ignore"):
            raise ValueError(f"check must be 'raise', 'warn' or 'ignore', got {self.check!r}.")

    @classmethod
    def for_argmin(cls, **options: Any) -> ImplicitConfig:
        """The configuration :func:`argmin` uses (symmetric positive-definite system), for
        :func:`implicit_solution` with ``g = gradient_optimality(objective)``."""
        return cls(symmetric=True, positive_definite=True, kind="argmin", **options)


def _flat_size(tree: PyTree) -> int:
    return sum(int(jnp.size(leaf)) for leaf in jax.tree_util.tree_leaves(tree))


def _result_dtype(tree: PyTree) -> jnp.dtype:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.result_type(*leaves) if leaves else jnp.dtype(jnp.float32)


def _operator_tags(cfg: ImplicitConfig, solver: lx.AbstractLinearSolver) -> tuple:
    if cfg.symmetric:
        if cfg.positive_definite or needs_spd_tags(solver):
            return (lx.symmetric_tag, lx.positive_semidefinite_tag)
        return (lx.symmetric_tag,)
    if needs_symmetric_tag(solver):
        raise ValueError(
            f"linear_solver={cfg.linear_solver!r} needs a symmetric (for 'cholesky'/'cg': "
            "positive-definite) system, "
            f"but this {cfg.kind} problem has a general Jacobian. Use 'lu', 'gmres' or "
            "'bicgstab', or use dargmin.argmin when the system is a Hessian."
        )
    return ()


def _is_dense(solver: lx.AbstractLinearSolver) -> bool:
    return isinstance(solver, lx.Cholesky | lx.LU | lx.QR | lx.SVD)


def _solver_for(
    x: PyTree, cfg: ImplicitConfig, *, rtol: float | None = None
) -> lx.AbstractLinearSolver:
    eps = float(jnp.finfo(_result_dtype(x)).eps)
    if rtol is None:
        rtol = cfg.solve_rtol if cfg.solve_rtol is not None else 0.1 * eps**0.5
    return make_linear_solver(
        cfg.linear_solver,
        size=_flat_size(x),
        symmetric_positive_definite=cfg.symmetric and cfg.positive_definite,
        rtol=rtol,
        # An absolute floor: batched (vmapped, e.g. jacrev) Krylov solves iterate until every
        # member converges, and a member whose residual sits at rounding level never meets
        # a purely relative test (seen as "max steps reached" with atol = 0).
        atol=cfg.solve_atol if cfg.solve_atol is not None else 1e-3 * rtol,
    )


def _check_solution(
    residual: PyTree,
    x: PyTree,
    solve_flat: Callable[[jax.Array], tuple[jax.Array, jax.Array]],
    matrix: jax.Array | None,
    cfg: ImplicitConfig,
) -> jax.Array:
    """Measure stationarity and conditioning at ``x`` and report through a host callback.

    ``solve_flat(b)`` solves the system for a flat right-hand side and returns the solution
    and a failure flag; ``matrix`` is the dense system matrix when one was built. The host
    callback is what lets the error carry the measured numbers under ``jax.jit`` and
    ``jax.vmap`` (``equinox.error_if`` only takes static text). Returns a zero scalar that
    the caller must make the derivative depend on, so the check is never dead code.
    """
    flat_x, _ = ravel_pytree(x)
    flat_r, _ = ravel_pytree(residual)
    newton_flat, failed = solve_flat(flat_r)
    # A failed (e.g. early-stopped Krylov) solve returns a finite but wrong vector: mark it
    # non-finite so the report names the failure instead of trusting the step.
    newton_flat = jnp.where(failed, jnp.nan, newton_flat)
    if matrix is not None:
        # A fixed pseudo-random probe b: ‖A b‖‖A⁻¹ b‖/‖b‖² is a lower bound of cond(A), so
        # it never raises a false alarm, and bᵀA⁻¹b < 0 proves A is not positive definite.
        probe = jax.random.normal(jax.random.key(0), flat_x.shape, dtype=flat_x.dtype)
        probe_sol, _ = solve_flat(probe)
        condition = jnp.linalg.norm(matrix @ probe) * jnp.linalg.norm(probe_sol) / jnp.sum(probe**2)
        if cfg.positive_definite:
            # A minimum is declared: certify it. The smallest eigenvalue of the (symmetrized)
            # dense Hessian cannot miss a negative direction, unlike a random probe; the
            # dense path is only chosen for a few hundred unknowns, where this is cheap.
            curvature = jnp.linalg.eigvalsh(0.5 * (matrix + matrix.T))[0]
        else:
            curvature = jnp.vdot(probe, probe_sol)
    else:
        condition = jnp.asarray(jnp.nan, flat_x.dtype)
        curvature = jnp.asarray(jnp.nan, flat_x.dtype)
    eps = float(jnp.finfo(flat_x.dtype).eps)
    tol = cfg.tol if cfg.tol is not None else (1e-4 if eps < 1e-10 else 1e-2)
    max_condition = cfg.max_condition if cfg.max_condition is not None else 1e-2 / eps
    measurements = (
        jnp.linalg.norm(flat_r),
        jnp.linalg.norm(flat_x),
        jnp.linalg.norm(newton_flat),
        condition,
        curvature,
    )
    report = functools.partial(
        diagnostics.report_implicit_check,
        kind=cfg.kind,
        mode=cfg.check,
        tol=tol,
        max_condition=max_condition,
        expect_positive_definite=cfg.positive_definite,
        dtype=np.dtype(flat_x.dtype),
    )
    # pure_callback rather than jax.debug.callback: its result is used, so it cannot be
    # dropped, and it carries no ordering effect into the compiled derivative.
    return jax.pure_callback(
        report,
        jax.ShapeDtypeStruct((), flat_x.dtype),
        *measurements,
        vmap_method="expand_dims",
    )


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_solution(g: Callable[..., PyTree], cfg: ImplicitConfig, x_star: PyTree, args: tuple):
    # The primal is the solver's output, unchanged; only the derivative rule is special.
    return x_star


@_implicit_solution.defjvp
def _implicit_solution_jvp(g, cfg, primals, tangents):
    x_star, args = primals
    _, args_dot = tangents
    # Re-entry: under an outer differentiation this ``x`` carries its own (implicit) tangent,
    # which is what makes second and higher derivatives of the solution map exact.
    x = _implicit_solution(g, cfg, x_star, args)
    solver = _solver_for(x, cfg)
    tags = _operator_tags(cfg, solver)
    jacobian_op = lx.JacobianLinearOperator(lambda xx, a: g(xx, *a), x, args, tags=tags)
    unravel = ravel_pytree(x)[1]
    # Dense solvers: build the matrix once (n Jacobian-vector products) and share it between
    # the check and the solve. Matrix-free solvers never build it.
    matrix = jacobian_op.as_matrix() if _is_dense(solver) else None
    if cfg.check != "ignore":
        frozen = jax.lax.stop_gradient  # the check is measured, never differentiated
        # The check only needs the size of the Newton step, to a digit: a Krylov solve to
        # rtol=0.1 costs a few iterations instead of a full solve.
        check_solver = solver if matrix is not None else _solver_for(x, cfg, rtol=0.1)
        if matrix is not None:
            check_op = lx.MatrixLinearOperator(frozen(matrix), tags)
        else:
            check_op = lx.JacobianLinearOperator(
                lambda xx, a: g(xx, *a), frozen(x), frozen(args), tags=tags
            )

        def solve_flat(b):
            vector = b if matrix is not None else unravel(b)
            sol = lx.linear_solve(check_op, vector, check_solver, throw=False)
            return ravel_pytree(sol.value)[0], sol.result != lx.RESULTS.successful

        frozen_matrix = frozen(matrix) if matrix is not None else None
        verified = _check_solution(frozen(g(x, *args)), frozen(x), solve_flat, frozen_matrix, cfg)
        # Scaling by (1 + 0) makes the solve depend on the check, so the check runs (and names
        # the problem) before lineax can fail on a singular matrix.
        if matrix is not None:
            matrix = matrix * (1 + verified)
        else:
            jacobian_op = lx.JacobianLinearOperator(
                lambda xx, a: jax.tree_util.tree_map(lambda l: l * (1 + verified), g(xx, *a)),
                x,
                args,
                tags=tags,
            )
    _, g_dot = jax.jvp(lambda a: g(x, *a), (args,), (args_dot,))
    rhs = jax.tree_util.tree_map(jnp.negative, g_dot)
    if matrix is not None:
        flat_dot = lx.linear_solve(
            lx.MatrixLinearOperator(matrix, tags), ravel_pytree(rhs)[0], solver
        ).value
        x_dot = unravel(flat_dot)
    else:
        x_dot = lx.linear_solve(jacobian_op, rhs, solver).value
    return x, x_dot


def implicit_solution(
    optimality_fn: Callable[..., PyTree],
    x_star: PyTree,
    *params: PyTree,
    config: ImplicitConfig | None = None,
) -> PyTree:
    """Attach implicit derivatives to a solution ``x_star`` of ``optimality_fn(x, *params) = 0``.

    The returned value equals ``x_star``; its derivatives with respect to ``params`` (and to
    any array ``optimality_fn`` closes over) are those of the implicit function theorem:
    ``ẋ = -(∂ₓg)⁻¹ ∂θg θ̇``. Derivatives flowing through ``x_star`` itself are discarded.

    Parameters
    ----------
    optimality_fn
        ``g(x, *params)``, returning a pytree with the structure and shapes of ``x``.
    x_star
        A solution (a root of ``g``), computed by any means.
    *params
        The parameters to differentiate with respect to (pytrees).
    config
        An :class:`ImplicitConfig` (default: general root, dense LU or GMRES by size).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> g = lambda x, a: x**3 - a           # root x* = a^(1/3)
    >>> f = lambda a: implicit_solution(g, jnp.cbrt(a), a)
    >>> float(jax.grad(f)(8.0))             # (1/3) a^(-2/3) = 1/12
    0.0833...
    """
    cfg = config if config is not None else ImplicitConfig()
    x_star = jax.lax.stop_gradient(x_star)
    _validate_shapes(optimality_fn, x_star, params, cfg)
    try:
        return _attach_implicit_derivatives(optimality_fn, cfg, x_star, params)
    except jax.errors.JaxRuntimeError as err:
        # The check raised inside compiled code; give eager callers the typed error back.
        diagnostics.reraise_typed(err)
        raise


# Compiled once per (optimality function, configuration, shapes): without this, eager
# callers (``jax.grad(solve)(theta)`` outside ``jit``) pay lineax's tracing on every call
# (~1 s); inside a user's ``jit`` this inner ``jit`` is simply inlined.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _attach_implicit_derivatives(
    optimality_fn: Callable[..., PyTree], cfg: ImplicitConfig, x_star: PyTree, params: tuple
) -> PyTree:
    # Hoist arrays that g closes over (tracers of an outer transformation) into explicit
    # arguments: jax.custom_jvp cannot differentiate through closed-over tracers otherwise.
    g_converted, hoisted = jax.closure_convert(optimality_fn, x_star, *params)
    n_params = len(params)

    def g_flat(x, *all_args):
        return g_converted(x, *all_args[:n_params], *all_args[n_params:])

    return _implicit_solution(g_flat, cfg, x_star, (*params, *hoisted))


def _validate_shapes(
    optimality_fn: Callable[..., PyTree], x: PyTree, params: tuple, cfg: ImplicitConfig
) -> None:
    try:
        out = jax.eval_shape(optimality_fn, x, *params)
    except TypeError as err:  # wrong arity or non-array outputs
        raise TypeError(
            f"Calling the {cfg.kind} optimality function as fn(x, *params) with "
            f"{len(params)} parameter argument(s) failed: {err}"
        ) from err
    x_struct = jax.tree_util.tree_structure(x)
    x_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(x)]
    out_shapes = [leaf.shape for leaf in jax.tree_util.tree_leaves(out)]
    if jax.tree_util.tree_structure(out) != x_struct or out_shapes != x_shapes:
        raise ValueError(
            f"The {cfg.kind} optimality function must return a pytree with the structure and "
            f"shapes of x (a square system); x has leaves of shapes {x_shapes}, the function "
            f"returned {jax.tree_util.tree_structure(out)} with shapes {out_shapes}."
        )
    if _flat_size(x) == 0:
        raise ValueError(
            f"The {cfg.kind} solution x has no entries (leaves of shapes {x_shapes}): there is "
            "nothing to differentiate. Check the solver's output."
        )
    for leaf in jax.tree_util.tree_leaves(x):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):
            raise TypeError(
                f"The solution x must have floating-point leaves to be differentiated, got "
                f"dtype {jnp.result_type(leaf)}."
            )


def _validate_solver_output(
    solver: Callable[..., PyTree], init: PyTree, x_star: PyTree, cfg: ImplicitConfig
) -> None:
    """A solver that returns another shape than its ``init`` is a bug in the solver, not a
    convergence failure: say so with both shapes instead of reporting a huge residual."""
    if init is None:
        return
    init_struct = jax.tree_util.tree_structure(init)
    x_struct = jax.tree_util.tree_structure(x_star)
    init_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(init)]
    x_shapes = [jnp.shape(leaf) for leaf in jax.tree_util.tree_leaves(x_star)]
    if init_struct != x_struct or init_shapes != x_shapes:
        name = getattr(solver, "__name__", repr(solver))
        raise ValueError(
            f"dargmin.{cfg.kind}: the solver {name!r} returned a solution of shapes "
            f"{x_shapes} ({x_struct}) for an init of shapes {init_shapes} ({init_struct}). "
            "The solution must have the structure and shapes of init (e.g. reshape a (p, 1) "
            "column to (p,))."
        )


def _decorate(optimality_for: Callable[[], Callable[..., PyTree]], cfg: ImplicitConfig):
    def decorator(solver: Callable[..., PyTree]) -> Callable[..., PyTree]:
        optimality_fn = optimality_for()

        @functools.wraps(solver)
        def solve_with_implicit_derivatives(init: PyTree, *params: PyTree) -> PyTree:
            # The solver never sees tracers with tangents: it is not differentiated (its
            # iterations are neither unrolled nor required to be differentiable).
            x_star = solver(init, *jax.lax.stop_gradient(params))
            _validate_solver_output(solver, init, x_star, cfg)
            return implicit_solution(optimality_fn, x_star, *params, config=cfg)

        return solve_with_implicit_derivatives

    return decorator


def root(
    optimality_fn: Callable[..., PyTree],
    *,
    linear_solver: str | lx.AbstractLinearSolver = "auto",
    symmetric: bool = False,
    check: CheckMode = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
    solve_rtol: float | None = None,
    solve_atol: float | None = None,
) -> Callable[[Callable[..., PyTree]], Callable[..., PyTree]]:
    """Decorate a root solver ``solve(init, *params) -> x`` with ``g(x, *params) = 0``.

    The decorated solver is differentiable in ``params`` by the implicit function theorem,

    .. math:: \\dot x = -(\\partial_x g)^{-1}\\,\\partial_\\theta g\\,\\dot\\theta,

    in forward and reverse mode and to any order; ``init`` receives no derivative.

    Parameters
    ----------
    optimality_fn
        ``g(x, *params)``, returning a pytree with the structure of ``x``.
    linear_solver
        ``"auto"`` (dense LU up to 200 unknowns, GMRES beyond), ``"lu"``, ``"gmres"``,
        ``"bicgstab"``, ``"lstsq"``, ``"lsmr"``, ``"qr"``, ``"cholesky"``/``"cg"`` (only with
        ``symmetric=True``) or a lineax solver.
    symmetric
        Declare ``∂ₓg`` symmetric.
    check
        ``"raise"``, ``"warn"`` or ``"ignore"`` when the solution is not a root or the system
        is singular (see :class:`ImplicitConfig`).
    tol, max_condition, solve_rtol, solve_atol
        See :class:`ImplicitConfig`.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> @root(lambda x, a: x**2 - a)
    ... def sqrt_solver(init, a):
    ...     return jnp.sqrt(a)
    >>> float(jax.grad(sqrt_solver, argnums=1)(1.0, 4.0))   # 1 / (2 sqrt(4))
    0.25
    """
    cfg = ImplicitConfig(
        linear_solver=linear_solver,
        symmetric=symmetric,
        check=check,
        tol=tol,
        max_condition=max_condition,
        solve_rtol=solve_rtol,
        solve_atol=solve_atol,
        kind="root",
    )
    return _decorate(lambda: optimality_fn, cfg)


def argmin(
    objective: Callable[..., jax.Array],
    *,
    linear_solver: str | lx.AbstractLinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
    solve_rtol: float | None = None,
    solve_atol: float | None = None,
) -> Callable[[Callable[..., PyTree]], Callable[..., PyTree]]:
    """Decorate a minimizer ``solve(init, *params) -> x ≈ argmin_x objective(x, *params)``.

    The optimality condition is ``∇ₓ f(x, θ) = 0`` and the system matrix is the Hessian
    ``∇²ₓₓ f``, symmetric and, at a strict minimum, positive definite:

    .. math:: \\dot x = -\\big(\\nabla^2_{xx} f\\big)^{-1} \\nabla^2_{x\\theta} f\\,\\dot\\theta .

    The default solver is a dense Cholesky factorization up to 200 unknowns and matrix-free
    conjugate gradients (Hessian-vector products, never the matrix) beyond. A point where the
    Hessian is not positive definite is reported (not a minimum).

    Parameters
    ----------
    objective
        ``f(x, *params)`` returning a scalar.
    linear_solver, check, tol, max_condition, solve_rtol, solve_atol
        As in :func:`root`; ``"lu"``/``"gmres"`` accept saddle points.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> f = lambda x, lam: 0.5 * jnp.sum((x - 1.0) ** 2) + 0.5 * lam * jnp.sum(x**2)
    >>> @argmin(f)
    ... def ridge_solver(init, lam):
    ...     return jnp.ones(3) / (1.0 + lam)         # closed-form minimizer
    >>> round(float(jax.grad(lambda l: ridge_solver(None, l).sum())(1.0)), 6)  # -3/(1+l)^2
    -0.75
    """
    cfg = ImplicitConfig(
        linear_solver=linear_solver,
        symmetric=True,
        positive_definite=True,
        check=check,
        tol=tol,
        max_condition=max_condition,
        solve_rtol=solve_rtol,
        solve_atol=solve_atol,
        kind="argmin",
    )
    return _decorate(lambda: gradient_optimality(objective), cfg)


def fixed_point(
    fixed_point_fn: Callable[..., PyTree],
    *,
    linear_solver: str | lx.AbstractLinearSolver = "auto",
    check: CheckMode = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
    solve_rtol: float | None = None,
    solve_atol: float | None = None,
) -> Callable[[Callable[..., PyTree]], Callable[..., PyTree]]:
    """Decorate a solver of ``x = T(x, *params)`` (optimality ``T(x, θ) - x = 0``).

    This is how proximal and projected solvers of non-smooth problems are differentiated:
    with ``T(x, θ) = prox_{τ h}(x - τ∇f(x, θ))`` the derivative ``(I - ∂ₓT)⁻¹ ∂θT`` is the
    Jacobian of the solution restricted to where the prox is differentiable (for the Lasso,
    the support).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> T = lambda x, a: 0.5 * (x + a / x)          # Babylonian iteration for sqrt(a)
    >>> @fixed_point(T)
    ... def babylonian(init, a):
    ...     return jax.lax.fori_loop(0, 30, lambda i, x: T(x, a), init)
    >>> round(float(jax.grad(babylonian, argnums=1)(1.0, 9.0)), 6)   # 1/(2*3)
    0.166667
    """
    cfg = ImplicitConfig(
        linear_solver=linear_solver,
        check=check,
        tol=tol,
        max_condition=max_condition,
        solve_rtol=solve_rtol,
        solve_atol=solve_atol,
        kind="fixed_point",
    )

    def residual(x, *params):
        return jax.tree_util.tree_map(jnp.subtract, fixed_point_fn(x, *params), x)

    return _decorate(lambda: residual, cfg)


def gradient_optimality(objective: Callable[..., jax.Array]) -> Callable[..., PyTree]:
    """The optimality function ``g(x, *params) = ∇ₓ objective(x, *params)`` of an argmin.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> g = gradient_optimality(lambda x, a: jnp.sum((x - a) ** 2))
    >>> g(jnp.zeros(2), jnp.ones(2)).tolist()
    [-2.0, -2.0]
    """

    def optimality(x: PyTree, *params: PyTree) -> PyTree:
        return jax.grad(objective)(x, *params)

    return optimality

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
import inspect
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import lineax as lx
from jax.flatten_util import ravel_pytree

from dargmin import diagnostics
from dargmin.diagnostics import Check, CheckMode
from dargmin.implicit_inputs import flat_size, validate_shapes, validate_solver_output
from dargmin.linear_solvers import (
    Auto,
    LinearSolver,
    as_linear_solver,
    factorize,
    full_float32_products,
    operator_tags,
    stop_gradient_arrays,
    with_tolerances,
)

PyTree = Any


@dataclass(frozen=True)
class ImplicitConfig:
    """Static configuration of an implicitly differentiated solution map.

    Attributes
    ----------
    linear_solver
        A strategy from :mod:`dargmin.linear_solvers` (``Cholesky()``, ``CG(rtol=1e-10)``,
        ``Auto(dense_max_size=500)``, ...), its registry name (``"auto"``, ``"cg"``, ...)
        or a lineax solver instance.
    symmetric
        Whether ``∂ₓg`` is symmetric (true for ``argmin``: it is a Hessian).
    positive_definite
        Whether ``∂ₓg`` must be positive definite (true for ``argmin``: at a strict minimum
        the Hessian is positive definite). Declared, never inferred from the solver: the
        check certifies it (see :func:`dargmin.diagnostics.measure`).
    check
        A :class:`dargmin.diagnostics.Check` (mode, tolerance, largest condition number).
    kind
        ``"root"``, ``"argmin"`` or ``"fixed_point"``: names the problem in messages.

    Examples
    --------
    >>> ImplicitConfig.for_argmin(linear_solver="cg").positive_definite
    True
    """

    linear_solver: LinearSolver = field(default_factory=Auto)
    symmetric: bool = False
    positive_definite: bool = False
    check: diagnostics.Check = field(default_factory=diagnostics.Check)
    kind: str = "root"

    def __post_init__(self) -> None:
        object.__setattr__(self, "linear_solver", as_linear_solver(self.linear_solver))
        if not isinstance(self.check, diagnostics.Check):
            object.__setattr__(self, "check", diagnostics.Check.of(self.check))
        # Refuse a strategy whose needs the system lacks now, not at the first derivative.
        operator_tags(
            self.linear_solver,
            symmetric=self.symmetric,
            positive_definite=self.positive_definite,
            problem=f"{self.kind} problem",
        )

    @classmethod
    def for_argmin(cls, **options: Any) -> ImplicitConfig:
        """The configuration :func:`argmin` uses (symmetric positive-definite system), for
        :func:`implicit_solution` with ``g = gradient_optimality(objective)``."""
        return cls(symmetric=True, positive_definite=True, kind="argmin", **options)


def _result_dtype(tree: PyTree) -> jnp.dtype:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.result_type(*leaves) if leaves else jnp.dtype(jnp.float32)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_solution(g: Callable[..., PyTree], cfg: ImplicitConfig, x_star: PyTree, args: tuple):
    # The primal is the solver's output, unchanged; only the derivative rule is special.
    return x_star


@_implicit_solution.defjvp
def _implicit_solution_jvp(g, cfg, primals, tangents):
    # Full float32 products in the derivative (the solver is the user's; TF32 on GPUs).
    with full_float32_products():
        return _implicit_tangent(g, cfg, primals, tangents)


def _implicit_tangent(g, cfg, primals, tangents):
    x_star, args = primals
    _, args_dot = tangents
    # Re-entry: under an outer differentiation this ``x`` carries its own (implicit) tangent,
    # which is what makes second and higher derivatives of the solution map exact.
    x = _implicit_solution(g, cfg, x_star, args)
    size = flat_size(x)
    strategy = cfg.linear_solver.resolve(
        size, symmetric=cfg.symmetric, positive_definite=cfg.positive_definite
    )
    tags = operator_tags(strategy, symmetric=cfg.symmetric, positive_definite=cfg.positive_definite)
    operator = lx.JacobianLinearOperator(lambda xx, a: g(xx, *a), x, args, tags=tags)
    if strategy.dense:
        # Build the matrix once (n Jacobian-vector products) and factorize it once: the
        # check's Newton step, its condition estimate and the derivative solves (one per
        # tangent, or per cotangent in reverse mode) all reuse the factors.
        operator = lx.MatrixLinearOperator(operator.as_matrix(), tags)
    failure_mode = "warn" if cfg.check.mode == "warn" else "raise"
    system = factorize(
        operator,
        strategy,
        context=cfg.kind,
        mode=failure_mode,
        max_condition=cfg.check.tolerances(_result_dtype(x))[1],
    )
    rhs = jax.tree_util.tree_map(jnp.negative, jax.jvp(lambda a: g(x, *a), (args,), (args_dot,))[1])
    if strategy.dense:
        rhs = ravel_pytree(rhs)[0]
    if cfg.check.mode != "ignore":
        frozen = jax.lax.stop_gradient  # the check is measured, never differentiated
        frozen_x = frozen(x)
        frozen_system = stop_gradient_arrays(system)
        newton_system = diagnostics.newton_system_for(frozen_system, strategy)
        measurements = diagnostics.measure(
            frozen(g(x, *args)),
            frozen_x,
            frozen_system,
            strategy,
            positive_definite=cfg.positive_definite,
            newton_system=newton_system,
        )
        verified = diagnostics.report(
            measurements,
            cfg.check,
            kind=cfg.kind,
            positive_definite=cfg.positive_definite,
            dtype=_result_dtype(x),
        )
        # Scaling the right-hand side by (1 + 0) makes the solve depend on the check, so the
        # check runs (and names the problem) before the solve can fail on a singular matrix.
        # In a multi-device process a refusal returns NaN instead of raising (see
        # dargmin.errors.multi_device): the derivative becomes NaN. The NaN enters on this
        # side of the solve because lineax raises on a non-finite cotangent of a transposed
        # solve (on one device only, which would stall the others), not on a forward one.
        rhs = jax.tree_util.tree_map(lambda leaf: leaf * (1 + verified).astype(leaf.dtype), rhs)
    x_dot = system.solve(rhs)
    if strategy.dense:
        x_dot = ravel_pytree(x)[1](x_dot)
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
    validate_shapes(optimality_fn, x_star, params, cfg.kind)
    try:
        return _attach_implicit_derivatives(optimality_fn, cfg, x_star, params)
    except (jax.errors.JaxRuntimeError, ValueError) as err:
        # The check raised inside compiled code: JAX wraps it (a JaxRuntimeError on the first
        # call, a ValueError from the cached fast path); give eager callers the typed error
        # back. Anything that is not a dargmin refusal propagates unchanged.
        if not isinstance(err, diagnostics.DargminError):
            diagnostics.reraise_typed(err)
        raise


class _WeakCallable:
    """Call a function through a weak reference.

    The compiled derivative rules below are cached per optimality function. JAX's caches
    (``jax.jit``'s, ``jax.closure_convert``'s) hold the functions they see strongly and
    forever; handing them this wrapper instead means that a solver the user drops — with
    its objective, the data it closes over and its compiled code — can be freed. (Keyed on
    the function itself, each decorated solver kept ~7 MB alive for the process's life.)
    """

    __slots__ = ("__weakref__", "_ref")

    def __init__(self, fn: Callable[..., PyTree]) -> None:
        self._ref = weakref.WeakMethod(fn) if inspect.ismethod(fn) else weakref.ref(fn)

    def __call__(self, *args: Any) -> PyTree:
        fn = self._ref()
        if fn is None:  # only reachable if JAX re-traces after the user dropped the function
            raise RuntimeError("dargmin: the optimality function was garbage-collected.")
        return fn(*args)


# One compiled rule per live optimality function (per bound method: per instance and
# method), released with it. Without compilation, eager callers (``jax.grad(solve)(θ)``
# outside ``jit``) pay lineax's tracing on every call (~1 s); inside a user's ``jit`` the
# inner ``jit`` is simply inlined.
_RULES: weakref.WeakKeyDictionary[Any, dict[Any, Callable[..., PyTree]]] = (
    weakref.WeakKeyDictionary()
)


def _attach_implicit_derivatives(
    optimality_fn: Callable[..., PyTree], cfg: ImplicitConfig, x_star: PyTree, params: tuple
) -> PyTree:
    owner, key = (
        (optimality_fn.__self__, optimality_fn.__func__)
        if inspect.ismethod(optimality_fn)
        else (optimality_fn, None)
    )
    try:
        rules = _RULES.setdefault(owner, {})
    except TypeError:  # not weak-referenceable: cache on identity, kept for the process
        return _attach_static(optimality_fn, cfg, x_star, params)
    rule = rules.get(key)
    if rule is None:
        rule = jax.jit(functools.partial(_attach, _WeakCallable(optimality_fn)), static_argnums=0)
        rules[key] = rule
    return rule(cfg, x_star, params)


def _attach(
    optimality_fn: Callable[..., PyTree], cfg: ImplicitConfig, x_star: PyTree, params: tuple
) -> PyTree:
    # Hoist arrays that g closes over (tracers of an outer transformation) into explicit
    # arguments: jax.custom_jvp cannot differentiate through closed-over tracers otherwise.
    # Traced here, so at full float32 precision too: the converted function keeps the
    # precision of its products from this trace.
    with full_float32_products():
        g_converted, hoisted = jax.closure_convert(optimality_fn, x_star, *params)
    n_params = len(params)

    def g_flat(x, *all_args):
        return g_converted(x, *all_args[:n_params], *all_args[n_params:])

    return _implicit_solution(g_flat, cfg, x_star, (*params, *hoisted))


_attach_static = jax.jit(_attach, static_argnums=(0, 1))


def _config(
    kind: str,
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver,
    *,
    symmetric: bool,
    positive_definite: bool,
    check: CheckMode | Check,
    tol: float | None,
    max_condition: float | None,
    solve_rtol: float | None,
    solve_atol: float | None,
) -> ImplicitConfig:
    strategy = as_linear_solver(linear_solver)
    if solve_rtol is not None or solve_atol is not None:
        warnings.warn(
            "solve_rtol/solve_atol are deprecated and will be removed in dargmin 0.3: give "
            "the tolerances to the strategy, e.g. linear_solver=dargmin.linear_solvers."
            "CG(rtol=1e-10, atol=1e-14) or Auto(rtol=...).",
            DeprecationWarning,
            stacklevel=3,
        )
        strategy = with_tolerances(strategy, rtol=solve_rtol, atol=solve_atol)
    return ImplicitConfig(
        linear_solver=strategy,
        symmetric=symmetric,
        positive_definite=positive_definite,
        check=Check.of(check, tol=tol, max_condition=max_condition),
        kind=kind,
    )


def _decorate(optimality_for: Callable[[], Callable[..., PyTree]], cfg: ImplicitConfig):
    def decorator(solver: Callable[..., PyTree]) -> Callable[..., PyTree]:
        optimality_fn = optimality_for()

        @functools.wraps(solver)
        def solve_with_implicit_derivatives(init: PyTree, *params: PyTree) -> PyTree:
            # The solver never sees tracers with tangents: it is not differentiated (its
            # iterations are neither unrolled nor required to be differentiable).
            x_star = solver(init, *jax.lax.stop_gradient(params))
            validate_solver_output(solver, init, x_star, cfg.kind)
            return implicit_solution(optimality_fn, x_star, *params, config=cfg)

        return solve_with_implicit_derivatives

    return decorator


def root(
    optimality_fn: Callable[..., PyTree],
    *,
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "auto",
    symmetric: bool = False,
    check: CheckMode | Check = "raise",
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
    cfg = _config(
        "root",
        linear_solver,
        symmetric=symmetric,
        positive_definite=False,
        check=check,
        tol=tol,
        max_condition=max_condition,
        solve_rtol=solve_rtol,
        solve_atol=solve_atol,
    )
    return _decorate(lambda: optimality_fn, cfg)


def argmin(
    objective: Callable[..., jax.Array],
    *,
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "auto",
    check: CheckMode | Check = "raise",
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
    cfg = _config(
        "argmin",
        linear_solver,
        symmetric=True,
        positive_definite=True,
        check=check,
        tol=tol,
        max_condition=max_condition,
        solve_rtol=solve_rtol,
        solve_atol=solve_atol,
    )
    return _decorate(lambda: gradient_optimality(objective), cfg)


def fixed_point(
    fixed_point_fn: Callable[..., PyTree],
    *,
    linear_solver: str | LinearSolver | lx.AbstractLinearSolver = "auto",
    check: CheckMode | Check = "raise",
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
    cfg = _config(
        "fixed_point",
        linear_solver,
        symmetric=False,
        positive_definite=False,
        check=check,
        tol=tol,
        max_condition=max_condition,
        solve_rtol=solve_rtol,
        solve_atol=solve_atol,
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

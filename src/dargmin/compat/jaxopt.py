r"""JAXopt's ``implicit_diff`` API, backed by dargmin: migrate by changing one import line.

.. code-block:: python

    # from jaxopt.implicit_diff import custom_root
    from dargmin.compat.jaxopt import custom_root

:func:`custom_root`, :func:`custom_fixed_point`, :func:`root_vjp` and :func:`root_jvp`
take JAXopt's arguments, in JAXopt's order, with JAXopt's meaning:

* the decorated solver is ``solver_fun(init_params, *args, **kwargs)``; the optimality
  function ``optimality_fun(params, *args, **kwargs)`` is zero at the solution (for
  ``custom_fixed_point``, ``fixed_point_fun(params, *args, **kwargs) == params``);
* arguments passed by keyword are matched to the optimality function through
  ``reference_signature`` (default: the optimality function's own signature);
* ``has_aux=True``: the solver returns ``(sol, aux, ...)`` (a tuple, a list or a named
  tuple such as JAXopt's ``OptStep``); only ``sol`` is differentiated, ``aux`` is
  returned unchanged and carries no derivative;
* ``init_params`` receives no derivative (zero);
* ``solve=`` takes a JAXopt linear solver ``solve(matvec, b) -> x`` (``jaxopt.linear_solve.
  solve_cg``, ``solve_normal_cg``, ``solve_gmres``, your own function) or any dargmin
  linear solver (``"lu"``, ``"cg"``, ``dargmin.linear_solvers.GMRES(rtol=1e-10)``, a
  lineax solver). ``None`` (the default) is dargmin's ``"auto"``: a dense LU factorization
  up to 200 unknowns, GMRES beyond. (JAXopt's default is CG on the normal equations; the
  derivative is the same, the solver only changes how it is computed.)

What changes, by design:

* **Forward mode and higher orders.** JAXopt attaches a ``jax.custom_vjp``: ``jax.jvp``,
  ``jax.jacfwd`` and ``jax.hessian`` of a decorated solver raise. Here the rule is dargmin's
  ``jax.custom_jvp`` (:func:`dargmin.implicit_solution`), which re-enters the solution map:
  forward mode, reverse mode and Hessians are exact.
* **Checks.** Before a derivative is returned, the solution is checked (see
  :mod:`dargmin.diagnostics`): a ``sol`` that is not a root (a solver stopped early), a
  singular Jacobian, a linear solve that failed, raise a
  :class:`~dargmin.errors.DargminError` naming the numbers, in eager mode and under
  ``jax.jit``, where JAXopt returns a wrong derivative silently. ``check="warn"`` or
  ``"ignore"``, ``tol=`` and ``max_condition=`` (keyword-only, after JAXopt's arguments)
  relax it.
* **More arguments resolve.** Keyword-only parameters and catch-all ``**kwargs`` of the
  optimality function, which JAXopt refuses with a ``TypeError``, are passed by keyword.
  Arrays the optimality function closes over are differentiated too.

Examples
--------
>>> import jax, jax.numpy as jnp
>>> def objective(w, lam, X, y):
...     return 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)
>>> @custom_root(jax.grad(objective))
... def ridge(init_params, lam, X, y):
...     return jnp.linalg.solve(X.T @ X + lam * jnp.eye(X.shape[1]), X.T @ y)
>>> X, y = jnp.eye(3), jnp.array([1.0, 2.0, 3.0])
>>> [round(float(v), 4) for v in jax.jacfwd(ridge, argnums=1)(None, 1.0, X, y)]  # -y/4
[-0.25, -0.5, -0.75]
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeAlias

import jax
import lineax as lx

from dargmin.diagnostics import Check, CheckMode
from dargmin.implicit import ImplicitConfig, implicit_solution
from dargmin.linear_solvers import LinearSolver, as_linear_solver
from dargmin.typing import PyTree

__all__ = [
    "MatvecSolve",
    "custom_fixed_point",
    "custom_root",
    "root_jvp",
    "root_vjp",
]

#: A JAXopt-style linear solver: ``solve(matvec, b) -> x`` with ``matvec(x) = A x``.
SolveFn: TypeAlias = Callable[[Callable[[Any], Any], Any], Any]
#: What ``solve=`` accepts: a ``SolveFn``, a dargmin linear solver, or ``None`` (``"auto"``).
SolveSpec: TypeAlias = SolveFn | str | LinearSolver | lx.AbstractLinearSolver | None


class _MatvecLineaxSolver(lx.AbstractLinearSolver):
    """A ``solve(matvec, b)`` function run as a lineax solver.

    lineax then differentiates and transposes the solve: reverse mode calls ``solve`` with
    the transposed operator's ``matvec`` (exactly what JAXopt's ``root_vjp`` passes it), and
    dargmin's :class:`~dargmin.linear_solvers.CheckedSolver` measures the residual of each
    result, so a ``solve`` that returns a wrong vector is reported, not passed on.
    """

    solve: Callable[..., PyTree]

    def init(self, operator: lx.AbstractLinearOperator, options: dict[str, Any]) -> Any:
        del options
        if operator.in_size() != operator.out_size():
            raise ValueError(
                "dargmin.compat.jaxopt: solve(matvec, b) needs a square system; got "
                f"{operator.out_size()} equations in {operator.in_size()} unknowns."
            )
        # Linearise once: every solve (forward, transposed, batched) reuses the linear map.
        return lx.linearise(operator)

    def compute(
        self, state: Any, vector: PyTree, options: dict[str, Any]
    ) -> tuple[PyTree, lx.RESULTS, dict[str, Any]]:
        del options
        return self.solve(state.mv, vector), lx.RESULTS.successful, {}

    def transpose(self, state: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return state.transpose(), options

    def conj(self, state: Any, options: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return lx.conj(state), options

    def assume_full_rank(self) -> bool:
        return True


class MatvecSolve(LinearSolver):
    """A JAXopt-style linear solver ``solve(matvec, b) -> x`` as a dargmin strategy.

    Matrix-free (only ``matvec`` is given to ``solve``), for general square systems. Every
    result is checked by its residual ``‖A x − b‖`` (a relative residual above 1 % is
    refused as a failed solve).

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> strategy = MatvecSolve(lambda matvec, b: b / 2.0)   # the solve of 2 I x = b
    >>> strategy.dense, strategy.needs
    (False, 'general')
    """

    solve: Callable[..., PyTree]

    def lineax_solver(self, size: int, dtype: Any) -> lx.AbstractLinearSolver:
        return _MatvecLineaxSolver(self.solve)

    @property
    def name(self) -> str:
        return f"solve={getattr(self.solve, '__name__', repr(self.solve))}"


def _strategy(solve: SolveSpec) -> LinearSolver:
    """The dargmin strategy for JAXopt's ``solve=`` (a function, or a dargmin solver)."""
    if solve is None:
        return as_linear_solver("auto")
    if isinstance(solve, str | LinearSolver | lx.AbstractLinearSolver):
        return as_linear_solver(solve)
    if callable(solve):
        return MatvecSolve(solve)
    raise TypeError(
        f"solve={solve!r} is neither a function solve(matvec, b) -> x nor a dargmin linear "
        "solver (a name such as 'lu' or 'cg', a dargmin.linear_solvers strategy, a lineax "
        "solver)."
    )


def _config(
    solve: SolveSpec,
    kind: str,
    *,
    symmetric: bool,
    check: CheckMode | Check,
    tol: float | None,
    max_condition: float | None,
) -> ImplicitConfig:
    return ImplicitConfig(
        linear_solver=_strategy(solve),
        symmetric=symmetric,
        check=Check.of(check, tol=tol, max_condition=max_condition),
        kind=kind,
    )


def _signature_of(reference: Any, default: Callable[..., Any]) -> inspect.Signature:
    """JAXopt's ``reference_signature``: a signature, a function (or an object with a
    ``subfun``, as JAXopt's composite functions), or ``None`` for ``default``'s."""
    if reference is None:
        return inspect.signature(default)
    if isinstance(reference, inspect.Signature):
        return reference
    return inspect.signature(getattr(reference, "subfun", reference))


def _with_solution(out: Any, sol: PyTree) -> Any:
    """``out`` (the solver's ``(sol, aux, ...)``) with its first entry replaced by ``sol``,
    keeping the container type (tuple, list, named tuple such as JAXopt's ``OptStep``)."""
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(sol, *out[1:])
    return type(out)([sol, *out[1:]])


def _split_aux(out: Any) -> PyTree:
    """The solution in a ``has_aux`` solver's output (its first entry)."""
    if not isinstance(out, tuple | list) or len(out) == 0:
        raise TypeError(
            "has_aux=True: the solver must return a tuple or list (sol, aux, ...); it "
            f"returned a {type(out).__name__}."
        )
    return out[0]


def _implicit_solver(
    solver_fun: Callable[..., Any],
    optimality_fun: Callable[..., PyTree],
    cfg: ImplicitConfig,
    has_aux: bool,
    reference: inspect.Signature,
) -> Callable[..., Any]:
    solver_signature = inspect.signature(solver_fun)

    # One function per decorated solver: dargmin caches the compiled derivative rule per
    # optimality function, so it must not be rebuilt on every call.
    def optimality(x: PyTree, args: tuple, kwargs: dict[str, Any]) -> PyTree:
        return optimality_fun(x, *args, **kwargs)

    @functools.wraps(solver_fun)
    def solver_with_implicit_derivatives(*args: Any, **kwargs: Any) -> Any:
        bound = solver_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        args, kwargs = bound.args, bound.kwargs
        # The solver runs on stopped arguments: it is never differentiated (it may hold a
        # while_loop or a host callback), its derivative is the implicit one.
        out = solver_fun(*jax.lax.stop_gradient(args), **jax.lax.stop_gradient(kwargs))
        sol = _split_aux(out) if has_aux else out
        try:
            ref = reference.bind(*args, **kwargs)
        except TypeError as err:
            raise TypeError(
                f"dargmin.compat.jaxopt: the solver's arguments do not fit the reference "
                f"signature {reference} (by default the optimality function's): {err}. The "
                "solver and the optimality function must take the same arguments, or pass "
                "reference_signature=."
            ) from err
        if not ref.args:
            raise TypeError(
                f"dargmin.compat.jaxopt: the reference signature {reference} has no "
                "positional first parameter for the solution (params, *args, **kwargs)."
            )
        sol = implicit_solution(optimality, sol, tuple(ref.args[1:]), dict(ref.kwargs), config=cfg)
        return _with_solution(out, sol) if has_aux else sol

    return solver_with_implicit_derivatives


def custom_root(
    optimality_fun: Callable[..., PyTree],
    has_aux: bool = False,
    solve: SolveSpec = None,
    reference_signature: Any = None,
    *,
    symmetric: bool = False,
    check: CheckMode | Check = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorator adding implicit differentiation to a root solver (JAXopt's ``custom_root``).

    ``solver_fun(init_params, *args, **kwargs)`` returns ``sol`` (or ``(sol, aux)`` with
    ``has_aux=True``) with ``optimality_fun(sol, *args, **kwargs) = 0``. The decorated
    solver's derivative in ``args``/``kwargs`` is

    .. math:: \dot{\mathrm{sol}} = -(\partial_x F)^{-1}\,\partial_\theta F\,\dot\theta ,

    in forward and reverse mode, to any order (JAXopt: reverse mode only).

    Parameters
    ----------
    optimality_fun
        ``F(params, *args, **kwargs)``, zero at the solution, returning a pytree shaped
        like ``params``.
    has_aux
        Whether the solver returns ``(sol, aux, ...)``; ``aux`` gets no derivative.
    solve
        ``solve(matvec, b) -> x`` (JAXopt style), a dargmin linear solver, or ``None``
        (``"auto"``: dense LU up to 200 unknowns, GMRES beyond).
    reference_signature
        A function (or ``inspect.Signature``) whose signature maps the solver's keyword
        arguments to the optimality function's; default: ``optimality_fun``'s.
    symmetric
        Declare ``∂ₓF`` symmetric (e.g. ``F`` a gradient), enabling ``"cg"``/``"minres"``.
    check, tol, max_condition
        dargmin's check of the solution before a derivative (see
        :class:`dargmin.diagnostics.Check`); ``check="raise"`` by default.

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> @custom_root(lambda x, a: x**2 - a)
    ... def sqrt(init_params, a):
    ...     return jnp.sqrt(a)
    >>> float(jax.grad(sqrt, argnums=1)(None, 4.0))     # 1 / (2 √4)
    0.25
    >>> float(jax.hessian(sqrt, argnums=1)(None, 4.0))  # -a^(-3/2) / 4; JAXopt cannot
    -0.03125
    """
    cfg = _config(
        solve, "root", symmetric=symmetric, check=check, tol=tol, max_condition=max_condition
    )
    reference = _signature_of(reference_signature, optimality_fun)

    def wrapper(solver_fun: Callable[..., Any]) -> Callable[..., Any]:
        return _implicit_solver(solver_fun, optimality_fun, cfg, has_aux, reference)

    return wrapper


def custom_fixed_point(
    fixed_point_fun: Callable[..., PyTree],
    has_aux: bool = False,
    solve: SolveSpec = None,
    reference_signature: Any = None,
    *,
    check: CheckMode | Check = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    r"""Decorator adding implicit differentiation to a fixed-point solver (JAXopt's
    ``custom_fixed_point``).

    ``solver_fun(init_params, *args, **kwargs)`` returns ``sol`` with
    ``fixed_point_fun(sol, *args, **kwargs) = sol``; the optimality function is
    ``T(x, θ) - x`` and the derivative ``(I - ∂ₓT)^{-1} ∂θT θ̇``. Arguments as in
    :func:`custom_root` (``reference_signature`` defaults to ``fixed_point_fun``'s).

    Examples
    --------
    >>> import jax, jax.numpy as jnp
    >>> T = lambda x, a: 0.5 * (x + a / x)              # Babylonian iteration for √a
    >>> @custom_fixed_point(T)
    ... def babylonian(init_params, a):
    ...     return jax.lax.fori_loop(0, 30, lambda i, x: T(x, a), init_params)
    >>> round(float(jax.jacfwd(babylonian, argnums=1)(1.0, 9.0)), 6)   # 1 / (2·3)
    0.166667
    """

    def optimality_fun(params: PyTree, *args: Any, **kwargs: Any) -> PyTree:
        return jax.tree_util.tree_map(
            lambda t, x: t - x, fixed_point_fun(params, *args, **kwargs), params
        )

    cfg = _config(
        solve, "fixed_point", symmetric=False, check=check, tol=tol, max_condition=max_condition
    )
    reference = _signature_of(reference_signature, fixed_point_fun)

    def wrapper(solver_fun: Callable[..., Any]) -> Callable[..., Any]:
        return _implicit_solver(solver_fun, optimality_fun, cfg, has_aux, reference)

    return wrapper


def root_vjp(
    optimality_fun: Callable[..., PyTree],
    sol: PyTree,
    args: tuple,
    cotangent: PyTree,
    solve: SolveSpec = None,
    *,
    check: CheckMode | Check = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
) -> tuple:
    r"""Vector-Jacobian product of a root (JAXopt's ``root_vjp``).

    With ``F(sol, *args) = 0``, returns ``(vᵀ ∂sol/∂args[0], …)``: one entry per element of
    ``args``, shaped like it, where ``v = cotangent`` (shaped like ``sol``). Computed as
    ``-(∂θF)ᵀ u`` with ``(∂ₓF)ᵀ u = v``; ``solve`` receives the transposed ``matvec``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> F = lambda x, a: x**2 - a
    >>> [float(v) for v in root_vjp(F, jnp.array(3.0), (jnp.array(9.0),), jnp.array(1.0))]
    [0.16666...]
    """
    cfg = _config(solve, "root", symmetric=False, check=check, tol=tol, max_condition=max_condition)
    args = tuple(args)

    def solution(*params: PyTree) -> PyTree:
        return implicit_solution(optimality_fun, sol, *params, config=cfg)

    _, pullback = jax.vjp(solution, *args)
    return tuple(pullback(cotangent))


def root_jvp(
    optimality_fun: Callable[..., PyTree],
    sol: PyTree,
    args: tuple,
    tangents: tuple,
    solve: SolveSpec = None,
    *,
    check: CheckMode | Check = "raise",
    tol: float | None = None,
    max_condition: float | None = None,
) -> PyTree:
    r"""Jacobian-vector product of a root (JAXopt's ``root_jvp``).

    With ``F(sol, *args) = 0``, returns ``Σᵢ ∂sol/∂args[i] · tangents[i]`` (shaped like
    ``sol``): the solution of ``∂ₓF ẋ = -Σᵢ ∂_{θᵢ}F θ̇ᵢ``.

    Examples
    --------
    >>> import jax.numpy as jnp
    >>> F = lambda x, a: x**2 - a
    >>> float(root_jvp(F, jnp.array(3.0), (jnp.array(9.0),), (jnp.array(1.0),)))
    0.16666...
    """
    args, tangents = tuple(args), tuple(tangents)
    if len(args) != len(tangents):
        raise ValueError(
            f"root_jvp: args and tangents must be tuples of the same length; got {len(args)} "
            f"args and {len(tangents)} tangents."
        )
    cfg = _config(solve, "root", symmetric=False, check=check, tol=tol, max_condition=max_condition)

    def solution(*params: PyTree) -> PyTree:
        return implicit_solution(optimality_fun, sol, *params, config=cfg)

    return jax.jvp(solution, args, tangents)[1]
